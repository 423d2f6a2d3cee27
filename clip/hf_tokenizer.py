"""Tokenizers beyond OpenAI's BPE: OpenCLIP's `HFTokenizer`, read from a `tokenizer.json` with `tokenizers`.

OpenCLIP configs that name an HF tokenizer (CLIPA: `bert-base-uncased`; `-worldwide`: `facebook/xlm-v-base`,
`google/mt5-base`; SigLIP / SigLIP 2: the `timm/ViT-*-SigLIP*` repos) tokenize with
`transformers.AutoTokenizer(...)(texts, max_length=L, padding="max_length", truncation=True)` after one of three
cleaning functions. This module gives the same ids with the Rust `tokenizers` library alone (no `transformers`
import at run time; install the `hf` extra: ``pip install 'clipforge[hf]'``).

Interface (what `clip.load` wires in):

* `TokenizerSpec` - frozen, JSON round-tripping description of a model's tokenizer: ``kind`` ("openai" or "hf"),
  ``context_length``, and for "hf" the repo the files come from (``hf_name``), ``clean`` and
  ``strip_sep_token``. `TokenizerSpec.from_open_clip_text_cfg(text_cfg)` reads an OpenCLIP ``text_cfg``.
* `get_tokenizer(spec, folder=None)` / `spec.build(folder)` - the callable tokenizer; "hf" needs the folder
  holding ``tokenizer.json`` (`clip.hub.download_tokenizer(spec.hf_name)` fetches one).
* Every tokenizer here is called as ``tok(texts: str | list[str], context_length: int | None = None)`` and
  returns a LongTensor [N, context_length].

What `HFTokenizer` reproduces, step by step (OpenCLIP 3.x `open_clip/tokenizer.py`, transformers' fast path):

1. clean each text with ``clean``: "whitespace" = ftfy, HTML-unescape twice, strip, then collapse whitespace
   runs (Python's `str.split`); "lower" = that, lower-cased; "canonicalize" = ftfy + unescape + strip, then
   "_" -> " ", drop ASCII punctuation (`string.punctuation`), lower-case, collapse whitespace (big_vision's
   SigLIP prompt canonicalisation);
2. encode with the special tokens of ``tokenizer.json``'s post-processor (e.g. ``[CLS] $A [SEP]``,
   ``$A </s>``), truncating the text part so the whole row fits ``context_length`` (the special tokens stay),
   from the side ``truncation_side`` names;
3. pad to exactly ``context_length`` with the pad token, on the side ``padding_side`` names;
4. with ``strip_sep_token`` (CLIPA), replace every sep id by 0 - zero, not the pad id, as OpenCLIP does.

The pad token, sep token and the two sides are found as transformers finds them: ``special_tokens_map.json``,
then ``tokenizer_config.json``, then the padding section of ``tokenizer.json``, then the defaults of the
tokenizer class named in ``tokenizer_config.json`` (or by ``config.json``'s ``model_type``) - e.g. BERT's
``[PAD]``/``[SEP]`` for ``bert-base-uncased``, whose repo lists no special tokens.
"""

from __future__ import annotations

import dataclasses
import json
import string
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from clip.tokenizer import basic_clean

if TYPE_CHECKING:  # the `tokenizers` import is deferred: it is an optional dependency
    import tokenizers

__all__ = [
    "CLEAN_MODES",
    "HFTokenizer",
    "OpenAITokenizer",
    "TextTokenizer",
    "TokenizerSpec",
    "clean_text",
    "get_tokenizer",
]

CLEAN_MODES = ("whitespace", "lower", "canonicalize")
TOKENIZER_FILE = "tokenizer.json"
# The side files transformers reads beside tokenizer.json, in the order this module consults them.
SIDE_FILES = ("special_tokens_map.json", "tokenizer_config.json", "config.json")

