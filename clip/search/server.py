"""`clip serve`: one HTML page and a small JSON API over an `Index` (Starlette behind uvicorn).

Endpoints (described at /openapi.json):

    GET  /                       the search page (static/index.html, no build step)
    GET  /api/search?q=&k=&offset=    text query
    POST /api/search/image?k=&offset= query by image: the body is the image file (or multipart field)
    GET  /api/thumb?path=        a JPEG thumbnail, generated on first request and cached in IDX/thumbs
    GET  /api/image?path=        the original file
    GET  /api/info               index size, model and unreadable-file count

Safety: a file is served only if its path is, character for character, a path the index holds (no path is
joined, normalised or decoded into the file system, so `../`, encoded and absolute paths fail the lookup).
Uploads are capped in bytes and pixels, non-images get a 415 with a message, queries are capped in length, and
a failing search answers 500 with a message while the server keeps serving.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageOps
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from clip.io import atomic_write_bytes
from clip.search.index import Hit, Index

log = logging.getLogger("clip.search.server")
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around an uploaded file


@dataclass(frozen=True)
class ServerLimits:
    max_upload_bytes: int = 10 * 1024 * 1024
    max_upload_pixels: int = 50_000_000  # a 10 MB PNG can decode to gigabytes; refuse before decoding
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


def _hit_json(index: Index, rank: int, hit: Hit) -> dict[str, Any]:
    info = index.file_info(hit.path)
    q = quote(hit.path, safe="")
    return {
        "rank": rank,
        "path": hit.path,
        "name": os.path.basename(hit.path),
        "score": round(hit.score, 5),
        "width": info.width if info else None,
        "height": info.height if info else None,
        "thumb": f"api/thumb?path={q}",
        "image": f"api/image?path={q}",
    }


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


async def _capped_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload too large: {int(declared)} bytes, the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"upload too large: over {limit} bytes")
    return bytes(body)


async def _upload_bytes(request: Request, limits: ServerLimits) -> bytes:
    """The uploaded image: the raw body, or the first file of a multipart form."""
    ctype = request.headers.get("content-type", "")
    multipart = ctype.startswith("multipart/form-data")
    body = await _capped_body(request, limits.max_upload_bytes + (MULTIPART_OVERHEAD if multipart else 0))
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


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> decoded PIL image with EXIF orientation applied, or ApiError 413 / 415."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise ApiError(
                413, f"image too large: {img.width}x{img.height} pixels, the limit is {max_pixels}"
            )
        img.load()
        return ImageOps.exif_transpose(img)
    except ApiError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow reports bad data with many exception types
        raise ApiError(
            415, f"not a readable image (JPEG, PNG, WebP, GIF, BMP or TIFF expected): {type(err).__name__}"
        ) from None


def make_thumbnail(path: str, size: int) -> bytes:
    from clip.preprocess import load_image

    img = load_image(path, exif=True)
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()


class SearchApp:
    """Request handlers bound to one index."""

    def __init__(self, index: Index, limits: ServerLimits) -> None:
        self.index = index
        self.limits = limits
        self.thumb_dir = index.root / "thumbs"

    async def page(self, request: Request) -> Response:
        html = importlib.resources.files("clip.search").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(
            html, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
        )

    async def info(self, request: Request) -> Response:
        return JSONResponse(
            {"count": len(self.index), "model": self.index.model_spec, "errors": len(self.index.errors())}
        )

    async def openapi(self, request: Request) -> Response:
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
        hits = await run_in_threadpool(self.index.search_text, q, offset + k + 1)
        return _page(self.index, hits, k, offset, {"query": q}, t0)

    async def search_image(self, request: Request) -> Response:
        t0 = time.perf_counter()
        k, offset = _page_params(request, self.limits)
        data = await _upload_bytes(request, self.limits)
        img = await run_in_threadpool(decode_upload, data, self.limits.max_upload_pixels)
        hits = await run_in_threadpool(self.index.search_image, img, offset + k + 1)
        extra = {"query": {"image": f"{img.width}x{img.height}", "bytes": len(data)}}
        return _page(self.index, hits, k, offset, extra, t0)

    def _indexed(self, request: Request) -> Any:
        """The index record of ?path=..., compared as an exact string; anything else is a 404."""
        path = request.query_params.get("path", "")
        info = self.index.file_info(path) if path else None
        if info is None:
            raise ApiError(404, "not an indexed file")
        return info

    async def thumb(self, request: Request) -> Response:
        info = self._indexed(request)
        size = self.limits.thumb_size
        key = hashlib.sha256(f"{info.sha256}:{size}".encode()).hexdigest()
        cached = self.thumb_dir / f"{key}.jpg"
        headers = {"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"}
        if cached.is_file():
            return FileResponse(cached, media_type="image/jpeg", headers=headers)
        try:
            data = await run_in_threadpool(make_thumbnail, info.path, size)
        except (ValueError, OSError):
            raise ApiError(404, "indexed file is no longer readable") from None
        try:
            atomic_write_bytes(cached, data)
        except OSError as err:  # a read-only index still serves thumbnails, uncached
            log.warning("cannot cache thumbnail in %s: %s", self.thumb_dir, err)
        return Response(data, media_type="image/jpeg", headers=headers)

    async def image(self, request: Request) -> Response:
        info = self._indexed(request)
        if not os.path.isfile(info.path):
            raise ApiError(404, "indexed file is no longer there")
        return FileResponse(info.path, headers={"X-Content-Type-Options": "nosniff"})


# The page loads nothing from elsewhere: scripts and styles inline, images from this server only.
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob:; connect-src 'self'"


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


def create_app(index: Index, limits: ServerLimits | None = None) -> Starlette:
    """The ASGI app serving `index`."""
    h = SearchApp(index, limits or ServerLimits())
    routes = [
        Route("/", _guard(h.page), methods=["GET"]),
        Route("/api/search", _guard(h.search_text), methods=["GET"]),
        Route("/api/search/image", _guard(h.search_image), methods=["POST"]),
        Route("/api/thumb", _guard(h.thumb), methods=["GET"]),
        Route("/api/image", _guard(h.image), methods=["GET"]),
        Route("/api/info", _guard(h.info), methods=["GET"]),
        Route("/openapi.json", _guard(h.openapi), methods=["GET"]),
    ]
    return Starlette(routes=routes)


def openapi_spec(limits: ServerLimits) -> dict[str, Any]:
    """OpenAPI 3.1 description of the JSON API."""
    page = [
        {"name": "k", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": limits.max_k}},
        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
    ]
    result = {
        "type": "object",
        "properties": {
            "query": {},
            "k": {"type": "integer"},
            "offset": {"type": "integer"},
            "count": {"type": "integer", "description": "images in the index"},
            "has_more": {"type": "boolean"},
            "milliseconds": {"type": "number"},
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "rank": {"type": "integer"},
                        "path": {"type": "string"},
                        "name": {"type": "string"},
                        "score": {"type": "number", "description": "cosine similarity"},
                        "width": {"type": "integer"},
                        "height": {"type": "integer"},
                        "thumb": {"type": "string", "description": "relative URL of a JPEG thumbnail"},
                        "image": {"type": "string", "description": "relative URL of the original file"},
                    },
                },
            },
        },
    }
    ok = {"200": {"description": "results", "content": {"application/json": {"schema": result}}}}
    err = {"description": "error", "content": {"application/json": {"schema": {"properties": {"error": {}}}}}}
    path_param = [{"name": "path", "in": "query", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "clip serve",
            "version": "1",
            "description": "Search an image index by text or image.",
        },
        "paths": {
            "/api/search": {
                "get": {
                    "summary": "Search by text",
                    "parameters": [
                        {
                            "name": "q",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string", "maxLength": limits.max_query_chars},
                        },
                        *page,
                    ],
                    "responses": {**ok, "400": err, "500": err},
                }
            },
            "/api/search/image": {
                "post": {
                    "summary": "Search by image (body: the image file, or multipart/form-data with one file)",
                    "parameters": page,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "image/*": {"schema": {"type": "string", "format": "binary"}},
                            "multipart/form-data": {
                                "schema": {"properties": {"image": {"type": "string", "format": "binary"}}}
                            },
                        },
                    },
                    "responses": {**ok, "400": err, "413": err, "415": err, "500": err},
                }
            },
            "/api/thumb": {
                "get": {
                    "summary": "JPEG thumbnail of an indexed file",
                    "parameters": path_param,
                    "responses": {"200": {"description": "image/jpeg"}, "404": err},
                }
            },
            "/api/image": {
                "get": {
                    "summary": "An indexed file",
                    "parameters": path_param,
                    "responses": {"200": {"description": "the file"}, "404": err},
                }
            },
            "/api/info": {
                "get": {"summary": "Index size and model", "responses": {"200": {"description": "info"}}}
            },
        },
    }


def serve(
    index: Index, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None
) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(index, limits), host=host, port=port, log_level="info")
