"""Typed, validated training configuration: four frozen groups that round-trip through JSON.

`TrainConfig(data=DataConfig(...), model=ModelSpec(...), optim=OptimConfig(...), run=RunConfig(...))` is what
`clip.train.train` takes and what `clip train` builds from its flags (one flag per field, same name with dashes).
The resolved config is written to `OUT/config.json` and into every checkpoint (`"args"`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from clip.runtime import TRAIN_PRECISIONS as PRECISIONS  # one vocabulary: clip.runtime

LOSSES = ("clip", "siglip")


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from and how they are batched.

    train_data: one source, or several joined with "::" (mixed with `train_data_weights`). A source is a CSV/TSV
        file, a folder of images with same-named .txt captions, or WebDataset shards ('shards/{000000..000099}.tar').
    batch_size: samples per process per optimizer step (per micro-batch with `OptimConfig.accum_freq`).
    train_num_samples: epoch length in samples (WebDataset; for map-style data it defaults to the data set size).
    workers: DataLoader processes per rank (0 = load in the main process). Map-style data gives the same batches
        for any number of workers; WebDataset splits shards over ranks x workers, so its order depends on both.
    """

    train_data: str | None = None
    train_data_weights: tuple[float, ...] | None = None
    csv_img_key: str = "filepath"
    csv_caption_key: str = "caption"
    csv_separator: str | None = None  # None: tab for .tsv/.tab files, comma otherwise
    batch_size: int = 64
    workers: int = 4
    train_num_samples: int | None = None
    dataset_resampled: bool = False
    shuffle_buffer: int = 1000
    crop_scale: tuple[float, float] = (0.9, 1.0)
    val_data: str | None = None
    val_every: int = 0
    val_num_samples: int = 1000

    def __post_init__(self) -> None:
        _tuple_field(self, "train_data_weights")
        _tuple_field(self, "crop_scale")
        _positive(self, "batch_size", "shuffle_buffer", "val_num_samples")
        _non_negative(self, "workers", "val_every")
        if self.train_num_samples is not None and self.train_num_samples <= 0:
            raise ValueError(f"train_num_samples must be positive, got {self.train_num_samples}")
        if self.train_data_weights is not None:
            if any(not (w > 0 and math.isfinite(w)) for w in self.train_data_weights):
                raise ValueError(f"train_data_weights must be positive, got {self.train_data_weights}")
            n_sources = len(self.train_data.split("::")) if self.train_data else 0
            if len(self.train_data_weights) != n_sources:
                raise ValueError(
                    f"{len(self.train_data_weights)} train_data_weights for {n_sources} train_data source(s); "
                    "give one weight per '::'-separated source"
                )
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.val_every and not self.val_data:
            raise ValueError("val_every is set but val_data is not; give --val-data")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to train: a registry `name`, a JSON `config_path`, or `pretrained` weights to fine-tune.

    config_path: JSON with openai/CLIP's constructor arguments (embed_dim, image_resolution, vision_layers, ...,
        plus quick_gelu) or a `CLIPConfig.to_dict()`. Takes precedence over `name`.
    pretrained: anything `clip.load` reads (a released model name or a file); its config is used.
    context_length: stretch the pretrained text positions to this many (Long-CLIP's 248; `clip.longclip`).
    """

    name: str | None = "ViT-B/32"
    config_path: str | None = None
    pretrained: str | None = None
    context_length: int | None = None
    lock_image: bool = False
    lock_text: bool = False
    grad_checkpointing: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if not (self.name or self.config_path or self.pretrained):
            raise ValueError("no model: give a model name, a model config file or pretrained weights")
        if self.context_length is not None and not self.pretrained:
            raise ValueError(
                "context_length stretches pretrained text positions (give --pretrained); for a fresh model "
                "set context_length in its --model-config"
            )
        if self.lock_image and self.lock_text:
            raise ValueError("lock_image and lock_text together leave only the temperature to train")


@dataclass(frozen=True)
class OptimConfig:
    """Loss and optimisation.

    AdamW betas/eps default (None) to the CLIP paper's: (0.9, 0.98), 1e-6 for ViT image towers and
    (0.9, 0.999), 1e-8 for ResNets. `accum_freq` K keeps all K x batch negatives (features are cached, then
    recomputed with gradients one micro-batch at a time), so it equals one step with a K times larger batch.
    """

    loss: str | None = None  # None: the model's own (`default_loss`): siglip for a SigLIP model, else clip
    lr: float = 5e-4
    wd: float = 0.2
    warmup: int = 1000
    min_lr: float = 0.0
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    grad_clip_norm: float | None = None
    precision: str = "auto"
    accum_freq: int = 1
    # The CLIP loss's label smoothing (0: CLIP's and open_clip's loss); the sigmoid loss has none.
    label_smoothing: float = 0.0
    # AdamW's fused kernel: None = on CUDA only, as open_clip. True also on CPU, where it updates all parameters
    # in one pass instead of one tensor op per parameter and statistic (the demo's step: 31 ms -> 7 ms).
    # It changes the update only by float rounding.
    fused: bool | None = None

    def __post_init__(self) -> None:
        if self.fused is not None and not isinstance(self.fused, bool):
            raise ValueError(f"fused must be true, false or null, got {self.fused!r}")
        if self.loss is not None and self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _positive(self, "lr", "accum_freq")
        _non_negative(self, "wd", "warmup", "min_lr")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.label_smoothing and self.loss == "siglip":
            raise ValueError("label_smoothing applies to the clip loss; the siglip loss has none (drop it)")
        _finite(self, "beta1", "beta2", "eps", "grad_clip_norm")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        for name in ("eps", "grad_clip_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class RunConfig:
    """Length, output, checkpoints and devices.

    Exactly one of `steps` and `epochs` sets the length (and the cosine schedule). `max_seconds` stops the run
    cleanly at a wall-clock budget (final checkpoint, metrics and curves are still written); the schedule keeps
    its planned length. `resume` is "latest" (OUT/checkpoints/latest.pt) or a checkpoint path.
    """

    output_dir: str = "runs/clip"
    steps: int | None = None
    epochs: int | None = None
    seed: int = 0
    save_every: int = 1000
    keep: int = 3
    resume: str | None = None
    max_seconds: float | None = None
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs (--steps N or --epochs N)")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        _positive(self, "save_every", "keep", "log_every")
        _finite(self, "max_seconds")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; see each group's docstring."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(steps=1000))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown groups or keys are an error (a typo must not pass silently)."""
        groups = {"data": DataConfig, "model": ModelSpec, "optim": OptimConfig, "run": RunConfig}
        unknown = sorted(set(d) - set(groups))
        if unknown:
            raise ValueError(f"unknown training config group(s) {unknown}; expected {sorted(groups)}")
        kwargs = {}
        for name, group in groups.items():
            values = dict(d.get(name, {}))
            known = {f.name for f in dataclasses.fields(group)}
            bad = sorted(set(values) - known)
            if bad:
                raise ValueError(
                    f"unknown key(s) {bad} in training config group {name!r}; expected {sorted(known)}"
                )
            kwargs[name] = group(**values)
        return cls(**kwargs)


def default_loss(model_config: Any) -> str:
    """The loss a model is trained with unless one is chosen: the sigmoid loss for a SigLIP-style model (its
    config has a logit bias: `CLIPConfig.sigmoid`), InfoNCE otherwise."""
    return "siglip" if model_config.sigmoid else "clip"


def _tuple_field(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if value is not None and not isinstance(value, tuple):
        object.__setattr__(obj, name, tuple(float(v) for v in value))


def _finite(obj: Any, *names: str) -> None:
    """Float fields that are set must be finite: inf or NaN would train to NaN and still exit 0."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


def _positive(obj: Any, *names: str) -> None:
    _finite(obj, *names)
    for name in names:
        if not getattr(obj, name) > 0:  # `not >` also refuses NaN
            raise ValueError(f"{name} must be positive, got {getattr(obj, name)}")


def _non_negative(obj: Any, *names: str) -> None:
    _finite(obj, *names)
    for name in names:
        if not getattr(obj, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(obj, name)}")
