"""Regenerate clip/data/open_clip_pretrained.json from an installed open_clip (its pretrained tag table).

For every (architecture, tag) of `open_clip.list_pretrained()` it records, as published by OpenCLIP (MIT
License; see NOTICE): the HF Hub repo and file, the URL, the SHA256 the URL publishes (OpenAI's CDN puts the
whole digest in the path; OpenCLIP's GitHub releases put its first 8 hex digits at the end of the file name;
other hosts publish none), whether the weights need QuickGELU, and the preprocessing OpenCLIP applies: the
tag's mean / std / interpolation / resize mode, at the image size of the architecture's config (OpenCLIP
resizes to the vision tower's own size, whatever the tag says).  `clip.pretrained` reads the file.

    .venv/bin/python scripts/gen_open_clip_pretrained.py
"""

from __future__ import annotations

import json
import posixpath
import re
import urllib.parse
from pathlib import Path
from typing import Any

import open_clip

DEST = Path(__file__).resolve().parent.parent / "clip" / "data" / "open_clip_pretrained.json"
# OpenCLIP's default file in a Hub repo when its table gives the repo only ("org/name/").
HF_DEFAULT_FILE = "open_clip_pytorch_model.bin"


def _published_sha256(url: str) -> str | None:
    """The digest (or digest prefix) a URL publishes, as open_clip's downloader reads it."""
    parts = urllib.parse.urlsplit(url)
    segments = parts.path.split("/")
    if parts.netloc == "openaipublic.azureedge.net" and re.fullmatch(r"[0-9a-f]{64}", segments[-2]):
        return segments[-2]
    if parts.netloc == "github.com" and segments[1:3] == ["mlfoundations", "open_clip"]:
        stem = posixpath.splitext(segments[-1])[0]
        prefix = stem.rsplit("-", 1)[-1]
        if re.fullmatch(r"[0-9a-f]{8,64}", prefix):
            return prefix
        raise ValueError(f"{url}: an OpenCLIP release file without a hash suffix")
    return None


def _hf_hub(value: str) -> dict[str, str] | None:
    if not value:
        return None
    # As open_clip splits it: the repo id before the last "/", the file name after it (empty: the default).
    repo, _, filename = value.rpartition("/")
    if repo.count("/") != 1:
        raise ValueError(f"hf_hub {value!r} is not 'org/name/' or 'org/name/file'")
    return {"repo": repo, "filename": filename or HF_DEFAULT_FILE}


def _url(value: str) -> dict[str, Any] | None:
    if not value:
        return None
    filename = posixpath.basename(urllib.parse.urlsplit(value).path)
    return {"url": value, "filename": filename, "sha256": _published_sha256(value)}


def build() -> dict[str, Any]:
    """The JSON payload for the installed open_clip."""
    table: dict[str, dict[str, Any]] = {}
    cache_names: dict[str, str] = {}
    for arch, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        known = {"url", "hf_hub", "mean", "std", "interpolation", "resize_mode", "quick_gelu"}
        if set(cfg) - known:
            raise ValueError(f"{arch}/{tag}: keys {sorted(set(cfg) - known)} unknown to this generator")
        size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
        if not isinstance(size, int):
            raise ValueError(f"{arch}: a non-square image size {size!r}")
        url = _url(cfg.get("url", ""))
        if url is not None:
            # URL files share one cache folder: two different URLs must not claim one file name.
            other = cache_names.setdefault(url["filename"], url["url"])
            if other != url["url"]:
                raise ValueError(f"{url['url']} and {other} share the file name {url['filename']}")
        table.setdefault(arch, {})[tag] = {
            "hf_hub": _hf_hub(cfg.get("hf_hub", "")),
            "url": url,
            "quick_gelu": bool(cfg.get("quick_gelu", False)),
            "preprocess": {
                "size": size,
                "mean": list(cfg["mean"]),
                "std": list(cfg["std"]),
                "interpolation": cfg["interpolation"],
                "resize_mode": cfg["resize_mode"],
            },
        }
    return {"source": f"open_clip {open_clip.__version__} pretrained.py", "pretrained": table}


def main() -> None:
    payload = build()
    # Keep OpenCLIP's order (architectures grouped by family): `clip models` lists them in it.
    DEST.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    count = sum(len(tags) for tags in payload["pretrained"].values())
    print(f"{count} tags of {len(payload['pretrained'])} architectures -> {DEST}")


if __name__ == "__main__":
    main()
