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

The same downloader serves any (url, file name, SHA256 or None) through `download_url`; without a published
digest the transfer is still resumable and atomic and checked against Content-Length, and a file already in
place is trusted (it only got there complete).  On top of it:

* HF Hub files: `{$HF_ENDPOINT or https://huggingface.co}/{repo}/resolve/{revision or main}/{file}` (the
  endpoint is read as huggingface_hub reads it, so a mirror works), cached under
  `<root>/hf/{org}/{name}/` (`<root>/hf/{org}/{name}@{revision}/` for another revision); `root` defaults to
  `~/.cache/clip`.  `download_hf_file`, `download_hf_hub` (an OpenCLIP Hub folder: `open_clip_config.json`,
  `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`, and the tokenizer files the repo has) and
  `download_tokenizer` (tokenizer.json and its side files).  An optional file the repo lacks (HTTP 404) is
  skipped and remembered by an empty `.<file>.absent` marker, so a cached folder loads offline.
* OpenCLIP's pretrained tags (`clip.pretrained`): `download_pretrained(arch, tag)` fetches the weights
  from the HF Hub (trying OpenCLIP's safetensors alternative first) or from the tag's URL, verified by the
  digest the URL publishes (OpenAI's whole SHA256, or the 8-digit prefix of OpenCLIP's release files).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import posixpath
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from clip.files import sha256_file  # re-exported: part of this module's API
from clip.pretrained import HubFile, UrlFile, get_pretrained_cfg

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_HF_ENDPOINT",
    "DownloadNotFoundError",
    "OPENAI_MODELS",
    "PretrainedFile",
    "available_models",
    "base_url",
    "default_root",
    "download",
    "download_hf_file",
    "download_hf_hub",
    "download_pretrained",
    "download_tokenizer",
    "download_url",
    "get_pretrained",
    "hf_cache_dir",
    "hf_endpoint",
    "hf_file_url",
    "model_url",
    "parse_hf_hub_name",
    "sha256_file",
]

DEFAULT_BASE_URL = "https://openaipublic.azureedge.net/clip/models"
BASE_URL_ENV = "CLIP_MODEL_BASE_URL"

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60.0
# Pause before each retry after a failure that made no progress; its length is the number of retries.
# The first retry is immediate: a dropped connection is usually a one-off.
_RETRY_DELAYS_S: tuple[float, ...] = (0.0, 1.0, 3.0)
_HEX = re.compile(r"[0-9a-f]{8,64}")

# The HF Hub: huggingface_hub's variable and default, read on every call.
HF_ENDPOINT_ENV = "HF_ENDPOINT"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"


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
    mirror = _Mirror(BASE_URL_ENV, "<base>/<sha256>/<filename>")
    return _download(model_url(entry), folder / entry.filename, entry.sha256, progress, mirror)


def download_url(
    url: str,
    filename: str | None = None,
    sha256: str | None = None,
    root: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """A verified local copy of the file at `url`: `<root>/<filename>` (default: the URL's last segment).

    `sha256` is the whole hex digest, a published prefix of it (at least 8 hex digits), or None when
    nothing is published.  Errors are RuntimeErrors saying what to do; `DownloadNotFoundError` for a 404.
    """
    name = filename or posixpath.basename(urllib.parse.urlsplit(url).path)
    _check_relative(name, "file name")
    folder = Path(root).expanduser() if root is not None else default_root()
    return _download(url, folder / name, sha256, progress, None)


class DownloadNotFoundError(RuntimeError):
    """The server answered 404: the file does not exist there (optional files are skipped on this)."""


@dataclass(frozen=True)
class _Mirror:
    """The environment variable that points downloads at a mirror, and the layout a mirror must serve."""

    env: str
    layout: str


def _check_sha256(sha256: str | None, url: str) -> None:
    if sha256 is not None and not _HEX.fullmatch(sha256):
        raise ValueError(f"expected SHA256 of {url} must be 8 to 64 lower-case hex digits, got {sha256!r}")


def _verified(digest: str, sha256: str | None) -> bool:
    # A published prefix (OpenCLIP's release files carry 8 hex digits) verifies the digest it starts.
    return sha256 is None or digest.startswith(sha256)


def _download(url: str, target: Path, sha256: str | None, progress: bool, mirror: _Mirror | None) -> Path:
    """Bring `target` to a verified copy of `url` (the protocol in the module docstring)."""
    _check_sha256(sha256, url)
    if target.exists() and not target.is_file():
        raise RuntimeError(f"{target} exists and is not a regular file; move it away and retry")
    if target.is_file():
        if sha256 is None or _verified(sha256_file(target), sha256):
            return target
        # A truncated or altered file can never become valid: drop it so a failed re-fetch leaves no junk.
        warnings.warn(f"{target} fails its SHA256 check; downloading it again", stacklevel=3)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    got = _fetch(url, partial, sha256, target, progress, mirror)
    if not _verified(got, sha256):
        partial.unlink(missing_ok=True)
        hint = (
            f" If ${mirror.env} points at a mirror, check that it serves the original file."
            if mirror and os.environ.get(mirror.env)
            else ""
        )
        raise RuntimeError(
            f"SHA256 mismatch for {url}: expected {sha256}, got {got}. The download was deleted, "
            f"nothing was kept in {target.parent}.{hint}"
        )
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())  # as clip.io.atomic_path: the rename must not land before the bytes do
    os.replace(partial, target)  # atomic: the final path only ever holds a verified file
    return target


