"""clip-retrieval's back-end protocol on `clip serve`, so that its `ClipClient` and front end can query an index.

    GET  /indices-list   ["NAME"]: the one index served (`--index-name`, default its folder's name)
    POST /knn-service    {"text" | "image" (base64) | "embedding_input", "modality", "num_images",
                          "num_result_ids", "indice_name", "deduplicate", ...} -> [{"id", "similarity", ...}]
    POST /metadata       {"ids": [...], "indice_name"} -> [{"id", "metadata": {...}}]

Field names and semantics are clip-retrieval's (`clip_back.py`): `modality` "image" searches the image
vectors and "text" the caption vectors; results are best first with the cosine `similarity` and the vector's
`id` (a folder index's `vec_id`, stable across updates; the row of an index built from embeddings);
`deduplicate` drops every result whose vector has cosine >= 0.94 with a better one (connected components, as
clip-retrieval); the first `num_images` results carry metadata: `caption`, `image_path`, `key`/`tar` for a
WebDataset sample, and `image`, a base64 JPEG thumbnail of the file, sent only when `clip.search.guard`
would serve the file itself.  Deliberately not done: `image_url` (this server fetches nothing from other
hosts: send the image in `image`), and the safety, violence, aesthetic and mclip options, which are accepted
and ignored (clip-retrieval ignores them too when it has no such models).

The Host allow-list, the safety headers and the upload limits apply as for `/api/*`.  Browsers get no
cross-origin access unless `--cors-origin` names the origin of a front end (the index's images would
otherwise be readable by any page the user visits).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clip.search.openapi import error_response

DEDUP_THRESHOLD = 0.94  # clip-retrieval's cosine for "the same image"
DEFAULT_NUM_IMAGES = 40  # ClipClient's default
JSON_OVERHEAD = 64 * 1024
MODALITIES = {"image": "images", "text": "captions"}
IGNORED = ("use_mclip", "use_safety_model", "use_violence_detector", "aesthetic_score", "aesthetic_weight")


def cors_middleware(origins: Iterable[str]) -> list[Middleware]:
    """Starlette's CORS middleware for exactly `origins` (none: no cross-origin reads at all)."""
    origins = [o.rstrip("/") for o in origins]
    if not origins:
        return []
    from starlette.middleware.cors import CORSMiddleware

    return [Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                       allow_headers=["content-type"])]  # fmt: skip


@dataclass(frozen=True)
class KnnQuery:
    """A parsed /knn-service request: exactly one of text, image bytes, embedding."""

    text: str | None
    image: bytes | None
    embedding: torch.Tensor | None  # float32 [1, D]
    target: str
    num_images: int
    num_result_ids: int
    deduplicate: bool


