"""Typed model configurations.

A `CLIPConfig` carries every switch that changes the numbers a model computes: tower sizes,
resolution, the MLP activation, the towers' pooling and normalisation options, and the image
normalisation.  It round-trips through JSON (`to_dict` / `from_dict`) and travels with every
checkpoint this project writes, so a file never depends on its name to be read.

Option names follow OpenCLIP's model configs where OpenCLIP has the option (`mlp_ratio`,
`ls_init_value`, `no_ln_pre`, `pool_type`, `final_ln_after_pool`, `no_causal_mask`, `eos_id`,
`proj_bias`), so its JSON files map field for field.  The named architectures live in
`clip.registry`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

# OpenAI's image normalisation (per RGB channel, on 0..1 pixels): the one definition in the package.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

VisionPool = Literal["tok", "avg", "map"]
TextPool = Literal["argmax", "eos", "first", "last"]
GeluApprox = Literal["none", "tanh"]


def _check_int(what: str, value: Any, minimum: int = 1) -> None:
    # bool is an int subclass: `embed_dim: true` must not become 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


def _check_float(what: str, value: Any, positive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")


def _check_choice(what: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@dataclass(frozen=True)
class VisionConfig:
    """The image tower.

    kind: "vit" (Vision Transformer) or "resnet" (OpenAI's ModifiedResNet with attention pooling).
    `layers` is an int for a ViT and four block counts for a ResNet; `width` is the transformer
    width for a ViT and the stem width for a ResNet (channels = 32 x width at the end).  `heads` is
    the head count (OpenCLIP configs give `head_width`; heads = width // head_width).

    ViT options (defaults are OpenAI's): `mlp_ratio` (MLP hidden = int(width * mlp_ratio)),
    `ls_init_value` (layer scale, None = off), `no_ln_pre`, `pool_type` ("tok": class token,
    "avg": mean of the patch tokens, "map": SigLIP's attention-pool head), `final_ln_after_pool`,
    `class_token` (SigLIP has none), `patch_bias` (bias on the patch conv), `proj` (a final
    [width, embed_dim] projection; SigLIP has none), `norm_eps`, `gelu_approximate` (used when the
    model does not run QuickGELU). `conv_stem`: channel widths of 3x3 stride-2 convolutions that replace the
    patch conv ("early convolutions", Xiao et al. 2021; one per halving, so 2 ** len == patch_size), then a 1x1
    conv to the width; empty = the patch conv (every published CLIP).
    """

    kind: Literal["vit", "resnet"] = "vit"
    image_size: int = 224
    width: int = 768
    layers: int | tuple[int, int, int, int] = 12
    heads: int = 12
    patch_size: int = 32
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None
    no_ln_pre: bool = False
    pool_type: VisionPool = "tok"
    final_ln_after_pool: bool = False
    class_token: bool = True
    patch_bias: bool = False
    proj: bool = True
    norm_eps: float = 1e-5
    gelu_approximate: GeluApprox = "none"
    conv_stem: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("vision kind", self.kind, ("vit", "resnet"))
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.conv_stem, list):
            object.__setattr__(self, "conv_stem", tuple(self.conv_stem))
        self._check_conv_stem()
        for name in ("image_size", "width", "heads", "patch_size"):
            _check_int(f"vision {name}", getattr(self, name))
        _check_float("vision mlp_ratio", self.mlp_ratio)
        _check_float("vision norm_eps", self.norm_eps)
        if self.ls_init_value is not None:
            _check_float("vision ls_init_value", self.ls_init_value)
        _check_choice("vision pool_type", self.pool_type, ("tok", "avg", "map"))
        _check_choice("vision gelu_approximate", self.gelu_approximate, ("none", "tanh"))
        if self.kind == "resnet":
            if not (isinstance(self.layers, tuple) and len(self.layers) == 4):
                raise ValueError(f"a ResNet image tower needs four block counts, got layers={self.layers!r}")
            for n in self.layers:
                _check_int("ResNet block count", n)
            if self.image_size % 32:
                raise ValueError(
                    f"a ResNet image tower needs image_size divisible by 32, got {self.image_size}"
                )
        else:
            _check_int("ViT layers", self.layers)
            # SigLIP towers (no class token) may leave a remainder: SO400M/14 at 384 px runs 27 x 27 patches,
            # its patch conv dropping the last 6 pixels, as timm and Hugging Face run it.
            if self.image_size % self.patch_size and self.class_token:
                raise ValueError(
                    f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
                )
            if self.pool_type == "tok" and not self.class_token:
                raise ValueError("pool_type 'tok' needs a class token; use 'avg' or 'map'")
        if (self.width * (32 if self.kind == "resnet" else 1)) % self.heads:
            raise ValueError(f"vision width {self.width} does not split into {self.heads} heads")

    def _check_conv_stem(self) -> None:
        if not isinstance(self.conv_stem, tuple):
            raise ValueError(f"vision conv_stem must be a list of channel widths, got {self.conv_stem!r}")
        for c in self.conv_stem:
            _check_int("vision conv_stem width", c)
        if self.conv_stem and (self.kind != "vit" or 2 ** len(self.conv_stem) != self.patch_size):
            raise ValueError(
                f"vision conv_stem {list(self.conv_stem)} needs a ViT whose patch_size is 2 ** {len(self.conv_stem)}"
                f" (one stride-2 convolution per halving), got kind={self.kind!r}, patch_size={self.patch_size}"
            )

    @property
    def grid(self) -> int:
        """Patches per side of a ViT."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    """The text Transformer.

    OpenAI's tower is causal and pooled at the end-of-text token, which has the highest id
    (`pool_type="argmax"`).  Other options (OpenCLIP's names): `pool_type` "eos" (first position
    holding `eos_id`), "first", "last"; `no_causal_mask` (bidirectional attention); `proj_bias`
    (the projection is an `nn.Linear` with bias); `mlp_ratio`, `ls_init_value`, `norm_eps`,
    `gelu_approximate`.  `hf_tokenizer_name` / `tokenizer_kwargs` name the tokenizer the weights
    were trained with (None: OpenAI's BPE).
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None
    pool_type: TextPool = "argmax"
    eos_id: int | None = None
    no_causal_mask: bool = False
    proj_bias: bool = False
    norm_eps: float = 1e-5
    gelu_approximate: GeluApprox = "none"
    hf_tokenizer_name: str | None = None
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("context_length", "vocab_size", "width", "heads", "layers"):
            _check_int(f"text {name}", getattr(self, name))
        _check_float("text mlp_ratio", self.mlp_ratio)
        _check_float("text norm_eps", self.norm_eps)
        if self.ls_init_value is not None:
            _check_float("text ls_init_value", self.ls_init_value)
        _check_choice("text pool_type", self.pool_type, ("argmax", "eos", "first", "last"))
        _check_choice("text gelu_approximate", self.gelu_approximate, ("none", "tanh"))
        if self.pool_type == "eos":
            if self.eos_id is None:
                raise ValueError("text pool_type 'eos' needs eos_id (the tokenizer's end-of-text id)")
            _check_int("text eos_id", self.eos_id, minimum=0)
        if not isinstance(self.tokenizer_kwargs, dict):
            raise ValueError(f"text tokenizer_kwargs must be a JSON object, got {self.tokenizer_kwargs!r}")
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} does not split into {self.heads} heads")

    @property
    def causal(self) -> bool:
        return not self.no_causal_mask

    @property
    def cut_after_eot(self) -> bool:
        """True when positions after the pooled token cannot change the features (causal, eot-pooled)."""
        return self.causal and self.pool_type in ("argmax", "eos")


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP model: both towers, the joint embedding size, activation, head and preprocessing.

    `quick_gelu` picks OpenAI's x * sigmoid(1.702 x) for both towers (OpenAI's released weights
    were trained with it; running them with exact GELU silently costs accuracy, open_clip#771);
    otherwise each tower runs `nn.GELU(approximate=tower.gelu_approximate)`.  `logit_bias` adds
    SigLIP's learned bias to the logits (a sigmoid model: probabilities are per-label sigmoids).
    `interpolation` and `resize_mode` describe the preprocessing the weights expect, as OpenCLIP's
    pretrained configs do ("shortest": resize the short side, centre crop; "squash": resize to a square).
    """

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    logit_bias: bool = False
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "squash"] = "shortest"

    def __post_init__(self) -> None:
        _check_int("embed_dim", self.embed_dim)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or len(value) != 3:
                raise ValueError(f"{name} must be three numbers (R, G, B), got {value!r}")
            for v in value:
                _check_float(name, v, positive=name == "std")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if not isinstance(self.quick_gelu, bool) or not isinstance(self.logit_bias, bool):
            raise ValueError("quick_gelu and logit_bias must be true or false")
        _check_choice("interpolation", self.interpolation, ("bicubic", "bilinear"))
        _check_choice("resize_mode", self.resize_mode, ("shortest", "squash"))
        if self.vision.kind == "vit" and not self.vision.proj and self.vision.width != self.embed_dim:
            raise ValueError(
                f"a ViT without projection needs width == embed_dim, got {self.vision.width} vs {self.embed_dim}"
            )

    @property
    def sigmoid(self) -> bool:
        """True for SigLIP-style models (logits through a sigmoid, not a softmax)."""
        return self.logit_bias

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> CLIPConfig:
        """A copy with top-level fields changed; `vision={...}` / `text={...}` change tower fields."""
        for tower in ("vision", "text"):
            if isinstance(changes.get(tower), dict):
                changes[tower] = dataclasses.replace(getattr(self, tower), **changes[tower])
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Any) -> CLIPConfig:
        """Inverse of `to_dict`; unknown keys and wrong types are an error, never silently dropped."""
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        _check_keys(cls, d, "model config")
        towers = {}
        for name, tower_cls in (("vision", VisionConfig), ("text", TextConfig)):
            sub = d.pop(name, {})
            if not isinstance(sub, tower_cls):
                if not isinstance(sub, dict):
                    raise ValueError(f"{name} config must be a JSON object, got {sub!r}")
                _check_keys(tower_cls, sub, f"{name} config")
                sub = tower_cls(**sub)
            towers[name] = sub
        return cls(**towers, **d)

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
        required = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "transformer_width",
                    "transformer_heads", "transformer_layers")  # fmt: skip
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(
                f"model config is missing {missing}; openai/CLIP's CLIP() needs {list(required)}"
            )
        layers = d["vision_layers"]
        resnet = isinstance(layers, (list, tuple))
        width = d["vision_width"]
        _check_int("vision_width", width)
        heads = d.get("vision_heads") or max(1, (width * 32 // 64) if resnet else width // 64)
        patch = d.get("vision_patch_size")
        vision = VisionConfig(
            kind="resnet" if resnet else "vit",
            image_size=d["image_resolution"],
            width=width,
            layers=tuple(layers) if resnet else layers,
            heads=heads,
            patch_size=32 if patch is None and resnet else patch,
        )
        text = TextConfig(
            context_length=d.get("context_length", 77),
            vocab_size=d.get("vocab_size", 49408),
            width=d["transformer_width"],
            heads=d["transformer_heads"],
            layers=d["transformer_layers"],
        )
        return cls(embed_dim=d["embed_dim"], vision=vision, text=text, quick_gelu=d.get("quick_gelu", True))


def _check_keys(cls: type, d: dict[str, Any], what: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {what}; expected some of {sorted(names)}")


def registry() -> dict[str, CLIPConfig]:
    """All named architectures (see `clip.registry`)."""
    from clip.registry import all_configs

    return all_configs()


def get_config(name: str) -> CLIPConfig:
    """The registered config called `name`; an unknown name lists the known ones."""
    from clip.registry import get

    return get(name)
