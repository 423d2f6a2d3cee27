"""Typed model configurations and the registry of named architectures.

A `CLIPConfig` carries every switch that changes the numbers a model computes: tower
sizes, resolution, the MLP activation (QuickGELU or exact GELU) and the image
normalisation.  It round-trips through JSON (`to_dict` / `from_dict`) and travels with
every checkpoint this project writes, so a file never depends on its name to be read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """The image tower.

    kind: "vit" (Vision Transformer, class-token pooled) or "resnet" (OpenAI's ModifiedResNet with
    attention pooling).  `layers` is an int for a ViT and four block counts for a ResNet; `width` is
    the transformer width for a ViT and the stem width for a ResNet (channels = 32 x width at the end).
    """

    kind: Literal["vit", "resnet"] = "vit"
    image_size: int = 224
    width: int = 768
    layers: int | tuple[int, int, int, int] = 12
    heads: int = 12
    patch_size: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ("vit", "resnet"):
            raise ValueError(f"vision kind must be 'vit' or 'resnet', got {self.kind!r}")
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.kind == "resnet":
            if not (isinstance(self.layers, tuple) and len(self.layers) == 4):
                raise ValueError(f"a ResNet image tower needs four block counts, got layers={self.layers!r}")
            if self.image_size % 32:
                raise ValueError(
                    f"a ResNet image tower needs image_size divisible by 32, got {self.image_size}"
                )
        else:
            if not isinstance(self.layers, int):
                raise ValueError(f"a ViT image tower needs an int layer count, got layers={self.layers!r}")
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
                )
        if (self.width * (32 if self.kind == "resnet" else 1)) % self.heads:
            raise ValueError(f"vision width {self.width} does not split into {self.heads} heads")


@dataclass(frozen=True)
class TextConfig:
    """The causal text Transformer, pooled at the end-of-text token (the highest token id)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} does not split into {self.heads} heads")


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP model: both towers, the joint embedding size, activation and preprocessing."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # OpenAI's released weights were trained with QuickGELU (x * sigmoid(1.702 x)); running them
    # with exact GELU silently costs accuracy (open_clip#771), so the switch travels with the weights.
    quick_gelu: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        """Inverse of `to_dict`; unknown keys are an error, not silently dropped."""
        d = dict(d)
        _check_keys(cls, d, "model config")
        vision = d.pop("vision", {})
        text = d.pop("text", {})
        if not isinstance(vision, VisionConfig):
            _check_keys(VisionConfig, vision, "vision config")
            vision = VisionConfig(**vision)
        if not isinstance(text, TextConfig):
            _check_keys(TextConfig, text, "text config")
            text = TextConfig(**text)
        return cls(vision=vision, text=text, **d)

    @classmethod
    def from_json(cls, s: str) -> CLIPConfig:
        return cls.from_dict(json.loads(s))

    @classmethod
    def from_openai_args(cls, d: dict[str, Any]) -> CLIPConfig:
        """Build from openai/CLIP's `CLIP.__init__` arguments (plus an optional `quick_gelu`).

        Keys: embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
        context_length, vocab_size, transformer_width, transformer_heads, transformer_layers.
        Head counts follow OpenAI's rule (width // 64) unless `vision_heads` is given.
        """
        known = {
            "embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
            "context_length", "vocab_size", "transformer_width", "transformer_heads",
            "transformer_layers", "quick_gelu", "vision_heads",
        }  # fmt: skip
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in model config; expected some of {sorted(known)}")
        layers = d["vision_layers"]
        resnet = isinstance(layers, (list, tuple))
        width = int(d["vision_width"])
        heads = d.get("vision_heads") or max(1, (width * 32 // 64) if resnet else width // 64)
        vision = VisionConfig(
            kind="resnet" if resnet else "vit",
            image_size=int(d["image_resolution"]),
            width=width,
            layers=tuple(layers) if resnet else int(layers),
            heads=int(heads),
            patch_size=int(d.get("vision_patch_size") or 32),
        )
        text = TextConfig(
            context_length=int(d.get("context_length", 77)),
            vocab_size=int(d.get("vocab_size", 49408)),
            width=int(d["transformer_width"]),
            heads=int(d["transformer_heads"]),
            layers=int(d["transformer_layers"]),
        )
        return cls(
            embed_dim=int(d["embed_dim"]), vision=vision, text=text, quick_gelu=d.get("quick_gelu", True)
        )


def _check_keys(cls: type, d: dict[str, Any], what: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {what}; expected some of {sorted(names)}")


def _vit(embed: int, size: int, layers: int, width: int, patch: int, tw: int, tl: int = 12) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig("vit", size, width, layers, max(1, width // 64), patch),
        text=TextConfig(width=tw, heads=max(1, tw // 64), layers=tl),
    )


def _rn(embed: int, size: int, layers: tuple[int, int, int, int], width: int, tw: int) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig("resnet", size, width, layers, width * 32 // 64),
        text=TextConfig(width=tw, heads=tw // 64, layers=12),
    )


def _small(
    kind: str, size: int, width: int, layers: Any, heads: int, patch: int, text: TextConfig
) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=text.width, vision=VisionConfig(kind, size, width, layers, heads, patch), text=text
    )


def registry() -> dict[str, CLIPConfig]:
    """All named architectures: OpenAI's nine releases, then small ones for CPU work and tests."""
    tiny_text = TextConfig(context_length=32, vocab_size=49408, width=64, heads=2, layers=2)
    small_text = TextConfig(context_length=32, vocab_size=49408, width=256, heads=4, layers=4)
    return {
        "RN50": _rn(1024, 224, (3, 4, 6, 3), 64, 512),
        "RN101": _rn(512, 224, (3, 4, 23, 3), 64, 512),
        "RN50x4": _rn(640, 288, (4, 6, 10, 6), 80, 640),
        "RN50x16": _rn(768, 384, (6, 8, 18, 8), 96, 768),
        "RN50x64": _rn(1024, 448, (3, 15, 36, 10), 128, 1024),
        "ViT-B/32": _vit(512, 224, 12, 768, 32, 512),
        "ViT-B/16": _vit(512, 224, 12, 768, 16, 512),
        "ViT-L/14": _vit(768, 224, 24, 1024, 14, 768),
        "ViT-L/14@336px": _vit(768, 336, 24, 1024, 14, 768),
        # Small configs for CPU training, the demo and tests.
        "ViT-Tiny/8@32px": _small("vit", 32, 64, 2, 2, 8, tiny_text),
        "RN-Tiny@32px": _small("resnet", 32, 8, (1, 1, 1, 1), 4, 32, tiny_text),
        "ViT-S/4@32px": _small("vit", 32, 256, 6, 4, 4, small_text),
        "RN-S@64px": _small("resnet", 64, 32, (1, 1, 2, 1), 16, 32, small_text),
    }


OPENAI_MODELS: tuple[str, ...] = (
    "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px",
)  # fmt: skip


def get_config(name: str) -> CLIPConfig:
    """The registered config called `name`; an unknown name lists the known ones."""
    configs = registry()
    if name not in configs:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(configs)}")
    return configs[name]