class _Dropped(Exception):
    """The transfer ended before the whole file arrived (or must restart); worth retrying."""


class _Complete(Exception):
    """The server says the partial file already holds the whole file (416 with a matching length)."""


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


def _fetch(
    url: str, partial_path: Path, sha256: str | None, target: Path, progress: bool, mirror: _Mirror | None
) -> str:
    """Bring `partial_path` to the full file, retrying dropped connections; return its SHA256 (hex)."""
    partial = _Partial(partial_path)
    if partial.size and sha256 is not None and _verified(partial.hasher.hexdigest(), sha256):
        return (
            partial.hasher.hexdigest()
        )  # an earlier run finished the transfer but stopped before the rename
    reached = False  # whether the server ever answered: a host never reached means we are offline
    best, failures = partial.size, 0
    # `delay`: no bar at all when the host cannot be reached or the file is tiny.
    bar_options = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "delay": 0.2}
    with tqdm(total=None, desc=target.name, disable=not progress, **bar_options) as bar:
        while True:
            try:
                _fetch_once(url, partial, bar)
                return partial.hasher.hexdigest()
            except _Complete:
                return partial.hasher.hexdigest()
            except urllib.error.HTTPError as err:
                err.close()
                if err.code == 404:
                    raise DownloadNotFoundError(_http_error_message(url, err, target, mirror)) from err
                if err.code < 500:
                    raise RuntimeError(_http_error_message(url, err, target, mirror)) from err
                reached, error = True, err
            except urllib.error.URLError as err:
                if not reached:
                    raise RuntimeError(_offline_message(url, err, sha256, target, mirror)) from err
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
            # "bytes */<total>" equal to what we hold: the transfer ended just before the rename.
            total = (err.headers.get("Content-Range") or "").partition("/")[2].strip()
            err.close()
            if total == str(partial.size):
                raise _Complete() from err
            # The partial is longer than the file, so it cannot be a prefix of it.
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


def _offline_message(
    url: str, err: urllib.error.URLError, sha256: str | None, target: Path, mirror: _Mirror | None
) -> str:
    host = urllib.parse.urlsplit(url).netloc or url
    digest = f" (SHA256 {sha256})" if sha256 else ""
    hint = f", or set ${mirror.env} to a mirror that serves {mirror.layout}" if mirror else ""
    return (
        f"could not connect to {host} to download {url} ({err.reason}). This machine appears to be "
        f"offline. To use it without network access, place the file {target.name}{digest} at {target}{hint}."
    )


def _http_error_message(url: str, err: urllib.error.HTTPError, target: Path, mirror: _Mirror | None) -> str:
    if mirror is None:
        hint = "check the address"
    elif os.environ.get(mirror.env):
        hint = f"check that the mirror ${mirror.env}={os.environ[mirror.env]} serves {mirror.layout}"
    else:
        hint = f"set ${mirror.env} to a mirror"
    if err.code in (401, 403) and mirror is not None and mirror.env == HF_ENDPOINT_ENV:
        hint = (
            "the repo may be misspelled, private or gated (download it by hand and pass the folder); " + hint
        )
    return f"{url} answered HTTP {err.code} {err.reason}; {hint}, or place the file at {target}."


# --- HF Hub --------------------------------------------------------------------------------------------------

