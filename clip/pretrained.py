"""OpenCLIP's pretrained tags as data: (architecture, tag) -> where the weights are and how to preprocess.

The table is `clip/data/open_clip_pretrained.json`, regenerated from an installed open_clip by
`scripts/gen_open_clip_pretrained.py` (the numbers, names and URLs are OpenCLIP's, MIT License; see NOTICE).
It holds OpenCLIP's whole table, every tower kind included; whether an architecture builds here is the
model registry's business, not this module's. Nothing is read before the first call.

Interface:

* `list_pretrained(arch=None) -> list[tuple[str, str]]` - (architecture, tag) pairs in OpenCLIP's order.
* `get_pretrained_cfg(arch, tag) -> PretrainedCfg` - tags are normalised as OpenCLIP does (lower case,
  "-" -> "_"); an unknown tag is a ValueError listing that architecture's tags.
* `parse_pretrained_name("ViT-H-14/laion2b_s32b_b79k")` (or "ViT-H-14:laion2b_s32b_b79k") -> the pair, or
  None when the text does not name a known tag (OpenAI's "ViT-B/32" stays a plain model name).
* `PretrainedCfg`: ``hf_hub`` (`HubFile`: repo + file name) and ``url`` (`UrlFile`: URL, cache file name, the
  SHA256 it publishes), either may be None; ``quick_gelu``; ``preprocess`` (`PreprocessCfg`).
  `clip.hub.download_pretrained(arch, tag)` fetches the weights.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip.config import CLIP_MEAN, CLIP_STD

__all__ = [
    "DATA_FILE",
    "HubFile",
    "PreprocessCfg",
    "PretrainedCfg",
    "UrlFile",
    "get_pretrained_cfg",
    "list_pretrained",
    "normalize_tag",
    "parse_pretrained_name",
]

DATA_FILE = Path(__file__).resolve().parent / "data" / "open_clip_pretrained.json"
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "squash", "longest")
_HEX = re.compile(r"[0-9a-f]{8,64}")


@dataclass(frozen=True)
class PreprocessCfg:
    """The inference transform a checkpoint was trained with (OpenCLIP's `PreprocessCfg`, RGB only).

    ``size``: square side in pixels. ``resize_mode``: "shortest" (resize the short side to ``size``, centre
    crop), "squash" (resize both sides to ``size``, no crop) or "longest" (resize the long side, pad).
    ``mean`` / ``std``: per-channel, applied to [0, 1] pixel values.
    """

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"preprocess size must be a positive int, got {self.size!r}")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"preprocess {name} needs 3 values (RGB), got {value}")
            object.__setattr__(self, name, value)
        if any(v <= 0 for v in self.std):
            raise ValueError(f"preprocess std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessCfg:
        return cls(**_strict(cls, data, "preprocess"))


@dataclass(frozen=True)
class HubFile:
    """A file in an HF Hub model repo: ``repo`` ("org/name") and ``filename`` inside it."""

    repo: str
    filename: str


@dataclass(frozen=True)
class UrlFile:
    """A file at a plain URL; ``filename`` names it in the cache, ``sha256`` is the published digest.

    ``sha256`` is a whole hex digest, or its leading hex digits where only those are published (OpenCLIP's
    GitHub releases: 8), or None where nothing is published.
    """

    url: str
    filename: str
    sha256: str | None = None

    def __post_init__(self) -> None:
        if self.sha256 is not None and not _HEX.fullmatch(self.sha256):
            raise ValueError(
                f"sha256 of {self.url} must be 8 to 64 lower-case hex digits, got {self.sha256!r}"
            )


@dataclass(frozen=True)
class PretrainedCfg:
    """One pretrained tag: where its weights are and what reproduces its outputs."""

    arch: str
    tag: str
    hf_hub: HubFile | None
    url: UrlFile | None
    quick_gelu: bool
    preprocess: PreprocessCfg

    @property
    def name(self) -> str:
        """``arch/tag``, the spelling the CLI takes."""
        return f"{self.arch}/{self.tag}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "tag": self.tag,
            "hf_hub": dataclasses.asdict(self.hf_hub) if self.hf_hub else None,
            "url": dataclasses.asdict(self.url) if self.url else None,
            "quick_gelu": self.quick_gelu,
            "preprocess": self.preprocess.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PretrainedCfg:
        data = _strict(cls, data, "pretrained entry")
        hf_hub, url = data.get("hf_hub"), data.get("url")
        return cls(
            arch=data["arch"],
            tag=data["tag"],
            hf_hub=HubFile(**_strict(HubFile, hf_hub, "hf_hub")) if hf_hub else None,
            url=UrlFile(**_strict(UrlFile, url, "url")) if url else None,
            quick_gelu=bool(data.get("quick_gelu", False)),
            preprocess=PreprocessCfg.from_dict(data.get("preprocess", {})),
        )


def _strict(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; known keys: {sorted(names)}")
    return dict(data)


@functools.cache
def _table() -> dict[str, dict[str, PretrainedCfg]]:
    """The parsed data file, built on first use and shared (its values are frozen)."""
    payload = json.loads(DATA_FILE.read_text(encoding="utf-8"))
    return {
        arch: {
            tag: PretrainedCfg.from_dict({"arch": arch, "tag": tag, **entry}) for tag, entry in tags.items()
        }
        for arch, tags in payload["pretrained"].items()
    }


def normalize_tag(tag: str) -> str:
    """OpenCLIP's tag normalisation: lower case, "-" -> "_" ("LAION2B-S32B-B79K" -> "laion2b_s32b_b79k")."""
    return tag.lower().replace("-", "_")


def list_pretrained(arch: str | None = None) -> list[tuple[str, str]]:
    """(architecture, tag) pairs in OpenCLIP's order; only `arch`'s when given (empty if it has none)."""
    table = _table()
    archs = [arch] if arch is not None else list(table)
    return [(a, t) for a in archs for t in table.get(a, {})]


def get_pretrained_cfg(arch: str, tag: str) -> PretrainedCfg:
    """The entry for (`arch`, `tag`); ValueError naming the tags of `arch` (or close architectures)."""
    table = _table()
    tags = table.get(arch)
    if tags is None:
        close = difflib.get_close_matches(arch, list(table), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(
            f"no pretrained tags for architecture {arch!r}{hint}. `clip models` lists every architecture/tag"
        )
    entry = tags.get(normalize_tag(tag))
    if entry is None:
        raise ValueError(f"{arch} has no pretrained tag {tag!r}; its tags: {', '.join(tags)}")
    return entry


def parse_pretrained_name(name: str) -> tuple[str, str] | None:
    """("ViT-H-14", "laion2b_s32b_b79k") for "ViT-H-14/laion2b_s32b_b79k" or "ViT-H-14:laion2b_s32b_b79k".

    None unless the text before the last "/" or ":" is an architecture with the tag after it, so names such as
    OpenAI's "ViT-B/32" or a file path are left to the caller.
    """
    table = _table()
    for sep in (":", "/"):
        arch, found, tag = name.rpartition(sep)
        if found and normalize_tag(tag) in table.get(arch, {}):
            return arch, normalize_tag(tag)
    return None