# Defaults of the transformers tokenizer classes that OpenCLIP's HF-tokenizer configs use (their __init__
# signatures and class attributes), for repos whose files leave them out. Keys: class name without "Fast".
_CLASS_DEFAULTS: dict[str, dict[str, str]] = {
    "BertTokenizer": {"pad_token": "[PAD]", "sep_token": "[SEP]"},
    "XLMRobertaTokenizer": {"pad_token": "<pad>", "sep_token": "</s>"},
    "T5Tokenizer": {"pad_token": "<pad>"},
    "GemmaTokenizer": {"pad_token": "<pad>", "padding_side": "left"},
    "SiglipTokenizer": {"pad_token": "</s>"},
}
# AutoTokenizer's choice of class from config.json's model_type when tokenizer_config.json names none.
_MODEL_TYPE_CLASS = {
    "bert": "BertTokenizer",
    "xlm-roberta": "XLMRobertaTokenizer",
    "t5": "T5Tokenizer",
    "mt5": "T5Tokenizer",
    "gemma": "GemmaTokenizer",
    "siglip": "SiglipTokenizer",
}
_SIDES = ("right", "left")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class TextTokenizer(Protocol):
    """What every tokenizer of this module is: texts -> LongTensor [N, context_length]."""

    context_length: int

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor: ...


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "this model's tokenizer is an HF tokenizer (tokenizer.json), which needs the `tokenizers` package: "
            "pip install 'clipforge[hf]'"
        ) from err
    return tokenizers


def _collapse(text: str) -> str:
    # str.split(), not a regex: OpenCLIP's whitespace set is Python's (it includes \x1c-\x1f, which \s lacks).
    return " ".join(text.split())


def clean_text(text: str, mode: str) -> str:
    """OpenCLIP's cleaning `mode` ("whitespace", "lower" or "canonicalize") applied to one text."""
    if mode == "whitespace":
        return _collapse(basic_clean(text))
    if mode == "lower":
        return _collapse(basic_clean(text)).lower()
    if mode == "canonicalize":
        text = basic_clean(text).replace("_", " ").translate(_PUNCTUATION).lower()
        return _collapse(text)
    raise ValueError(f"clean={mode!r} is not a cleaning mode; use one of {', '.join(CLEAN_MODES)}")


def _check_texts(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is a {type(text).__name__}, not a str")
    return texts


def _check_length(context_length: Any, what: str = "context_length") -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"{what} must be a positive int, got {context_length!r}")
    return context_length


