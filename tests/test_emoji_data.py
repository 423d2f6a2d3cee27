"""The emoji data set: builder on a fake node_modules tree, the shipped files, the split rule, captions, cells."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clip.commands import data as data_command
from clip.data import build_emoji as B
from clip.data.emoji import (
    CELLS,
    EmojiConcept,
    canonical_caption,
    compositional_split,
    default_root,
    load_emoji,
    name_words,
    sample_caption,
)

# (unified as in emoji.json, CLDR name, category, subcategory, keywords)
FAKE = [
    ("1F600", "grinning face", "Smileys & Emotion", "face-smiling", "face, grin, happy"),
    ("1F603", "grinning face with big eyes", "Smileys & Emotion", "face-smiling", "face, mouth, open"),
    ("1F604", "grinning face with smiling eyes", "Smileys & Emotion", "face-smiling", "eye, face, smile"),
    ("1F601", "beaming face with smiling eyes", "Smileys & Emotion", "face-smiling", "eye, face, grin"),
    ("1F606", "grinning squinting face", "Smileys & Emotion", "face-smiling", "laugh, satisfied"),
    ("1F436", "dog face", "Animals & Nature", "animal-mammal", "dog, face, pet"),
    ("1F415", "dog", "Animals & Nature", "animal-mammal", "pet"),
    ("1F431", "cat face", "Animals & Nature", "animal-mammal", "cat, face, pet"),
    ("1F408", "cat", "Animals & Nature", "animal-mammal", "pet"),
    ("1F98A", "fox", "Animals & Nature", "animal-mammal", "face"),
    ("0039-FE0F-20E3", "keycap: 9", "Symbols", "keycap", ""),
    ("1F44B", "waving hand", "People & Body", "hand-fingers-open", "hand, wave"),
    ("1F1EF-1F1F5", "flag: Japan", "Flags", "country-flag", "flag"),
    ("1F3FB", "light skin tone", "Component", "skin-tone", "skin tone"),
]
NO_FLUENT = "1F98A"  # the fox has no 3-D art in the fake tree, like 37 real concepts
SVG = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle cx="36" cy="36" r="20" fill="#{}"/></svg>'


def _disc(size: int, colour: tuple[int, int, int]) -> Image.Image:
    """A coloured disc on a transparent square: the corners must come out white."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(*colour, 255))
    return img


def _package(root: Path, style: str) -> Path:
    name, version = B.PACKAGES[style]
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "package.json").write_text(json.dumps({"name": name, "version": version}))
    return folder


def make_fake_node_modules(root: Path) -> Path:
    """A tiny node_modules tree in the layout of the four real packages."""
    entries = []
    for k, (unified, name, category, sub, _) in enumerate(FAKE):
        entry = {"name": name.upper(), "unified": unified, "image": unified.lower() + ".png", "sort_order": k,
                 "category": category, "subcategory": sub, "short_names": [name.replace(" ", "_")],
                 "has_img_google": True, "has_img_twitter": True}  # fmt: skip
        if unified == "1F44B":
            entry["skin_variations"] = {"1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png"}}
        entries.append(entry)
    for k, style in enumerate(("google", "twitter")):
        folder = _package(root, style)
        (folder / "emoji.json").write_text(json.dumps(entries))
        (folder / "img" / style / "64").mkdir(parents=True)
        for j, e in enumerate(entries):
            _disc(64, (200, 40 * k, 10 * j)).save(folder / "img" / style / "64" / e["image"])
    assets = _package(root, "fluent3d") / "assets"
    assets.mkdir()
    for j, e in enumerate(entries):
        if e["unified"] != NO_FLUENT:
            _disc(256, (20, 200, 10 * j)).save(assets / (e["unified"].lower() + ".webp"))
    om = _package(root, "openmoji")
    (om / "data").mkdir()
    (om / "color" / "svg").mkdir(parents=True)
    records = [
        {"hexcode": u, "annotation": n, "tags": t, "group": c, "subgroups": s} for u, n, c, s, t in FAKE
    ]
    (om / "data" / "openmoji.json").write_text(json.dumps(records))
    for j, (unified, *_rest) in enumerate(FAKE):
        (om / "color" / "svg" / f"{unified}.svg").write_text(SVG.format(f"{30 * j % 256:02x}8040"))
    return root


@pytest.fixture(scope="module")
def fake_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, B.BuildReport]:
    root = tmp_path_factory.mktemp("emoji")
    node_modules = make_fake_node_modules(root / "node_modules")
    report = B.build_emoji(node_modules, root / "out", size=16, openmoji=False)
    return node_modules, root / "out", report


