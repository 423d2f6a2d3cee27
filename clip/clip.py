"""openai/CLIP's `clip.clip` module, name for name: `from clip import clip` keeps working.

Research code imports more than `clip.load` from here: `_MODELS` (name -> URL), `_download(url, root)`,
`_transform(n_px)`, `_tokenizer`, `_convert_image_to_rgb`, `build_model`.  Each is the library's
own implementation under openai/CLIP's name and signature.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

from clip.hub import OPENAI_MODELS, available_models, download_url, model_url
from clip.loading import load
from clip.model import build_model  # noqa: F401  (openai/CLIP's clip.clip has it)
from clip.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from clip.tokenizer import SimpleTokenizer, default_tokenizer, tokenize  # noqa: F401
from clip.transforms import _convert_image_to_rgb  # noqa: F401

__all__ = ["available_models", "load", "tokenize"]


def __getattr__(name: str) -> Any:
    # Module attributes computed on first use, never at import (PEP 562).
    if name == "_MODELS":
        return {entry.name: model_url(entry) for entry in OPENAI_MODELS}
    if name == "_tokenizer":
        return default_tokenizer()
    raise AttributeError(f"module 'clip.clip' has no attribute {name!r}")


def _download(url: str, root: str = os.path.expanduser("~/.cache/clip")) -> str:
    """openai/CLIP's `_download`: fetch `url` into `root`, checked against the SHA256 in its path."""
    parts = urllib.parse.urlsplit(url).path.split("/")
    sha256 = parts[-2] if len(parts) >= 2 and len(parts[-2]) == 64 else None
    return str(download_url(url, parts[-1], sha256, root))


def _transform(n_px: int) -> Preprocess:
    """openai/CLIP's `_transform`: resize, centre crop, RGB, tensor, normalise (with `.transforms`)."""
    return Preprocess(n_px, CLIP_MEAN, CLIP_STD)
