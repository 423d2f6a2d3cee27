"""The bundled emoji data set: loader, caption recipe and the compositional concept split.

Each Unicode emoji is one *concept*; its text is the Unicode CLDR short name (plus CLDR keywords), and several
vendors draw it in different art *styles*. Training uses the styles ``google``, ``twitter`` (and ``openmoji`` when
its share-alike file is loaded); ``fluent3d`` is never trained on. Concepts are split once, by a fixed rule
(:func:`compositional_split`), into seen and held-out ones. That gives three zero-shot evaluation cells:

========== ============================== ===================================
cell       images                          classes
========== ============================== ===================================
``style``   fluent3d x seen concepts       all seen concepts
``concept`` train styles x held-out        held-out concepts
``both``    fluent3d x held-out            held-out concepts
========== ============================== ===================================

Files (built by ``clip data build-emoji``, see :mod:`clip.data.build_emoji`), plain arrays that load with
``allow_pickle=False``:

- ``emoji.npz``: ``images`` uint8 [N, S, S, 3] (composited on white), ``image_concept`` int32 [N],
  ``image_style`` int8 [N]; per concept [C]: ``codepoints`` (normalised: lower-case hex joined by ``-``, no
  ``fe0f``), ``names``, ``keywords`` (joined by :data:`KEYWORD_SEP`), ``categories``, ``subcategories``,
  ``held_out`` bool; ``style_names`` [4], ``sources`` (npm ``package@version``), ``size`` and ``build_id``.
- ``openmoji.npz``: OpenMoji's art only (CC BY-SA 4.0, hence its own file): ``images``, ``image_concept``,
  ``image_style``, ``codepoints`` and ``build_id`` (must match ``emoji.npz``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

STYLES: tuple[str, ...] = ("google", "twitter", "fluent3d", "openmoji")
HELD_OUT_STYLE = "fluent3d"
KEYWORD_SEP = "|"
MAIN_FILE = "emoji.npz"
OPENMOJI_FILE = "openmoji.npz"
FORMAT_VERSION = 1
CELLS: tuple[str, ...] = ("style", "concept", "both")
_PREFIX = "an emoji of "


def default_root() -> Path:
    """The folder of the shipped data files (``clip/data/emoji``)."""
    return Path(__file__).resolve().parent / "emoji"


# ----------------------------------------------------------------------------------------------- split


def name_words(name: str) -> set[str]:
    """The words of a name for the split rule: lower-cased runs of letters/digits (``\\w+``)."""
    return set(re.findall(r"\w+", name.lower()))


def compositional_split(
    codepoints: Sequence[str], names: Sequence[str], subcategories: Sequence[str], one_in: int = 5
) -> np.ndarray:
    """Held-out flags [C] (bool) for the compositional concept split.

    Subcategories are visited in sorted order; within each, concepts are ordered by ``sha1(codepoints)`` (the
    normalised key, UTF-8) and up to ``len // one_in`` are held out, taking a concept only if every word of its
    name still occurs in the name of some concept that stays seen. Without the word rule about half the held-out
    names contain words the text tower never saw in training, which tests vocabulary, not composition.
    """
    words = [name_words(n) for n in names]
    # seen_count[w]: how many still-seen concepts have w in their name.
    seen_count = Counter(w for ws in words for w in ws)
    by_sub: dict[str, list[int]] = defaultdict(list)
    for i, sub in enumerate(subcategories):
        by_sub[sub].append(i)
    held = np.zeros(len(names), dtype=bool)
    for sub in sorted(by_sub):
        members = sorted(by_sub[sub], key=lambda i: hashlib.sha1(codepoints[i].encode("utf-8")).hexdigest())
        quota, taken = len(members) // one_in, 0
        for i in members:
            if taken >= quota:
                break
            # Removing i only lowers the counts of i's own words, so this also keeps earlier picks covered.
            if all(seen_count[w] > 1 for w in words[i]):
                seen_count.subtract(words[i])
                held[i] = True
                taken += 1
    return held


# -------------------------------------------------------------------------------------------- captions

# Head nouns that take no article (mass nouns); plural heads also take none.
_MASS = frozenset(
    "water ice fire rice bread butter salt broccoli garlic sushi oden spaghetti popcorn fog bacon food cream tea "
    "custard tennis sake milk money voltage dna infinity polish luggage meat wood yarn soap information "
    "construction hockey lacrosse badminton bowling pong".split()
)
_IRREGULAR_PLURAL = {"man": "men", "woman": "women", "child": "children", "person": "people"}
_PLURAL_WORDS = frozenset({"people", "men", "women", "children", "feet", "teeth", "mice", "geese", "skis"})
_SINGULAR_S_ENDINGS = ("ss", "us", "is", "os")
# Whole names that read best without an article (adjectives, interjections, set phrases).
_NO_ARTICLE = frozenset(
    {"ZZZ", "dizzy", "dashing away", "thumbs up", "thumbs down", "radioactive", "biohazard", "star-struck"}
    | {"rolling on the floor laughing", "breast-feeding", "horse racing", "cooking", "camping", "foggy"}
    | {"wireless", "multiply", "plus", "minus", "divide", "copyright", "registered", "prohibited", "locked"}
    | {"unlocked", "locked with pen", "locked with key", "mount fuji", "palms up together"}
)
_THE = frozenset({"Statue of Liberty", "Tokyo tower", "milky way", "kaaba"})
# Words after which the head noun has ended ("face with tears of joy" -> head "face").
_CUT_WORDS = frozenset(
    "with without in of on for at from under over into and showing holding facing by behind".split()
)
# All-caps words read as words, not spelled out as letters ("an UP! button", "a COOL button").
_CAPS_WORDS = frozenset({"COOL", "FREE", "NEW", "SOON", "TOP", "BACK", "END", "ON", "UP"})
_VOWEL_SOUND_LETTERS = frozenset("AEFHILMNORSX")
_A_PREFIXES = ("uni", "use", "usu", "eu", "ewe", "one", "once")
_AN_PREFIXES = ("hour", "honest", "honor", "heir", "x-")
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def _indefinite(word: str) -> str:
    """'a' or 'an' for a phrase starting with ``word``, by sound (letters spelled out for acronyms)."""
    bare = word.strip("!“”\"'()")
    if not bare:
        return "a"
    if bare[0].isdigit():
        return "an" if bare.startswith("8") or bare in ("11", "18") else "a"
    letters = re.sub(r"[^A-Za-z]", "", bare)
    if letters and letters.isupper() and letters not in _CAPS_WORDS:
        return "an" if letters[0] in _VOWEL_SOUND_LETTERS else "a"
    low = bare.lower()
    if low.startswith(_AN_PREFIXES):
        return "an"
    if low.startswith(_A_PREFIXES):
        return "a"
    return "an" if low[0] in "aeiou" else "a"


def _head_noun(phrase: str) -> str:
    """The head noun of a noun phrase: the last word before the first preposition or (non-initial) -ing word."""
    words = phrase.split()
    for k, w in enumerate(words[1:], start=1):
        if w.lower() in _CUT_WORDS or (w.endswith("ing") and w.lower() not in ("ring", "king", "wing")):
            return words[k - 1]
    return words[-1]


def _is_plural(word: str) -> bool:
    w = word.lower().strip("!“”\"'(),")
    if w in _PLURAL_WORDS:
        return True
    return w.endswith("s") and not w.endswith(_SINGULAR_S_ENDINGS)


def _is_proper(name: str) -> bool:
    """Proper nouns take no article: Zodiac signs, 'Santa Claus', 'Mrs. Claus' (every content word capitalised)."""
    content = [w for w in name.split() if w not in ("of", "the")]
    return all(w[:1].isupper() and not w.isupper() for w in content)


def _with_article(phrase: str, head_from: str | None = None) -> str:
    """Prefix ``phrase`` with a/an, or nothing for plural/mass/proper heads (head read from ``head_from``)."""
    if phrase in _THE:
        return "the " + phrase
    words = phrase.split()
    if phrase in _NO_ARTICLE or _is_proper(phrase) or words[0].lower() == "no":
        return phrase
    if words[-1] == "o’clock" or words[-1].endswith("-thirty"):  # clock faces: "an emoji of ten o’clock"
        return phrase
    head = _head_noun(head_from or phrase)
    if _is_plural(head) or head.lower().strip("!,") in _MASS:
        return phrase
    return f"{_indefinite(phrase.split()[0])} {phrase}"


def _people_list(items: Sequence[str]) -> str:
    """'man, woman, boy, boy' -> 'a man, a woman and two boys' (order of first appearance kept)."""
    counts = Counter(items)
    parts = []
    for item in dict.fromkeys(items):
        n = counts[item]
        if n == 1:
            parts.append(f"{_indefinite(item)} {item}")
        else:
            plural = _IRREGULAR_PLURAL.get(item, item + "s")
            parts.append(f"{_NUMBER_WORDS.get(n, str(n))} {plural}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _colon_phrase(base: str, qualifier: str) -> str:
    """Rewrite a CLDR ``base: qualifier`` name as a noun phrase with its article."""
    if base == "keycap":
        return f"the keycap {qualifier}"
    if qualifier == "bald":
        return _with_article(f"bald {base}", head_from=base)
    if qualifier.startswith("facing "):
        return _with_article(f"{base} {qualifier}", head_from=base)
    items = [q.strip() for q in qualifier.split(",")]
    if len(items) > 1 or items[0] in ("man", "woman", "boy", "girl", "adult", "child", "person"):
        joiner = "between" if base == "kiss" else "of"
        return f"{_with_article(base)} {joiner} {_people_list(items)}"
    # Attributes such as "red hair" or "blond hair": "a man with red hair".
    return f"{_with_article(base)} with {qualifier}"


def phrase(name: str) -> str:
    """A CLDR name as a noun phrase with its article: 'man: red hair' -> 'a man with red hair'."""
    name = " ".join(name.split())
    if ": " in name:
        base, qualifier = name.split(": ", 1)
        return _colon_phrase(base, qualifier)
    return _with_article(name)


def canonical_caption(name: str) -> str:
    """The canonical caption of a concept: ``"an emoji of " + phrase(name)``.

    Rules: a/an by sound (acronyms spelled out: "an OK hand", "a VS button"; "a unicorn", "an hourglass");
    no article for plural heads ("an emoji of grapes"), mass nouns ("potable water"), proper names ("Aries"),
    "no ..." signs and a few set phrases; "the" for landmarks. CLDR colon forms are rewritten: "man: red hair"
    -> "a man with red hair", "man: bald" -> "a bald man", "keycap: 9" -> "the keycap 9", "family: man, boy,
    boy" -> "a family of a man and two boys", "kiss: woman, man" -> "a kiss between a woman and a man",
    "person running: facing right" -> "a person running facing right". No style words ever.
    """
    return _PREFIX + phrase(name)


@dataclasses.dataclass(frozen=True)
class EmojiConcept:
    """One concept's text: normalised codepoints, CLDR name, CLDR keywords, category and subcategory."""

    codepoints: str
    name: str
    keywords: tuple[str, ...]
    category: str
    subcategory: str