def _count(body: dict, name: str, default: int, cap: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        from clip.search.server import ApiError

        raise ApiError(400, f"{name} must be a positive integer, got {json.dumps(value)[:40]}")
    return min(value, cap)  # clip-retrieval takes any count; this server returns at most `cap`


def parse_knn(body: Any, index_name: str, dim: int, limits: Any) -> KnnQuery:
    """Validate a /knn-service body (clip-retrieval's fields); ApiError 400 naming the field otherwise."""
    from clip.search.server import ApiError

    if not isinstance(body, dict):
        raise ApiError(400, 'the body must be a JSON object, e.g. {"text": "a dog", "modality": "image"}')
    _check_name(body, index_name)
    modality = body.get("modality") or "image"
    if modality not in MODALITIES:
        raise ApiError(400, f'modality must be "image" or "text", got {json.dumps(modality)[:40]}')
    num_images = _count(body, "num_images", DEFAULT_NUM_IMAGES, limits.max_results)
    num_ids = _count(body, "num_result_ids", num_images, limits.max_results)
    text, image, embedding = body.get("text"), body.get("image"), body.get("embedding_input")
    dedup = bool(body.get("deduplicate", False))
    args = (MODALITIES[modality], num_images, max(num_ids, num_images), dedup)
    if text not in (None, ""):
        if not isinstance(text, str):
            raise ApiError(400, "text must be a string")
        if len(text) > limits.max_query_chars:
            raise ApiError(
                400, f"text too long: {len(text)} characters, the limit is {limits.max_query_chars}"
            )
        return KnnQuery(text, None, None, *args)
    if image not in (None, ""):
        if not isinstance(image, str):
            raise ApiError(400, "image must be a base64 string of the image file")
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(
                400, "image is not valid base64: send the image file's bytes base64-encoded"
            ) from None
        if len(data) > limits.max_upload_bytes:
            raise ApiError(413, f"image too large: {len(data)} bytes, the limit is {limits.max_upload_bytes}")
        return KnnQuery(None, data, None, *args)
    if body.get("image_url") not in (None, ""):
        raise ApiError(400, "image_url is not fetched (this server reaches no other host): send the image "
                            "itself, base64-encoded, in \"image\"")  # fmt: skip
    if embedding is not None:
        return KnnQuery(None, None, _embedding(embedding, dim), *args)
    raise ApiError(400, "give one of text, image (base64) or embedding_input")


def _embedding(value: Any, dim: int) -> torch.Tensor:
    from clip.search.server import ApiError

    ok = isinstance(value, list) and len(value) == dim
    ok = ok and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok:
        raise ApiError(400, f"embedding_input must be a list of {dim} finite numbers")
    vec = torch.tensor([value], dtype=torch.float32)
    if float(vec.norm()) == 0.0:
        raise ApiError(400, "embedding_input is all zeros")
    return vec


def _check_name(body: dict, index_name: str) -> None:
    from clip.search.server import ApiError

    name = body.get("indice_name")
    if name not in (None, "", index_name):
        raise ApiError(
            400, f"unknown indice_name {json.dumps(name)[:60]}; this server has [{json.dumps(index_name)}]"
        )


def dedup_keep(vectors: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> list[int]:
    """Positions to keep among ranked unit vectors [n, D]: the best of each connected component of the graph
    joining pairs with cosine >= threshold (clip-retrieval's `connected_components_dedup`)."""
    n = len(vectors)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    sims = vectors.astype(np.float32) @ vectors.astype(np.float32).T
    for i, j in zip(*np.nonzero(np.triu(sims >= threshold, 1)), strict=True):
        a, b = find(int(i)), find(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root stays the best-ranked member
    return [i for i in range(n) if find(i) == i]


class RetrievalApi:
    """The clip-retrieval handlers over a `SearchApp` (its index, limits and thumbnail cache)."""

    def __init__(self, app: Any, name: str) -> None:
        self.app = app
        self.index = app.index
        self.name = name

    def routes(self, guard: Callable[[Any], Any]) -> list[Route]:
        return [
            Route("/indices-list", guard(self.indices_list), methods=["GET"]),
            Route("/knn-service", guard(self.knn), methods=["POST"]),
            Route("/metadata", guard(self.metadata), methods=["POST"]),
        ]

    async def _json(self, request: Request) -> Any:
        from clip.search.server import ApiError, _capped_body

        limit = self.app.limits.max_upload_bytes * 4 // 3 + JSON_OVERHEAD  # base64 of the largest upload
        body = await _capped_body(request, limit, self.app.limits.body_timeout)
        try:  # any content type: clip-retrieval's front end posts JSON as text/plain
            return json.loads(body)
        except ValueError as err:
            raise ApiError(400, f"the body is not JSON: {err}") from None

    async def indices_list(self, request: Request) -> Response:
        return JSONResponse([self.name], headers={"Cache-Control": "no-store"})

    async def knn(self, request: Request) -> Response:
        from clip.search.server import ApiError

        t0 = time.perf_counter()
        q = parse_knn(await self._json(request), self.name, self.index.embed_dim, self.app.limits)
        if q.target == "captions" and not self.index.has_captions:
            raise ApiError(400, "modality \"text\" searches captions, and this index holds none: build it with "
                                "`clip index --from-embeddings` from a `clip embed --text` job")  # fmt: skip
        if q.image is not None:
            hits = await self.app._bounded(self._search_image, q)
        else:
            hits = await run_in_threadpool(self._search, q)
        if q.deduplicate and hits:
            vecs = await run_in_threadpool(self.index.vectors_of, [h.id for h in hits], q.target)
            hits = [hits[i] for i in dedup_keep(vecs)]
        metas = await run_in_threadpool(self.index.metadata, [h.id for h in hits[: q.num_images]])
        results = []
        for i, h in enumerate(hits):
            item = await self._meta_json(metas[i]) if i < len(metas) and metas[i] is not None else {}
            results.append({**item, "id": h.id, "similarity": h.score})
        headers = {
            "Cache-Control": "no-store",
            "Server-Timing": f"knn;dur={(time.perf_counter() - t0) * 1000:.1f}",
        }
        return JSONResponse(results, headers=headers)

    def _search(self, q: KnnQuery) -> list:
        kw = {"target": q.target} if q.target != "images" else {}
        if q.text is not None:
            return self.index.search_text(q.text, q.num_result_ids, **kw)
        return self.index.search_vectors(q.embedding, q.num_result_ids, **kw)[0]

    def _search_image(self, q: KnnQuery) -> list:
        from clip.search.server import decode_upload

        limits = self.app.limits
        img = decode_upload(q.image, limits.max_upload_pixels, limits.max_upload_decode_bytes)
        kw = {"target": q.target} if q.target != "images" else {}
        return self.index.search_image(img, q.num_result_ids, **kw)

    async def metadata(self, request: Request) -> Response:
        from clip.search.server import ApiError

        body = await self._json(request)
        if not isinstance(body, dict) or not isinstance(body.get("ids"), list):
            raise ApiError(400, 'the body must be {"ids": [...], "indice_name": ...}')
        _check_name(body, self.name)
        ids = body["ids"]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ApiError(400, "ids must be integers (the id of each result)")
        if len(ids) > self.app.limits.max_results:
            raise ApiError(400, f"at most {self.app.limits.max_results} ids per request, got {len(ids)}")
        metas = await run_in_threadpool(self.index.metadata, ids)
        out = [
            {"id": i, "metadata": await self._meta_json(m) if m is not None else {}}
            for i, m in zip(ids, metas, strict=True)
        ]
        return JSONResponse(out, headers={"Cache-Control": "no-store"})

    async def _meta_json(self, meta: dict[str, Any]) -> dict[str, Any]:
        """clip-retrieval's metadata fields of one row, with the thumbnail when the file may be served."""
        from clip.search.server import ApiError, _shown

        out: dict[str, Any] = {}
        if meta.get("caption") is not None:
            out["caption"] = meta["caption"]
        if meta.get("tar"):
            out["key"], out["tar"] = meta["key"], meta["tar"]
        for k in ("width", "height"):
            if meta.get(k) is not None:
                out[k] = meta[k]
        path = meta.get("path")
        if path:
            out["image_path"] = _shown(path)
            info = self.index.file_info(path)
            if info is not None:
                try:
                    cached, data = await self.app.thumbnail(info)
                    if data is None:
                        data = await run_in_threadpool(cached.read_bytes)
                    out["image"] = base64.b64encode(data).decode("ascii")
                except (ApiError, OSError):
                    pass  # not servable now: the result keeps its path and caption, without the picture
        return out


def openapi_paths(limits: Any) -> dict[str, Any]:
    """The OpenAPI description of the three clip-retrieval routes."""
    err = error_response()
    count = {"type": "integer", "minimum": 1, "description": f"at most {limits.max_results} are returned"}
    knn_body = {
        "type": "object",
        "description": "clip-retrieval's fields; one of text, image, embedding_input (in that precedence). "
        f"Accepted and ignored: {', '.join(IGNORED)}; refused: image_url (nothing is fetched).",
        "properties": {
            "text": {"type": "string", "maxLength": limits.max_query_chars},
            "image": {"type": "string", "format": "byte", "description": "the image file, base64"},
            "embedding_input": {"type": "array", "items": {"type": "number"}},
            "modality": {"enum": ["image", "text"], "description": "image: search images; text: captions"},
            "num_images": {**count, "default": DEFAULT_NUM_IMAGES, "description": "results with metadata"},
            "num_result_ids": {**count, "description": "results (ids and similarities); default num_images"},
            "indice_name": {"type": "string", "description": "the name from /indices-list"},
            "deduplicate": {
                "type": "boolean",
                "default": False,
                "description": f"drop results with cosine >= {DEDUP_THRESHOLD} to a better one",
            },  # fmt: skip
        },
    }
    meta = {
        "type": "object",
        "properties": {
            "caption": {"type": "string"},
            "image_path": {"type": "string"},
            "image": {
                "type": "string",
                "format": "byte",
                "description": "base64 JPEG thumbnail (servable files)",
            },
            "key": {"type": "string"},
            "tar": {"type": "string"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
        },
    }
    hit = {"allOf": [meta, {"properties": {"id": {"type": "integer"}, "similarity": {"type": "number"}}}]}
    json_body = lambda schema: {"required": True, "content": {"application/json": {"schema": schema}}}  # noqa: E731
    listing = lambda schema, what: {"200": {"description": what, "content": {"application/json": {"schema": {  # noqa: E731
        "type": "array", "items": schema}}}}}  # fmt: skip
    return {
        "/indices-list": {"get": {"summary": "clip-retrieval: the index names (one)",
                                  "responses": listing({"type": "string"}, "names")}},
        "/knn-service": {"post": {"summary": "clip-retrieval: nearest neighbours of a text, image or embedding",
                                  "requestBody": json_body(knn_body),
                                  "responses": {**listing(hit, "results, best first"), "400": err, "408": err,
                                                "413": err, "415": err, "500": err}}},
        "/metadata": {"post": {"summary": "clip-retrieval: metadata of result ids",
                               "requestBody": json_body({"type": "object", "properties": {
                                   "ids": {"type": "array", "items": {"type": "integer"}},
                                   "indice_name": {"type": "string"}}}),
                               "responses": {**listing({"type": "object", "properties": {
                                   "id": {"type": "integer"}, "metadata": meta}}, "metadata per id"),
                                   "400": err}}},
    }  # fmt: skip