HF_HUB_PREFIX = "hf-hub:"
HF_CONFIG_FILE = "open_clip_config.json"
# OpenCLIP's Hub weights, in the order it prefers them.
HF_WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# "org/name", or a legacy name without an org ("bert-base-uncased", which the Hub still resolves).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_HF_MIRROR = _Mirror(HF_ENDPOINT_ENV, "<endpoint>/<repo>/resolve/<revision>/<file>")


def hf_endpoint() -> str:
    """The HF Hub base URL: $HF_ENDPOINT if set (read on every call, as huggingface_hub does), else the Hub."""
    return (os.environ.get(HF_ENDPOINT_ENV) or DEFAULT_HF_ENDPOINT).rstrip("/")


def parse_hf_hub_name(name: str) -> str | None:
    """ "org/repo" for "hf-hub:org/repo"; None for names without the prefix; ValueError for a bad repo id."""
    if not name.startswith(HF_HUB_PREFIX):
        return None
    repo_id = name[len(HF_HUB_PREFIX) :].strip("/")
    _check_repo_id(repo_id)
    return repo_id


def _check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise ValueError(
            f"{repo_id!r} is not an HF Hub repo id; expected 'org/name', e.g. 'laion/CLIP-ViT-B-32-laion2B-s34B-b79K'"
        )


def _check_relative(name: str, what: str) -> None:
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{what} {name!r} must be a relative path without '.', '..' or empty parts")


def hf_file_url(repo_id: str, filename: str, revision: str | None = None) -> str:
    """`{endpoint}/{repo}/resolve/{revision or main}/{file}`, quoted as huggingface_hub quotes it."""
    _check_repo_id(repo_id)
    _check_relative(filename, "file name")
    revision = urllib.parse.quote(revision or "main", safe="")
    return f"{hf_endpoint()}/{repo_id}/resolve/{revision}/{urllib.parse.quote(filename)}"


def hf_cache_dir(repo_id: str, revision: str | None = None, root: str | Path | None = None) -> Path:
    """`<root>/hf/{org}/{name}` for the main revision, `<root>/hf/{org}/{name}@{revision}` for another."""
    _check_repo_id(repo_id)
    base = Path(root).expanduser() if root is not None else default_root()
    folder = base / "hf" / repo_id
    if revision not in (None, "main"):
        folder = folder.with_name(f"{folder.name}@{urllib.parse.quote(revision, safe='')}")
    return folder


def download_hf_file(
    repo_id: str,
    filename: str,
    revision: str | None = None,
    root: str | Path | None = None,
    progress: bool = True,
    sha256: str | None = None,
) -> Path:
    """A local copy of one file of an HF Hub repo, in `hf_cache_dir(repo_id, revision, root)`.

    `DownloadNotFoundError` (naming the repo and the file) when the repo has no such file.
    """
    url = hf_file_url(repo_id, filename, revision)
    target = hf_cache_dir(repo_id, revision, root) / filename
    try:
        return _download(url, target, sha256, progress, _HF_MIRROR)
    except DownloadNotFoundError as err:
        raise DownloadNotFoundError(
            f"HF Hub repo {repo_id} (revision {revision or 'main'}) has no file {filename}: {err}"
        ) from err


def _absent_marker(folder: Path, filename: str) -> Path:
    return folder / f".{filename.replace('/', '__')}.absent"


def _optional_hf_file(
    repo_id: str, filename: str, revision: str | None, root: str | Path | None, progress: bool
) -> Path | None:
    """The file, or None when the repo lacks it (remembered, so the next call does not ask again)."""
    folder = hf_cache_dir(repo_id, revision, root)
    if (folder / filename).is_file():
        return folder / filename
    if _absent_marker(folder, filename).exists():
        return None
    try:
        return download_hf_file(repo_id, filename, revision, root, progress)
    except DownloadNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
        _absent_marker(folder, filename).touch()
        return None


def download_hf_hub(
    repo_id: str, root: str | Path | None = None, revision: str | None = None, progress: bool = True
) -> Path:
    """An OpenCLIP Hub repo as a local folder: `open_clip_config.json`, its weights, its tokenizer files.

    `repo_id` is "org/name" (or "hf-hub:org/name"). The weights are `open_clip_model.safetensors`, else
    `open_clip_pytorch_model.bin`; `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`
    are fetched when the repo has them. Returns the folder.
    """
    repo_id = parse_hf_hub_name(repo_id) or repo_id
    folder = hf_cache_dir(repo_id, revision, root)
    try:
        download_hf_file(repo_id, HF_CONFIG_FILE, revision, root, progress)
    except DownloadNotFoundError as err:
        raise DownloadNotFoundError(
            f"{err} (hf-hub: names an OpenCLIP Hub repo, which holds {HF_CONFIG_FILE} beside its weights)"
        ) from err
    # The first weights file found wins (a generator: the .bin is not asked for when safetensors exist).
    found = (_optional_hf_file(repo_id, name, revision, root, progress) for name in HF_WEIGHTS_FILES)
    if not any(path is not None for path in found):
        raise DownloadNotFoundError(
            f"HF Hub repo {repo_id} (revision {revision or 'main'}) has neither {' nor '.join(HF_WEIGHTS_FILES)}"
        )
    for name in TOKENIZER_FILES:
        _optional_hf_file(repo_id, name, revision, root, progress)
    return folder


