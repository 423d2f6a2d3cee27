"""OpenAI's released CLIP checkpoints as data, and a streamed, hashed, resumable, atomic downloader.

Nothing here touches the network until `download` is called for a named model.  The checkpoint list
(file names and SHA256 digests) is data published by OpenAI in openai/CLIP `clip/clip.py` (MIT License,
Copyright (c) 2021 OpenAI); the digest is also the URL path segment, so one value both locates and
verifies each file.

Download protocol, in order of what can go wrong:
- a cached `<root>/<file>` whose SHA256 matches is returned without any network access;
  one that fails its hash is deleted (with a warning) and fetched again;
- bytes are streamed into `<root>/<file>.partial`, hashed as they arrive; an existing `.partial` is
  resumed with an HTTP Range request, and a server that ignores Range (answers 200) restarts from zero;
- a connection dropped mid-transfer is retried, resuming each time; a host that cannot be reached at
  all fails fast with instructions for placing the file by hand;
- the whole file's SHA256 is checked before `os.replace` moves it into place, so the final path only
  ever holds a verified file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

__all__ = [
    "DEFAULT_BASE_URL",
    "OPENAI_MODELS",
    "PretrainedFile",
    "available_models",
    "base_url",
    "default_root",
    "download",
    "get_pretrained",
    "model_url",
    "sha256_file",
]

DEFAULT_BASE_URL = "https://openaipublic.azureedge.net/clip/models"
BASE_URL_ENV = "CLIP_MODEL_BASE_URL"

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60.0
# Pause before each retry after a failure that made no progress; its length is the number of retries.
# The first retry is immediate: a dropped connection is usually a one-off.
_RETRY_DELAYS_S: tuple[float, ...] = (0.0, 1.0, 3.0)


@dataclass(frozen=True)
class PretrainedFile:
    """One released checkpoint: registry name, file name on the server and in the cache, SHA256 (hex)."""

    name: str
    filename: str
    sha256: str


OPENAI_MODELS: tuple[PretrainedFile, ...] = (
    PretrainedFile("RN50", "RN50.pt", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"),
    PretrainedFile("RN101", "RN101.pt", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599"),
    PretrainedFile("RN50x4", "RN50x4.pt", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd"),
    PretrainedFile(
        "RN50x16", "RN50x16.pt", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa"
    ),
    PretrainedFile(
        "RN50x64", "RN50x64.pt", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c"
    ),
    PretrainedFile(
        "ViT-B/32", "ViT-B-32.pt", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
    ),
    PretrainedFile(
        "ViT-B/16", "ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
    ),
    PretrainedFile(
        "ViT-L/14", "ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"
    ),
    PretrainedFile(
        "ViT-L/14@336px",
        "ViT-L-14-336px.pt",
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
    ),
)


def available_models() -> list[str]:
    """Names of the downloadable checkpoints, in OpenAI's order."""
    return [entry.name for entry in OPENAI_MODELS]


def get_pretrained(name: str) -> PretrainedFile:
    """The registry entry called `name`; ValueError listing the available names otherwise."""
    for entry in OPENAI_MODELS:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown model {name!r}; available models: {', '.join(available_models())}")


def base_url() -> str:
    """The download base URL: $CLIP_MODEL_BASE_URL if set (read on every call), else OpenAI's CDN."""
    return (os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def model_url(entry: PretrainedFile) -> str:
    """`<base>/<sha256>/<filename>`, the layout of OpenAI's CDN (and of any mirror of it)."""
    return f"{base_url()}/{entry.sha256}/{entry.filename}"


def default_root() -> Path:
    """The cache folder shared with openai/CLIP: `~/.cache/clip`."""
    return Path("~/.cache/clip").expanduser()


def sha256_file(path: str | Path) -> str:
    """SHA256 (hex) of a file, read in chunks so that multi-GB checkpoints never sit in memory."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def download(
    name_or_entry: str | PretrainedFile, root: str | Path | None = None, progress: bool = True
) -> Path:
    """Return the path of a verified local copy of a checkpoint, downloading it if needed.

    `name_or_entry` is a name from `available_models()` or a `PretrainedFile`; `root` defaults to
    `~/.cache/clip`.  Raises ValueError for an unknown name and RuntimeError when the file cannot be
    fetched or fails its SHA256 check (the message says what to do).
    """
    entry = get_pretrained(name_or_entry) if isinstance(name_or_entry, str) else name_or_entry
    folder = Path(root).expanduser() if root is not None else default_root()
    target = folder / entry.filename
    if target.exists() and not target.is_file():
        raise RuntimeError(f"{target} exists and is not a regular file; move it away and retry")
    if target.is_file():
        if sha256_file(target) == entry.sha256:
            return target
        # A truncated or altered file can never become valid: drop it so a failed re-fetch leaves no junk.
        warnings.warn(f"{target} fails its SHA256 check; downloading it again", stacklevel=2)
        target.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    url = model_url(entry)
    partial = folder / (entry.filename + ".partial")
    got = _fetch(url, partial, entry, target, progress)
    if got != entry.sha256:
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"SHA256 mismatch for {url}: expected {entry.sha256}, got {got}. The download was deleted, "
            f"nothing was kept in {folder}. If ${BASE_URL_ENV} points at a mirror, check that it serves "
            f"the original file."
        )
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())  # as clip.io.atomic_path: the rename must not land before the bytes do
    os.replace(partial, target)  # atomic: the final path only ever holds a verified file
    return target


class _Dropped(Exception):
    """The transfer ended before the whole file arrived (or must restart); worth retrying."""


class _Partial:
    """The `.partial` file being written, with the running hash and size of its contents."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hasher = hashlib.sha256()
        self.size = 0
        if path.is_file():
            # Resuming: the digest must cover the bytes already on disk.
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK_BYTES):
                    self.hasher.update(chunk)
                    self.size += len(chunk)

    def restart(self) -> None:
        """Forget what was written: the next bytes are the start of the file."""
        self.path.write_bytes(b"")
        self.hasher = hashlib.sha256()
        self.size = 0

    def append(self, chunk: bytes) -> None:
        with open(self.path, "ab") as out:
            out.write(chunk)
        self.hasher.update(chunk)
        self.size += len(chunk)