def test_build_from_fake_tree(fake_build: tuple[Path, Path, B.BuildReport]) -> None:
    _, out, report = fake_build
    assert report.concepts == 12 and report.images_per_style == {"google": 12, "twitter": 12, "fluent3d": 11}
    with np.load(out / "emoji.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    assert arrays["images"].shape == (35, 16, 16, 3) and arrays["images"].dtype == np.uint8
    # Transparent corners are composited on white; the disc centre keeps its colour.
    assert (arrays["images"][:, 0, 0] == 255).all() and (arrays["images"][:, 8, 8, 0] < 255).any()
    names = list(arrays["names"])
    assert "flag: Japan" not in names and "light skin tone" not in names
    assert names[:2] == ["grinning face", "grinning face with big eyes"]  # CLDR names, emoji.json order
    codepoints = list(arrays["codepoints"])
    assert "0039-20e3" in codepoints and len(set(codepoints)) == 12  # normalised, no FE0F, no skin variants
    assert arrays["keywords"][0] == "face|grin|happy" and arrays["keywords"][names.index("keycap: 9")] == ""
    assert np.array_equal(arrays["held_out"], compositional_split(codepoints, names, arrays["subcategories"]))
    # 5 smileys and 5 mammals -> one held out each; the other subcategories are too small.
    assert arrays["held_out"].sum() == 2
    fox = codepoints.index("1f98a")
    assert list(arrays["image_style"][arrays["image_concept"] == fox]) == [0, 1]
    assert (out / "ATTRIBUTION.md").is_file() and not (out / "openmoji.npz").exists()


def test_load_fake_build_and_cells(fake_build: tuple[Path, Path, B.BuildReport]) -> None:
    _, out, _ = fake_build
    data = load_emoji(openmoji=False, root=out)
    assert data.size == 16 and not data.images.flags.writeable
    train = set(data.train_indices().tolist())
    assert len(train) == 2 * 10
    for kind in CELLS:
        cell = data.cell(kind)
        assert not train & set(cell.indices.tolist())
        assert np.array_equal(cell.class_concepts[cell.labels], data.image_concept[cell.indices])
    with pytest.raises(FileNotFoundError, match="openmoji=False"):
        load_emoji(openmoji=True, root=out)


def test_build_with_openmoji_art(fake_build: tuple[Path, Path, B.BuildReport], tmp_path: Path) -> None:
    pytest.importorskip("cairosvg")
    node_modules, _, _ = fake_build
    report = B.build_emoji(node_modules, tmp_path, size=16, openmoji=True)
    assert report.images_per_style["openmoji"] == 12
    data = load_emoji(openmoji=True, root=tmp_path)
    om = data.images[data.image_style == data.style_index("openmoji")]
    assert om.shape == (12, 16, 16, 3) and (om[:, 0, 0] == 255).all() and (om[:, 8, 8] < 250).any()
    assert len(data.train_indices()) == 3 * 10


def test_missing_package_names_package_and_command(tmp_path: Path) -> None:
    node_modules = make_fake_node_modules(tmp_path / "node_modules")
    shutil.rmtree(node_modules / "@lobehub")
    with pytest.raises(FileNotFoundError, match=r"@lobehub/fluent-emoji-3d@1\.1\.0.*npm install --no-save"):
        B.build_emoji(node_modules, tmp_path / "out", openmoji=False)
    assert not (tmp_path / "out").exists()


def test_cli_build_emoji(fake_build: tuple[Path, Path, B.BuildReport], tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    data_command.add_parser(parser.add_subparsers())
    node_modules = fake_build[0]
    argv = [
        "data",
        "build-emoji",
        "--node-modules",
        str(node_modules),
        "--size",
        "8",
        "--output-dir",
        str(tmp_path),
    ]
    args = parser.parse_args([*argv, "--no-openmoji"])
    assert args.func(args) == 0
    with np.load(tmp_path / "emoji.npz", allow_pickle=False) as f:
        assert f["images"].shape == (35, 8, 8, 3)
    with pytest.raises(SystemExit):  # --node-modules and --npm-install exclude each other
        parser.parse_args([*argv, "--npm-install"])


def test_shipped_files_load_without_pickle() -> None:
    with np.load(default_root() / "emoji.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    n, c = len(arrays["image_concept"]), len(arrays["names"])
    assert arrays["images"].shape == (n, 32, 32, 3) and arrays["images"].dtype == np.uint8
    assert arrays["image_concept"].dtype == np.int32 and arrays["image_style"].dtype == np.int8
    assert arrays["held_out"].dtype == bool and arrays["held_out"].shape == (c,)
    for key in ("codepoints", "names", "keywords", "categories", "subcategories", "style_names"):
        assert arrays[key].dtype.kind == "U"
    with np.load(default_root() / "openmoji.npz", allow_pickle=False) as f:
        assert f["images"].shape[1:] == (32, 32, 3) and str(f["build_id"]) == str(arrays["build_id"])
    assert (default_root() / "ATTRIBUTION.md").read_text().count("CC BY-SA 4.0") >= 2


def test_shipped_sizes_match_design_note() -> None:
    summary = load_emoji().summary()
    assert summary["concepts"] == 1636 and summary["held_out_concepts"] == 263
    assert summary["train_images"] == 4119
    assert (summary["cell_style_images"], summary["cell_style_classes"]) == (1342, 1373)
    assert (summary["cell_concept_images"], summary["cell_concept_classes"]) == (789, 263)
    assert (summary["cell_both_images"], summary["cell_both_classes"]) == (257, 263)
    assert load_emoji(openmoji=False).summary()["train_images"] == 2746


def test_split_rule_on_shipped_data() -> None:
    data = load_emoji()
    recomputed = compositional_split(list(data.codepoints), list(data.names), list(data.subcategories))
    assert np.array_equal(recomputed, data.held_out)
    seen_words = set().union(*(name_words(n) for n in data.names[~data.held_out]))
    for name in data.names[data.held_out]:
        assert name_words(name) <= seen_words, name
    train_concepts = set(data.image_concept[data.train_indices()].tolist())
    assert not train_concepts & set(np.flatnonzero(data.held_out).tolist())
    assert train_concepts == set(np.flatnonzero(~data.held_out).tolist())


def test_cells_disjoint_from_training_set() -> None:
    data = load_emoji()
    train = set(data.train_indices().tolist())
    fluent = data.style_index("fluent3d")
    assert not (data.image_style[list(train)] == fluent).any()
    seen_indices: set[int] = set()
    for kind in CELLS:
        cell = data.cell(kind)
        indices = set(cell.indices.tolist())
        assert not indices & train and not indices & seen_indices
        seen_indices |= indices
        assert cell.labels.min() >= 0 and cell.labels.max() < len(cell.captions)
        assert np.array_equal(cell.class_concepts[cell.labels], data.image_concept[cell.indices])
        assert cell.captions[0] == canonical_caption(str(data.names[cell.class_concepts[0]]))
        assert ((data.image_style[cell.indices] == fluent) == (kind != "concept")).all()


@pytest.mark.parametrize(
    ("name", "caption"),
    [
        ("man: red hair", "an emoji of a man with red hair"),
        ("keycap: 9", "an emoji of the keycap 9"),
        ("grapes", "an emoji of grapes"),
        ("people holding hands", "an emoji of people holding hands"),
        ("grinning face", "an emoji of a grinning face"),
        ("upside-down face", "an emoji of an upside-down face"),
        ("unicorn", "an emoji of a unicorn"),
        ("hourglass done", "an emoji of an hourglass done"),
        ("OK hand", "an emoji of an OK hand"),
        ("VS button", "an emoji of a VS button"),
        ("UP! button", "an emoji of an UP! button"),
        ("potable water", "an emoji of potable water"),
        ("face with tears of joy", "an emoji of a face with tears of joy"),
        ("man: bald", "an emoji of a bald man"),
        ("family: man, boy, boy", "an emoji of a family of a man and two boys"),
        ("kiss: woman, man", "an emoji of a kiss between a woman and a man"),
        ("person running: facing right", "an emoji of a person running facing right"),
        ("Aries", "an emoji of Aries"),
        ("no smoking", "an emoji of no smoking"),
        ("eight o’clock", "an emoji of eight o’clock"),
        ("hibiscus", "an emoji of a hibiscus"),
        ("Statue of Liberty", "an emoji of the Statue of Liberty"),
    ],
)
def test_canonical_caption(name: str, caption: str) -> None:
    assert canonical_caption(name) == caption


def test_sample_caption_mixture() -> None:
    concept = EmojiConcept("1f436", "dog face", ("dog", "face", "pet", "dog face"), "Animals & Nature", "x")
    rng = np.random.default_rng(0)
    captions = [sample_caption(concept, rng) for _ in range(4000)]
    canonical = sum(c == "an emoji of a dog face" for c in captions) / len(captions)
    bare = sum(c == "dog face" for c in captions) / len(captions)
    extra = [c for c in captions if c.startswith("dog face, ")]
    assert abs(canonical - 0.5) < 0.03 and abs(bare - 0.25) < 0.03 and abs(len(extra) / 4000 - 0.25) < 0.03
    for c in extra:
        keywords = c.split(", ")[1:]
        assert 1 <= len(keywords) <= 3 and set(keywords) <= {"dog", "face", "pet"}
    lonely = EmojiConcept("0039-20e3", "keycap: 9", (), "Symbols", "keycap")
    assert {sample_caption(lonely, rng) for _ in range(50)} == {"an emoji of the keycap 9", "keycap: 9"}
