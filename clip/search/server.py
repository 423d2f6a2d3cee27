"""`clip serve`: one HTML page and a small JSON API over an `Index` (Starlette behind uvicorn).

Endpoints (described at /openapi.json):

    GET  /                       the search page (static/index.html, no build step)
    GET  /api/search?q=&k=&offset=&target=    text query (target: images, or captions where the index has them)
    POST /api/search/image?k=&offset=&target= query by image: the body is the image file (or multipart field)
    GET  /api/thumb?path=[&t=]   a JPEG thumbnail (of a video: of its frame at t), cached in IDX/thumbs
    GET  /api/image?path=        the original file
    GET  /api/video?path=        an indexed video, with HTTP Range support (`clip.search.media`)
    GET  /api/info               index size, model and unreadable-file count
    POST /knn-service, POST /metadata, GET /indices-list    clip-retrieval's back-end protocol
                                 (`clip.search.retrieval_api`: its ClipClient and front end work against it)

Safety: a file is served only if its path is, character for character, a path the index holds (no path is
joined, normalised or decoded into the file system, so `../`, encoded and absolute paths fail the lookup), and
only while it is still the indexed file (`clip.search.guard`: links resolved at request time must stay inside
the indexed folders; size, mtime and, for originals, SHA-256 must match; the bytes must be an image).  Requests
naming another host are refused (DNS rebinding), no response may be framed, and slow clients are cut off.
Uploads are capped in bytes, pixels and decoding memory (`clip.preprocess.decode_cost`, checked before
decoding), at most `max_concurrent_decodes` images are decoded at once, non-images get a 415 with a message,
queries are capped in length, and a failing search answers 500 with a message while the server keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.resources
import io
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote

import anyio
from PIL import Image, ImageOps
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from clip.io import atomic_write_bytes
from clip.preprocess import MAX_DECODE_BYTES, decode_cost
from clip.search.guard import (
    FileChangedError,
    GuardMiddleware,
    allowed_host_names,
    check_unchanged,
    open_video,
    read_verified,
    timed_h11_protocol,
)
from clip.search.hits import Hit
from clip.search.index import Index
from clip.search.store import FileRecord, thumb_name

log = logging.getLogger("clip.search.server")
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around an uploaded file


@dataclass(frozen=True)
class ServerLimits:
    max_upload_bytes: int = 10 * 1024 * 1024
    max_upload_pixels: int = 50_000_000  # a 10 MB PNG can decode to gigabytes; refuse before decoding
    # Decoding + preprocessing memory per upload (pixels times a cost per mode: a 7000x7000 float TIFF of
    # 344 KB would take ~1.9 GB), and how many uploads and thumbnails are decoded at once.
    max_upload_decode_bytes: int = 512 * 1024 * 1024
    max_concurrent_decodes: int = 2
    header_timeout: float = 10.0  # seconds a client may take to send a request's headers
    body_timeout: float = 30.0  # seconds a client may take to send an upload
    max_query_chars: int = 1000
    max_k: int = 200
    max_results: int = 2000  # offset + k
    thumb_size: int = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Cache-Control": "no-store"})


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _page_params(request: Request, limits: ServerLimits) -> tuple[int, int]:
    k = _int_param(request, "k", 24, 1, limits.max_k)
    offset = _int_param(request, "offset", 0, 0, limits.max_results - k)
    return k, offset


def _shown(path: str) -> str:
    """`path` as JSON can carry it: bytes of a name that is not UTF-8 shown as U+FFFD (the URLs stay exact)."""
    return os.fsencode(path).decode("utf-8", "replace")


def _hit_json(index: Index, rank: int, hit: Hit) -> dict[str, Any]:
    """A result for the page; a hit with no servable file (a WebDataset sample of an index built from
    embeddings, a file gone) has no thumb or image URL."""
    info = index.file_info(hit.path)
    q = quote(os.fsencode(hit.path), safe="")  # the name's own bytes, so non-UTF-8 names round-trip
    if info is not None:  # a new URL for new content: a browser never shows a cached picture of old bytes
        q += f"&v={info.sha256[:16]}"
    if info is not None and info.is_video:  # a frame: its thumbnail, and the video to play from its time
        return {"rank": rank, "id": hit.id, "path": _shown(hit.path), "name": _shown(os.path.basename(hit.path)),
                "score": round(hit.score, 5), "time": hit.time, "width": info.width, "height": info.height,
                "thumb": f"api/thumb?path={q}&t={hit.time!r}", "image": None, "video": f"api/video?path={q}",
                **({"caption": hit.caption} if hit.caption is not None else {})}  # fmt: skip
    out = {
        "rank": rank,
        "id": hit.id,
        "path": _shown(hit.path),
        "name": _shown(os.path.basename(hit.path)),
        "score": round(hit.score, 5),
        "width": info.width if info else None,
        "height": info.height if info else None,
        "thumb": f"api/thumb?path={q}" if info else None,
        "image": f"api/image?path={q}" if info else None,
    }
    if hit.caption is not None:
        out["caption"] = hit.caption
    return out


def _page(
    index: Index, hits: list[Hit], k: int, offset: int, extra: dict[str, Any], t0: float
) -> JSONResponse:
    """hits: the top offset + k + 1 results; the extra one only tells whether a next page exists."""
    shown = hits[offset : offset + k]
    body = {
        **extra,
        "k": k,
        "offset": offset,
        "count": len(index),
        "has_more": len(hits) > offset + k,
        "results": [_hit_json(index, offset + i + 1, h) for i, h in enumerate(shown)],
        "milliseconds": round((time.perf_counter() - t0) * 1000, 1),
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


async def _capped_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload too large: {int(declared)} bytes, the limit is {limit}")
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"upload too large: over {limit} bytes")
    except TimeoutError:
        raise ApiError(408, f"upload too slow: not complete after {timeout:g} s") from None
    return bytes(body)


async def _upload_bytes(request: Request, limits: ServerLimits) -> bytes:
    """The uploaded image: the raw body, or the first file of a multipart form."""
    ctype = request.headers.get("content-type", "")
    multipart = ctype.startswith("multipart/form-data")
    limit = limits.max_upload_bytes + (MULTIPART_OVERHEAD if multipart else 0)
    body = await _capped_body(request, limit, limits.body_timeout)
    if not multipart:
        if not body:
            raise ApiError(400, "empty upload: send the image file as the request body")
        return body

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=10).parse()
    except Exception as err:  # noqa: BLE001 - any parse failure is the client's malformed form
        raise ApiError(400, f"malformed multipart upload: {err}") from None
    files = [v for v in form.values() if isinstance(v, UploadFile)]
    if not files:
        raise ApiError(400, "multipart upload holds no file field")
    data = await files[0].read()
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, f"upload too large: {len(data)} bytes, the limit is {limits.max_upload_bytes}")
    return data


def decode_upload(data: bytes, max_pixels: int, max_bytes: int = MAX_DECODE_BYTES) -> Image.Image:
    """Bytes -> decoded PIL image with EXIF orientation applied, or ApiError 413 / 415.

    Pixel count and decoding memory (by mode) are checked from the header, before anything is decoded.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise ApiError(
                413, f"image too large: {img.width}x{img.height} pixels, the limit is {max_pixels}"
            )
        cost = decode_cost(img.mode, img.width, img.height, exif=True)
        if cost > max_bytes:
            raise ApiError(
                413,
                f"image too large: {img.width}x{img.height} in mode {img.mode} needs ~{cost >> 20} MiB to "
                f"decode, the limit is {max_bytes >> 20} MiB",
            )
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # no copy unless the image must be turned
        return img
    except ApiError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow reports bad data with many exception types
        raise ApiError(
            415, f"not a readable image (JPEG, PNG, WebP, GIF, BMP or TIFF expected): {type(err).__name__}"
        ) from None


