"""Contrastive training: `train(TrainConfig(...))`, the function behind `clip train`.

Names are resolved lazily so that importing the package costs nothing until training starts.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train": "clip.train.loop",
    "TrainResult": "clip.train.loop",
    "TrainConfig": "clip.train.config",
    "DataConfig": "clip.train.config",
    "ModelSpec": "clip.train.config",
    "OptimConfig": "clip.train.config",
    "RunConfig": "clip.train.config",
    "clip_loss": "clip.train.loss",
    "siglip_loss": "clip.train.loss",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clip.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
