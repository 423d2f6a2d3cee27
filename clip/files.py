"""What counts as an image or a video file, and a file's SHA-256: one definition each for every command.

`clip train`, `clip eval`, `clip index`, `clip embed` and `clip filter` all see the same files in a folder.
"""

from __future__ import annotations

import hashlib
import os

# JPEG, PNG, WebP, GIF (first frame), BMP, TIFF, PPM: what Pillow decodes and photo folders hold.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".ppm"}
)
# Container extensions read as video (PyAV / FFmpeg demuxers). MPEG-TS (.ts) is left out: it is also TypeScript.
VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv"}
)
_HASH_BLOCK = 1 << 20


def is_image_name(path: str | os.PathLike) -> bool:
    """True when the file name has one of `IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def is_video_name(path: str | os.PathLike) -> bool:
    """True when the file name has one of `VIDEO_EXTENSIONS` (any case)."""
    return os.path.splitext(os.fspath(path))[1].lower() in VIDEO_EXTENSIONS


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB blocks so that multi-GB files never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()