def make_thumbnail(data: bytes, size: int) -> bytes:
    """JPEG bytes of a thumbnail (longest side `size`, EXIF orientation applied) of the image file `data`."""
    img = decode_upload(data, max_pixels=1 << 62)  # an indexed file: it was decoded once already
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()


class SearchApp:
    """Request handlers bound to one index."""

    def __init__(self, index: Index, limits: ServerLimits) -> None:
        self.index = index
        self.limits = limits
        self.thumb_dir = index.thumb_dir
        self._decoding: asyncio.Semaphore | None = None  # made in the server's event loop, on first use

    async def _bounded(self, func: Any, *args: Any) -> Any:
        """Run `func(*args)` in a worker thread, at most `max_concurrent_decodes` at once (memory bound)."""
        if self._decoding is None:
            self._decoding = asyncio.Semaphore(self.limits.max_concurrent_decodes)
        async with self._decoding:
            return await run_in_threadpool(func, *args)

    async def page(self, request: Request) -> Response:
        html = importlib.resources.files("clip.search").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(
            html, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
        )

    async def info(self, request: Request) -> Response:
        index = self.index
        return JSONResponse({"count": len(index), "model": index.model_spec, "errors": len(index.errors()),
                             "kind": index.kind, "captions": index.has_captions})  # fmt: skip

    async def openapi(self, request: Request) -> Response:
        from clip.search.openapi import openapi_spec

        return JSONResponse(openapi_spec(self.limits))

    async def search_text(self, request: Request) -> Response:
        t0 = time.perf_counter()
        q = request.query_params.get("q", "")
        if not q.strip():
            return _error(400, "missing query: pass ?q=some+words")
        if len(q) > self.limits.max_query_chars:
            return _error(
                400, f"query too long: {len(q)} characters, the limit is {self.limits.max_query_chars}"
            )
        k, offset = _page_params(request, self.limits)
        target = self._target(request)
        hits = await run_in_threadpool(lambda: self.index.search_text(q, offset + k + 1, **target))
        return _page(self.index, hits, k, offset, {"query": q, "target": target.get("target", "images")}, t0)

    def _target(self, request: Request) -> dict[str, str]:
        """The search's `target` as keyword arguments: {} for images, {"target": "captions"}; else ApiError."""
        target = request.query_params.get("target") or "images"
        if target not in ("images", "captions"):
            raise ApiError(400, f"target must be images or captions, got {target[:40]!r}")
        if target == "images":
            return {}
        if not self.index.has_captions:
            raise ApiError(400, "this index holds no captions: target=captions needs an index built with "
                           "`clip index --from-embeddings DIR` from a `clip embed --text` job")  # fmt: skip
        return {"target": "captions"}

    async def search_image(self, request: Request) -> Response:
        t0 = time.perf_counter()
        k, offset = _page_params(request, self.limits)
        target = self._target(request)
        data = await _upload_bytes(request, self.limits)
        hits, shape = await self._bounded(self._search_upload, data, offset + k + 1, target)
        extra = {"query": {"image": shape, "bytes": len(data)}, "target": target.get("target", "images")}
        return _page(self.index, hits, k, offset, extra, t0)

    def _search_upload(self, data: bytes, k: int, target: dict[str, str]) -> tuple[list[Hit], str]:
        img = decode_upload(data, self.limits.max_upload_pixels, self.limits.max_upload_decode_bytes)
        return self.index.search_image(img, k, **target), f"{img.width}x{img.height}"

    def _indexed(self, request: Request) -> FileRecord:
        """The index record of ?path=..., compared as an exact string; anything else is a 404.

        The query is decoded by hand so that %-escaped bytes of a name that is not UTF-8 reach the lookup
        as Python holds such names (surrogate escapes), not replaced by U+FFFD.
        """
        query = parse_qs(request.scope["query_string"].decode("latin-1"), errors="surrogateescape")
        path = query.get("path", [""])[0]
        info = self.index.file_info(path) if path else None
        if info is None:
            raise ApiError(404, "not an indexed file")
        return info

    async def thumb(self, request: Request) -> Response:
        info = self._indexed(request)
        headers = {"Cache-Control": "private, max-age=86400"}
        if info.is_video:
            info = self._frame(info, request.query_params.get("t"))
        cached, data = await self.thumbnail(info)
        if data is None:
            return FileResponse(cached, media_type="image/jpeg", headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    async def thumbnail(self, info: FileRecord) -> tuple[Any, bytes | None]:
        """(cached thumbnail path, None) or (path, new JPEG bytes) of an indexed file; ApiError 404 unless the
        file is still the indexed one (`clip.search.guard`)."""
        if info.is_video:
            return await self._frame_thumbnail(info)
        roots = self.index.roots
        size = self.limits.thumb_size
        cached = self.thumb_dir / thumb_name(info.sha256, size)
        try:
            await run_in_threadpool(check_unchanged, info, roots)  # deleted or changed: no thumbnail either
            if cached.is_file():
                return cached, None
            original, _ = await run_in_threadpool(read_verified, info, roots)
            data = await self._bounded(make_thumbnail, original, size)
        except FileChangedError as err:
            raise ApiError(404, str(err)) from None
        except ApiError:
            raise ApiError(404, "indexed file is no longer a readable image") from None
        try:
            atomic_write_bytes(cached, data)
        except OSError as err:  # a read-only index still serves thumbnails, uncached
            log.warning("cannot cache thumbnail in %s: %s", self.thumb_dir, err)
        return cached, data

    def _frame(self, info: FileRecord, t: str | None) -> FileRecord:
        """The record of the indexed frame of video `info` at `t` seconds (default: its first); a time that is
        no indexed frame's is a 404, so thumbnails are cached for indexed frames only."""
        if t is None:
            return info
        try:
            wanted = float(t)
        except ValueError:
            raise ApiError(400, f"t must be a number of seconds, got {t[:40]!r}") from None
        times = self.index.frame_times(info.path)
        match = next((x for x in times if abs(x - wanted) <= 1e-6), None)
        if match is None:
            raise ApiError(404, "no indexed frame of this video at that time")
        return dataclasses.replace(info, time=match)

    async def _frame_thumbnail(self, info: FileRecord) -> tuple[Any, bytes | None]:
        """`thumbnail` for a video frame: decoded at its time from the checked descriptor, cached by time."""
        from clip.search.media import frame_thumbnail

        size = self.limits.thumb_size
        cached = self.thumb_dir / f"{info.sha256}-{size}-t{round(info.time * 1000)}.jpg"
        try:
            fd, _ = await run_in_threadpool(open_video, info, self.index.roots)
        except FileChangedError as err:
            raise ApiError(404, str(err)) from None
        try:
            if cached.is_file():
                return cached, None
            data = await self._bounded(frame_thumbnail, fd, info.time, size)
        except Exception:  # noqa: BLE001 - FFmpeg reports damage with many exception types
            raise ApiError(404, "indexed video's frame could not be decoded") from None
        finally:
            os.close(fd)
        try:
            atomic_write_bytes(cached, data)
        except OSError as err:
            log.warning("cannot cache thumbnail in %s: %s", self.thumb_dir, err)
        return cached, data

    async def video(self, request: Request) -> Response:
        """An indexed video's bytes, whole or one Range (206), while it is still the indexed file."""
        from clip.search.media import video_response

        info = self._indexed(request)
        if not info.is_video:
            raise ApiError(404, "not an indexed video")
        try:
            fd, media_type = await run_in_threadpool(open_video, info, self.index.roots)
        except FileChangedError as err:
            raise ApiError(404, str(err)) from None
        return video_response(
            fd, info, media_type, request.headers.get("range"), request.headers.get("if-range")
        )

    async def image(self, request: Request) -> Response:
        info = self._indexed(request)
        if info.is_video:  # never read a whole video into memory: its bytes come from api/video
            raise ApiError(404, "an indexed video: fetch it from api/video")
        try:
            data, media_type = await run_in_threadpool(read_verified, info, self.index.roots)
        except FileChangedError as err:
            raise ApiError(404, str(err)) from None
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})


