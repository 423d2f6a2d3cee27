"""Search your own images with CLIP: an incremental, crash-safe index queried by text or by image.

`Index` (in `clip.search.index`) is the Python API; `clip index`, `clip search` and `clip serve` are its
command-line and web fronts.  Names are resolved lazily so importing the package costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Index": "clip.search.index",
    "Hit": "clip.search.index",
    "ModelMismatchError": "clip.search.index",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clip.search' has no attribute {name!r}")