class OpenAITokenizer:
    """OpenAI's BPE (`clip.tokenizer`) with a model's context length, as OpenCLIP's `SimpleTokenizer` calls it.

    Too-long texts are truncated with <|endoftext|> kept last (OpenCLIP's behaviour; `clip.tokenize` instead
    raises unless truncate=True), and rows are LongTensors, as for `HFTokenizer`.
    """

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = _check_length(context_length)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Texts -> LongTensor [N, context_length]: 49406, ids, 49407, zeros."""
        from clip.tokenizer import default_tokenizer

        length = self.context_length if context_length is None else _check_length(context_length)
        return default_tokenizer().tokenize(_check_texts(texts), context_length=length, truncate=True).long()

    def __repr__(self) -> str:
        return f"OpenAITokenizer(context_length={self.context_length})"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON file ({err}); download it again") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object; download it again")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as written in transformers' files: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class _SideInfo:
    """What the files beside tokenizer.json say about the special tokens and sides."""

    pad_token: str | None
    sep_token: str | None
    padding_side: str
    truncation_side: str


def _side_info(folder: Path, json_padding: Mapping[str, Any] | None) -> _SideInfo:
    special, config, model = (
        {} if not (folder / n).is_file() else _read_json(folder / n) for n in SIDE_FILES
    )
    class_name = config.get("tokenizer_class") or _MODEL_TYPE_CLASS.get(str(model.get("model_type")), "")
    defaults = _CLASS_DEFAULTS.get(str(class_name).removesuffix("Fast"), {})

    def token(key: str) -> str | None:
        for source in (special, config):
            if (found := _token_text(source.get(key))) is not None:
                return found
        if key == "pad_token" and json_padding:
            return json_padding.get("pad_token")
        return defaults.get(key)

    def side(key: str) -> str:
        value = config.get(key) or defaults.get(key) or "right"
        if value not in _SIDES:
            raise ValueError(
                f"{folder / 'tokenizer_config.json'}: {key}={value!r}; expected 'right' or 'left'"
            )
        return value

    return _SideInfo(token("pad_token"), token("sep_token"), side("padding_side"), side("truncation_side"))


class HFTokenizer:
    """OpenCLIP's `HFTokenizer` over a `tokenizers.Tokenizer`: texts -> LongTensor [N, context_length].

    Build it with `HFTokenizer.from_file`; the constructor takes an already configured backend and ids.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        context_length: int,
        pad_token_id: int,
        sep_token_id: int | None = None,
        clean: str = "whitespace",
        strip_sep_token: bool = False,
        padding_side: str = "right",
        truncation_side: str = "right",
        source: str = "<tokenizer>",
    ) -> None:
        clean_text("", clean)  # validates the mode
        if padding_side not in _SIDES or truncation_side not in _SIDES:
            raise ValueError(f"padding_side and truncation_side must be 'right' or 'left' ({source})")
        if strip_sep_token and sep_token_id is None:
            raise ValueError(
                f"strip_sep_token=True, but the tokenizer in {source} has no sep token; set sep_token in its "
                "tokenizer_config.json or drop strip_sep_token"
            )
        self.context_length = _check_length(context_length)
        self.pad_token_id = pad_token_id
        self.sep_token_id = sep_token_id
        self.clean = clean
        self.strip_sep_token = strip_sep_token
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.source = source
        self._backend = backend
        post = backend.post_processor
        self.num_special_tokens = post.num_special_tokens_to_add(False) if post is not None else 0
        # One configured copy of the backend per context length: truncation and padding are state of a
        # tokenizers.Tokenizer, so sharing one between threads calling with different lengths would race.
        self._configured: dict[int, tokenizers.Tokenizer] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        context_length: int = 77,
        *,
        clean: str = "whitespace",
        strip_sep_token: bool = False,
        pad_token: str | None = None,
        sep_token: str | None = None,
        padding_side: str | None = None,
        truncation_side: str | None = None,
    ) -> HFTokenizer:
        """Read `path` (a tokenizer.json, or the folder holding it and its side files).

        Explicit `pad_token` / `sep_token` / sides override what the files say. ValueError names the file
        and the fix when tokenizer.json is missing or unreadable or no pad token can be found.
        """
        tokenizers_lib = _import_tokenizers()
        path = Path(path).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no {TOKENIZER_FILE} at {file}; download the tokenizer files (clip.hub.download_tokenizer) "
                "or save one with transformers: AutoTokenizer.from_pretrained(name).save_pretrained(folder)"
            )
        try:
            backend = tokenizers_lib.Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises plain Exceptions for malformed files
            raise ValueError(f"{file} is not a valid tokenizers file ({err}); download it again") from err
        info = _side_info(file.parent, backend.padding)
        # transformers pads and truncates per call; settings baked into tokenizer.json must not interfere.
        backend.no_padding()
        backend.no_truncation()
        pad = pad_token or info.pad_token
        if pad is None:
            raise ValueError(
                f"{file.parent} names no pad token (special_tokens_map.json, tokenizer_config.json or the "
                "padding section of tokenizer.json); pass pad_token=... or add it to tokenizer_config.json"
            )
        pad_id = backend.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"pad token {pad!r} of {file.parent} is not in its vocabulary")
        sep = sep_token or info.sep_token
        return cls(
            backend,
            context_length=context_length,
            pad_token_id=pad_id,
            sep_token_id=backend.token_to_id(sep) if sep is not None else None,
            clean=clean,
            strip_sep_token=strip_sep_token,
            padding_side=padding_side or info.padding_side,
            truncation_side=truncation_side or info.truncation_side,
            source=str(file),
        )

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary including added tokens."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _backend_for(self, context_length: int) -> tokenizers.Tokenizer:
        with self._lock:
            backend = self._configured.get(context_length)
            if backend is None:
                backend = type(self._backend).from_str(self._backend.to_str())
                backend.enable_truncation(
                    context_length, stride=0, strategy="longest_first", direction=self.truncation_side
                )
                backend.enable_padding(
                    direction=self.padding_side, pad_id=self.pad_token_id, length=context_length
                )
                self._configured[context_length] = backend
            return backend

    def encode(self, text: str) -> list[int]:
        """Ids of one cleaned text without special tokens, padding or truncation."""
        return self._backend.encode(clean_text(text, self.clean), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a row of ids (pad and other special tokens dropped by default)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Texts -> LongTensor [N, context_length]: cleaned, special tokens added, truncated, padded."""
        texts = _check_texts(texts)
        length = self.context_length if context_length is None else _check_length(context_length)
        if length < self.num_special_tokens:
            # tokenizers silently skips truncation then, and the rows would not fit.
            raise ValueError(
                f"context_length={length} cannot hold the {self.num_special_tokens} special tokens of {self.source}"
            )
        if not texts:
            return torch.zeros(0, length, dtype=torch.long)
        encodings = self._backend_for(length).encode_batch([clean_text(t, self.clean) for t in texts])
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)  # [N, length]
        if self.strip_sep_token:
            ids = ids.masked_fill(ids == self.sep_token_id, 0)
        return ids

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self.source!r}, context_length={self.context_length}, clean={self.clean!r}, "
            f"strip_sep_token={self.strip_sep_token})"
        )


_SPEC_KINDS = ("openai", "hf")
# open_clip text_cfg["tokenizer_kwargs"] keys this module implements; any other key is refused, not ignored.
_OPEN_CLIP_KWARGS = ("clean", "strip_sep_token")


@dataclass(frozen=True)
class TokenizerSpec:
    """A model's tokenizer as data. ``kind``: "openai" (clip.tokenizer's BPE) or "hf" (a tokenizer.json).

    ``hf_name``: the HF Hub repo the tokenizer files come from (OpenCLIP's ``hf_tokenizer_name``; "hf" only).
    ``clean``: OpenCLIP's cleaning mode; None means the kind's own ("lower" is OpenAI's fixed cleaning,
    "whitespace" is `HFTokenizer`'s default). ``strip_sep_token``: zero the sep ids (CLIPA; "hf" only).
    """

    kind: str = "openai"
    context_length: int = 77
    hf_name: str | None = None
    clean: str | None = None
    strip_sep_token: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _SPEC_KINDS:
            raise ValueError(f"tokenizer kind {self.kind!r} is unknown; use 'openai' or 'hf'")
        _check_length(self.context_length, "tokenizer context_length")
        if self.clean is not None:
            clean_text("", self.clean)
        if self.kind == "openai" and (
            self.clean not in (None, "lower") or self.strip_sep_token or self.hf_name
        ):
            raise ValueError(
                "an 'openai' tokenizer spec takes only context_length (OpenAI's BPE cleans one fixed way); "
                "use kind='hf' for hf_name, clean or strip_sep_token"
            )
        if not isinstance(self.strip_sep_token, bool):
            raise ValueError(f"strip_sep_token must be true or false, got {self.strip_sep_token!r}")

    @property
    def clean_mode(self) -> str:
        """The cleaning mode actually applied."""
        return self.clean or ("lower" if self.kind == "openai" else "whitespace")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenizerSpec:
        """Strict: an unknown key is an error naming it (a typo must not fall back to a default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown tokenizer spec keys {unknown}; known keys: {sorted(names)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TokenizerSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_open_clip_text_cfg(cls, text_cfg: Mapping[str, Any]) -> TokenizerSpec:
        """The spec of an OpenCLIP ``text_cfg`` (a model config's, or ``open_clip_config.json``'s).

        An ``hf_tokenizer_name`` makes it "hf" with that repo and the ``tokenizer_kwargs``; otherwise it is
        OpenAI's BPE. ``context_length`` defaults to 77, as in OpenCLIP.
        """
        context_length = text_cfg.get("context_length") or 77
        name = text_cfg.get("hf_tokenizer_name")
        kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
        if text_cfg.get("tokenizer_mode"):
            raise ValueError(f"OpenCLIP tokenizer_mode={text_cfg['tokenizer_mode']!r} is not supported")
        unknown = sorted(set(kwargs) - set(_OPEN_CLIP_KWARGS))
        if unknown:
            raise ValueError(
                f"OpenCLIP tokenizer_kwargs {unknown} are not supported (known: {_OPEN_CLIP_KWARGS})"
            )
        if not name:
            if kwargs:
                raise ValueError(
                    f"tokenizer_kwargs {sorted(kwargs)} without hf_tokenizer_name are not supported"
                )
            return cls(kind="openai", context_length=context_length)
        return cls(kind="hf", context_length=context_length, hf_name=name, **kwargs)

    def build(self, folder: str | Path | None = None) -> TextTokenizer:
        """The tokenizer; "hf" reads `folder` (holding tokenizer.json and its side files)."""
        if self.kind == "openai":
            return OpenAITokenizer(self.context_length)
        if folder is None:
            raise ValueError(
                f"the HF tokenizer {self.hf_name or ''} needs the folder holding its tokenizer.json; "
                f"fetch it with clip.hub.download_tokenizer({self.hf_name!r})"
            )
        return HFTokenizer.from_file(
            folder, self.context_length, clean=self.clean_mode, strip_sep_token=self.strip_sep_token
        )


def get_tokenizer(spec: TokenizerSpec, folder: str | Path | None = None) -> TextTokenizer:
    """`spec.build(folder)`: OpenAI's BPE for kind "openai", an `HFTokenizer` from `folder` for "hf"."""
    return spec.build(folder)