def sample_caption(concept: EmojiConcept, rng: np.random.Generator) -> str:
    """A training caption: half the canonical caption, a quarter the bare name, a quarter the name + 1-3 keywords.

    Keywords equal to the name are skipped; with none left the name-plus-keywords branch gives the bare name.
    """
    u = rng.random()
    if u < 0.5:
        return canonical_caption(concept.name)
    keywords = [k for k in concept.keywords if k != concept.name]
    if u < 0.75 or not keywords:
        return concept.name
    k = int(rng.integers(1, min(3, len(keywords)) + 1))
    picked = [keywords[j] for j in sorted(rng.choice(len(keywords), size=k, replace=False))]
    return ", ".join([concept.name, *picked])


# ---------------------------------------------------------------------------------------------- loader


@dataclasses.dataclass(frozen=True, eq=False)
class EmojiCell:
    """A zero-shot evaluation cell: images [M] with labels [M] into ``class_concepts`` [K] / ``captions`` [K]."""

    kind: str
    indices: np.ndarray
    labels: np.ndarray
    class_concepts: np.ndarray
    captions: tuple[str, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class EmojiData:
    """The emoji data set as read-only numpy arrays (N images, C concepts, S pixels a side).

    ``images`` uint8 [N, S, S, 3]; ``image_concept`` int32 [N]; ``image_style`` int8 [N] (index into
    ``style_names``); per concept [C]: ``codepoints``, ``names``, ``keywords`` (joined by :data:`KEYWORD_SEP`),
    ``categories``, ``subcategories`` (str arrays) and ``held_out`` (bool).
    """

    images: np.ndarray
    image_concept: np.ndarray
    image_style: np.ndarray
    codepoints: np.ndarray
    names: np.ndarray
    keywords: np.ndarray
    categories: np.ndarray
    subcategories: np.ndarray
    held_out: np.ndarray
    style_names: tuple[str, ...]

    @property
    def num_concepts(self) -> int:
        return len(self.names)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def keyword_list(self, c: int) -> tuple[str, ...]:
        text = str(self.keywords[c])
        return tuple(text.split(KEYWORD_SEP)) if text else ()

    def concept(self, c: int) -> EmojiConcept:
        return EmojiConcept(
            str(self.codepoints[c]),
            str(self.names[c]),
            self.keyword_list(c),
            str(self.categories[c]),
            str(self.subcategories[c]),
        )

    def canonical_captions(self, concepts: np.ndarray | Sequence[int]) -> tuple[str, ...]:
        return tuple(canonical_caption(str(self.names[c])) for c in concepts)

    def style_index(self, name: str) -> int:
        if name not in self.style_names:
            raise ValueError(f"unknown emoji style {name!r}; expected one of {self.style_names}")
        return self.style_names.index(name)

    def _train_style_mask(self) -> np.ndarray:
        return self.image_style != self.style_index(HELD_OUT_STYLE)

    def train_indices(self) -> np.ndarray:
        """Image indices [M] (int64) of the training set: train styles x seen concepts."""
        mask = self._train_style_mask() & ~self.held_out[self.image_concept]
        return np.flatnonzero(mask)

    def cell(self, kind: str) -> EmojiCell:
        """The zero-shot cell ``"style"``, ``"concept"`` or ``"both"`` (see the module docstring)."""
        if kind not in CELLS:
            raise ValueError(f"unknown emoji cell {kind!r}; expected one of {CELLS}")
        held_style = kind in ("style", "both")
        held_concepts = kind in ("concept", "both")
        style_mask = ~self._train_style_mask() if held_style else self._train_style_mask()
        concept_mask = self.held_out if held_concepts else ~self.held_out
        indices = np.flatnonzero(style_mask & concept_mask[self.image_concept])
        class_concepts = np.flatnonzero(concept_mask)
        # Map concept index -> position in class_concepts.
        position = np.full(self.num_concepts, -1, dtype=np.int64)
        position[class_concepts] = np.arange(len(class_concepts))
        labels = position[self.image_concept[indices]]
        return EmojiCell(kind, indices, labels, class_concepts, self.canonical_captions(class_concepts))

    def summary(self) -> dict[str, int]:
        """Counts: concepts, held-out concepts, images per style, training images and cell sizes."""
        out = {"concepts": self.num_concepts, "held_out_concepts": int(self.held_out.sum())}
        for s, name in enumerate(self.style_names):
            out[f"images_{name}"] = int((self.image_style == s).sum())
        out["train_images"] = len(self.train_indices())
        for kind in CELLS:
            cell = self.cell(kind)
            out[f"cell_{kind}_images"] = len(cell.indices)
            out[f"cell_{kind}_classes"] = len(cell.class_concepts)
        return out


@functools.cache
def _read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, read once and made read-only (they are shared through the cache)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"emoji data file {path} not found; build it with `clip data build-emoji --npm-install`"
        )
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


