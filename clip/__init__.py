"""CLIP end to end: a drop-in for openai/CLIP's `clip` package, plus training, evaluation and search.

    import clip
    model, preprocess = clip.load("ViT-B/32", device="cpu")
    text = clip.tokenize(["a diagram", "a dog", "a cat"])

Names are resolved lazily (PEP 562) so `import clip` and `clip --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load": "clip.loading",
    "get_tokenizer": "clip.loading",
    "available_models": "clip.hub",
    "tokenize": "clip.tokenizer",
    "CLIP": "clip.model",
    "build_model": "clip.model",
    "CLIPConfig": "clip.config",
    "get_config": "clip.config",
    "image_transform": "clip.preprocess",
    "zero_shot_classifier": "clip.zeroshot",
    "Index": "clip.search.index",
    "clip_score": "clip.score",
    "optimize_for_cpu": "clip.cpu_inference",
    "feature_agreement": "clip.cpu_inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
