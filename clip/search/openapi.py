"""The OpenAPI 3.1 description of `clip serve`'s JSON API (served at /openapi.json)."""

from __future__ import annotations

from typing import Any


def error_response() -> dict[str, Any]:
    """An error answer's OpenAPI response object (a fresh dict: callers may nest it anywhere)."""
    return {
        "description": "error",
        "content": {"application/json": {"schema": {"properties": {"error": {}}}}},
    }


def _path_param() -> list[dict[str, Any]]:
    return [{"name": "path", "in": "query", "required": True, "schema": {"type": "string"}}]


def openapi_spec(limits: Any) -> dict[str, Any]:
    """OpenAPI 3.1 description of the JSON API; `limits` (a `ServerLimits`) sets the documented maxima."""
    from clip.search.retrieval_api import openapi_paths

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "clip serve",
            "version": "1",
            "description": "Search an image index by text or image.",
        },
        "paths": {**_search_paths(limits), **_file_paths(), **openapi_paths(limits)},
    }


def _page_params(limits: Any) -> list[dict[str, Any]]:
    """The query parameters both searches take: k, offset and the target."""
    return [
        {"name": "k", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": limits.max_k}},
        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
        {
            "name": "target",
            "in": "query",
            "description": "what to search: the images, or the captions of an index built from a "
            "`clip embed --text` job (400 where it has none)",
            "schema": {"enum": ["images", "captions"], "default": "images"},
        },
    ]


def _result_schema() -> dict[str, Any]:
    """The JSON body of a search's answer."""
    hit = {
        "rank": {"type": "integer"},
        "path": {"type": "string"},
        "name": {"type": "string"},
        "score": {"type": "number", "description": "cosine similarity"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "thumb": {"type": "string", "description": "relative URL of a JPEG thumbnail"},
        "image": {"type": "string", "description": "relative URL of the original file"},
        "time": {"type": "number", "description": "a video frame's time in seconds"},
        "video": {"type": "string", "description": "relative URL of the video (Range support)"},
        "caption": {"type": "string"},
    }
    return {
        "type": "object",
        "properties": {
            "query": {},
            "k": {"type": "integer"},
            "offset": {"type": "integer"},
            "target": {"enum": ["images", "captions"]},
            "count": {"type": "integer", "description": "embeddings in the index (images and video frames)"},
            "has_more": {"type": "boolean"},
            "milliseconds": {"type": "number"},
            "results": {"type": "array", "items": {"type": "object", "properties": hit}},
        },
    }


def _search_paths(limits: Any) -> dict[str, Any]:
    """/api/search (text) and /api/search/image."""
    page = _page_params(limits)
    ok = {"200": {"description": "results", "content": {"application/json": {"schema": _result_schema()}}}}
    query = {"name": "q", "in": "query", "required": True,
             "schema": {"type": "string", "maxLength": limits.max_query_chars}}  # fmt: skip
    image_body = {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"properties": {"image": {"type": "string", "format": "binary"}}}},
    }
    errors = {code: error_response() for code in ("400", "408", "413", "415", "500")}
    return {
        "/api/search": {
            "get": {
                "summary": "Search by text",
                "parameters": [query, *page],
                "responses": {**ok, "400": error_response(), "500": error_response()},
            }
        },
        "/api/search/image": {
            "post": {
                "summary": "Search by image (body: the image file, or multipart/form-data with one file)",
                "parameters": page,
                "requestBody": {"required": True, "content": image_body},
                "responses": {**ok, **errors},
            }
        },
    }


def _file_paths() -> dict[str, Any]:
    """/api/thumb, /api/image, /api/video and /api/info."""
    video_responses = {
        "200": {"description": "the video"},
        "206": {"description": "the requested range (Content-Range)"},
        "404": error_response(),
        "416": {"description": "the range starts past the end"},
    }
    return {
        "/api/thumb": {
            "get": {
                "summary": "JPEG thumbnail of an indexed file (of a video: of its indexed frame at t seconds)",
                "parameters": [
                    *_path_param(),
                    {"name": "t", "in": "query", "required": False, "schema": {"type": "number"}},
                ],
                "responses": {"200": {"description": "image/jpeg"}, "404": error_response()},
            }
        },
        "/api/image": {
            "get": {
                "summary": "An indexed file",
                "parameters": _path_param(),
                "responses": {"200": {"description": "the file"}, "404": error_response()},
            }
        },
        "/api/video": {
            "get": {
                "summary": "An indexed video; a `Range: bytes=FIRST-LAST` header gets 206 Partial Content",
                "parameters": _path_param(),
                "responses": video_responses,
            }
        },
        "/api/info": {
            "get": {"summary": "Index size and model", "responses": {"200": {"description": "info"}}}
        },
    }