def _check_openmoji(main: dict[str, np.ndarray], om: dict[str, np.ndarray], path: Path) -> None:
    if str(om["build_id"]) != str(main["build_id"]) or om["images"].shape[1:] != main["images"].shape[1:]:
        raise ValueError(
            f"{path} comes from a different build than {MAIN_FILE} (other concepts or image size); rebuild with "
            "`clip data build-emoji` or load with openmoji=False"
        )


@functools.cache
def _load(openmoji: bool, root: str) -> EmojiData:
    main = _read_npz(str(Path(root) / MAIN_FILE))
    if int(main["format_version"]) != FORMAT_VERSION:
        raise ValueError(
            f"{root}/{MAIN_FILE} has format {int(main['format_version'])}, expected {FORMAT_VERSION}"
        )
    images, concept, style = main["images"], main["image_concept"], main["image_style"]
    if openmoji:
        om_path = Path(root) / OPENMOJI_FILE
        if not om_path.is_file():
            raise FileNotFoundError(
                f"{om_path} not found; build it with `clip data build-emoji` (needs cairosvg: "
                "pip install 'clipforge[build]') or load with openmoji=False"
            )
        om = _read_npz(str(om_path))
        _check_openmoji(main, om, om_path)
        images = np.concatenate([images, om["images"]])
        concept = np.concatenate([concept, om["image_concept"]])
        style = np.concatenate([style, om["image_style"]])
        for a in (images, concept, style):
            a.flags.writeable = False
    return EmojiData(
        images=images,
        image_concept=concept,
        image_style=style,
        codepoints=main["codepoints"],
        names=main["names"],
        keywords=main["keywords"],
        categories=main["categories"],
        subcategories=main["subcategories"],
        held_out=main["held_out"],
        style_names=tuple(str(s) for s in main["style_names"]),
    )


def load_emoji(openmoji: bool = True, root: str | Path | None = None) -> EmojiData:
    """Load the emoji data set (cached; arrays are read-only).

    ``openmoji`` adds OpenMoji's art (CC BY-SA 4.0, a separate file) as a third training style. ``root`` is the
    folder holding ``emoji.npz`` (default: the files shipped in ``clip/data/emoji``).
    """
    return _load(bool(openmoji), str(Path(root).resolve() if root is not None else default_root()))