def download_tokenizer(
    repo_id: str, root: str | Path | None = None, revision: str | None = None, progress: bool = True
) -> Path:
    """The folder holding an HF tokenizer: `tokenizer.json` (required) and the side files the repo has.

    Besides `TOKENIZER_FILES` it fetches `config.json` when present: transformers picks a tokenizer class
    (and so its default special tokens) from its `model_type` when `tokenizer_config.json` names none.
    """
    repo_id = parse_hf_hub_name(repo_id) or repo_id
    try:
        download_hf_file(repo_id, TOKENIZER_FILES[0], revision, root, progress)
    except DownloadNotFoundError as err:
        raise DownloadNotFoundError(
            f"{err} Only tokenizers saved as tokenizer.json load without transformers; save one with "
            "transformers' AutoTokenizer.from_pretrained(name).save_pretrained(folder) and pass the folder"
        ) from err
    for name in (*TOKENIZER_FILES[1:], "config.json"):
        _optional_hf_file(repo_id, name, revision, root, progress)
    return hf_cache_dir(repo_id, revision, root)


# --- OpenCLIP's pretrained tags ------------------------------------------------------------------------------


def _safetensors_alternative(filename: str) -> str | None:
    """OpenCLIP's rule: look for a .safetensors twin of a pickled Hub file first."""
    if filename == HF_WEIGHTS_FILES[1]:
        return HF_WEIGHTS_FILES[0]
    stem, ext = posixpath.splitext(filename)
    return stem + ".safetensors" if ext in (".bin", ".pth") else None


def _cached_tag_file(source: HubFile | UrlFile, root: str | Path | None) -> Path | None:
    if isinstance(source, UrlFile):
        path = (Path(root).expanduser() if root is not None else default_root()) / source.filename
        ok = path.is_file() and (source.sha256 is None or _verified(sha256_file(path), source.sha256))
        return path if ok else None
    folder = hf_cache_dir(source.repo, None, root)
    names = [n for n in (_safetensors_alternative(source.filename), source.filename) if n]
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _fetch_tag_file(source: HubFile | UrlFile, root: str | Path | None, progress: bool) -> Path:
    if isinstance(source, UrlFile):
        url = source.url
        if url.startswith(DEFAULT_BASE_URL + "/"):  # OpenAI's CDN: honour $CLIP_MODEL_BASE_URL, as `download`
            url = base_url() + url[len(DEFAULT_BASE_URL) :]
        return download_url(url, source.filename, source.sha256, root, progress)
    alternative = _safetensors_alternative(source.filename)
    found = _optional_hf_file(source.repo, alternative, None, root, progress) if alternative else None
    return found or download_hf_file(source.repo, source.filename, None, root, progress)


def download_pretrained(
    arch: str, tag: str, root: str | Path | None = None, progress: bool = True, prefer: str = "hf"
) -> Path:
    """The weights file of OpenCLIP's (`arch`, `tag`), downloaded if needed (see `clip.pretrained`).

    A file already in the cache is used whichever source it came from; otherwise `prefer` ("hf", OpenCLIP's
    default, or "url") picks the source to fetch from when a tag has both. Unknown names raise ValueError
    listing the tags.
    """
    if prefer not in ("hf", "url"):
        raise ValueError(f"prefer={prefer!r}; use 'hf' or 'url'")
    cfg = get_pretrained_cfg(arch, tag)
    sources = [s for s in (cfg.hf_hub, cfg.url) if s is not None]
    if prefer == "url":
        sources.reverse()
    if not sources:
        raise ValueError(f"{cfg.name} has neither an HF Hub file nor a URL")
    for source in sources:
        if (cached := _cached_tag_file(source, root)) is not None:
            return cached
    return _fetch_tag_file(sources[0], root, progress)