# The page loads nothing from elsewhere: scripts and styles inline, images from this server only.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob:; "
    "media-src 'self'; connect-src 'self'"
)


def _guard(handler: Any) -> Any:
    """Turn ApiError into its status, and any other failure into a 500 with a message (the server lives on)."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as err:
            return _error(err.status, err.message)
        except Exception as err:  # noqa: BLE001 - one failing query must not take the page down
            log.exception("request %s failed", request.url.path)
            return _error(500, f"search failed: {type(err).__name__}: {err}")

    return wrapped


def create_app(
    index: Index,
    limits: ServerLimits | None = None,
    *,
    bind_host: str = "127.0.0.1",
    allowed_hosts: Iterable[str] = (),
    index_name: str | None = None,
    cors_origins: Iterable[str] = (),
) -> Starlette:
    """The ASGI app serving `index`, answering requests whose Host is an IP address, localhost, `bind_host`
    or one of `allowed_hosts` ("*": any).  It also speaks clip-retrieval's back-end protocol
    (`clip.search.retrieval_api`) for the index named `index_name` (default: its folder's name); pages of
    `cors_origins` (none by default) may call the API from the browser (clip-retrieval's front end)."""
    from clip.search.retrieval_api import RetrievalApi, cors_middleware

    h = SearchApp(index, limits or ServerLimits())
    knn = RetrievalApi(h, index_name or default_index_name(index))
    routes = [
        *knn.routes(_guard),
        Route("/", _guard(h.page), methods=["GET"]),
        Route("/api/search", _guard(h.search_text), methods=["GET"]),
        Route("/api/search/image", _guard(h.search_image), methods=["POST"]),
        Route("/api/thumb", _guard(h.thumb), methods=["GET"]),
        Route("/api/image", _guard(h.image), methods=["GET"]),
        Route("/api/video", _guard(h.video), methods=["GET"]),
        Route("/api/info", _guard(h.info), methods=["GET"]),
        Route("/openapi.json", _guard(h.openapi), methods=["GET"]),
    ]
    names = allowed_host_names(bind_host, allowed_hosts)
    middleware = [Middleware(GuardMiddleware, allowed_names=names), *cors_middleware(cors_origins)]
    return Starlette(routes=routes, middleware=middleware)


def default_index_name(index: Index) -> str:
    """The name clip-retrieval's clients use for the index (`indice_name`): its folder's name."""
    return os.path.basename(os.path.realpath(index.root)) or "index"


def server_config(
    index: Index,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServerLimits | None = None,
    allowed_hosts: Iterable[str] = (),
    index_name: str | None = None,
    cors_origins: Iterable[str] = (),
    **uvicorn_options: Any,
) -> Any:
    """The `uvicorn.Config` that `serve` runs: the app, the Host allow-list and the slow-client timeout."""
    import uvicorn

    limits = limits or ServerLimits()
    app = create_app(index, limits, bind_host=host, allowed_hosts=allowed_hosts, index_name=index_name,
                     cors_origins=cors_origins)  # fmt: skip
    options = {"log_level": "info", "timeout_keep_alive": 5, **uvicorn_options}
    return uvicorn.Config(
        app, host=host, port=port, http=timed_h11_protocol(limits.header_timeout), **options
    )


def serve(
    index: Index,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServerLimits | None = None,
    allowed_hosts: Iterable[str] = (),
    index_name: str | None = None,
    cors_origins: Iterable[str] = (),
) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.Server(server_config(index, host, port, limits, allowed_hosts, index_name, cors_origins)).run()