def _fetch(url: str, partial_path: Path, entry: PretrainedFile, target: Path, progress: bool) -> str:
    """Bring `partial_path` to the full file, retrying dropped connections; return its SHA256 (hex)."""
    partial = _Partial(partial_path)
    if partial.size and partial.hasher.hexdigest() == entry.sha256:
        return entry.sha256  # an earlier run finished the transfer but stopped before the rename
    reached = False  # whether the server ever answered: a host never reached means we are offline
    best, failures = partial.size, 0
    # `delay`: no bar at all when the host cannot be reached or the file is tiny.
    bar_options = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "delay": 0.2}
    with tqdm(total=None, desc=entry.filename, disable=not progress, **bar_options) as bar:
        while True:
            try:
                _fetch_once(url, partial, bar)
                return partial.hasher.hexdigest()
            except urllib.error.HTTPError as err:
                err.close()
                if err.code < 500:
                    raise RuntimeError(_http_error_message(url, err, target)) from err
                reached, error = True, err
            except urllib.error.URLError as err:
                if not reached:
                    raise RuntimeError(_offline_message(url, err, entry, target)) from err
                error = err
            except (_Dropped, ConnectionError, TimeoutError, http.client.HTTPException) as err:
                reached, error = True, err
            # Count only failures that made no progress, so a slow, flaky link still finishes a big file
            # while a server that always fails at the same point is given up on.
            if partial.size > best:
                best, failures = partial.size, 0
                continue
            if failures >= len(_RETRY_DELAYS_S):
                raise RuntimeError(
                    f"downloading {url} failed {failures + 1} times in a row (last error: {error}). "
                    f"{partial.size} bytes are kept in {partial.path}; run again to resume."
                ) from error
            time.sleep(_RETRY_DELAYS_S[failures])
            failures += 1


def _fetch_once(url: str, partial: _Partial, bar: tqdm) -> None:
    """One HTTP request that appends the rest of the file to `partial`; _Dropped if it ends early."""
    headers = {"User-Agent": "clipforge"}
    if partial.size:
        headers["Range"] = f"bytes={partial.size}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and partial.size:
            # The partial is at least as long as the file, so it cannot be a prefix of it.
            err.close()
            partial.restart()
            raise _Dropped("server refused to resume (HTTP 416); restarting from zero") from err
        raise
    with response:
        total = _expected_total(response, partial)
        bar.reset(total=total)
        bar.update(partial.size)
        while chunk := response.read(_CHUNK_BYTES):
            partial.append(chunk)
            bar.update(len(chunk))
    # http.client returns a short body silently when the peer closes early: compare with the length.
    if total is not None and partial.size < total:
        raise _Dropped(f"connection closed after {partial.size} of {total} bytes")


def _expected_total(response: http.client.HTTPResponse, partial: _Partial) -> int | None:
    """Size of the whole file, after aligning `partial` with what the response body starts at."""
    length = response.headers.get("Content-Length")
    if response.getcode() == 206:
        # Content-Range: bytes <start>-<end>/<total or *>
        unit_range, _, total = response.headers.get("Content-Range", "").partition("/")
        start = unit_range.removeprefix("bytes ").partition("-")[0].strip()
        if start != str(partial.size):
            partial.restart()
            raise _Dropped(f"server resumed at byte {start or '?'}, not {partial.size}; restarting")
        if total.strip().isdigit():
            return int(total)
        return partial.size + int(length) if length and length.isdigit() else None
    # 200 (or a file:// mirror, which has no status): the body is the whole file whatever we asked for.
    if partial.size:
        partial.restart()
    return int(length) if length and length.isdigit() else None


def _offline_message(url: str, err: urllib.error.URLError, entry: PretrainedFile, target: Path) -> str:
    host = urllib.parse.urlsplit(url).netloc or url
    return (
        f"could not connect to {host} to download {url} ({err.reason}). This machine appears to be "
        f"offline. To use {entry.name} without network access, place the file {entry.filename} "
        f"(SHA256 {entry.sha256}) at {target}, or set ${BASE_URL_ENV} to a mirror that serves "
        f"<base>/<sha256>/<filename>."
    )


def _http_error_message(url: str, err: urllib.error.HTTPError, target: Path) -> str:
    mirror = os.environ.get(BASE_URL_ENV)
    hint = (
        f"check that the mirror ${BASE_URL_ENV}={mirror} serves <sha256>/<filename>"
        if mirror
        else f"set ${BASE_URL_ENV} to a mirror"
    )
    return f"{url} answered HTTP {err.code} {err.reason}; {hint}, or place the file at {target}."
