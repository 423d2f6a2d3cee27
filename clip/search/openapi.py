"""The OpenAPI 3.1 description of `clip serve`'s JSON API (served at /openapi.json)."""

from __future__ import annotations

from typing import Any


def openapi_spec(limits: Any) -> dict[str, Any]:
    """OpenAPI 3.1 description of the JSON API."""
    page = [
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
    result = {
        "type": "object",
        "properties": {
            "query": {},
            "k": {"type": "integer"},
            "offset": {"type": "integer"},
            "target": {"enum": ["images", "captions"]},
            "count": {"type": "integer", "description": "embeddings in the index (images and video frames)"},
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
                        "time": {"type": "number", "description": "a video frame's time in seconds"},
                        "video": {
                            "type": "string",
                            "description": "relative URL of the video (Range support)",
                        },
                        "caption": {"type": "string"},
                    },
                },
            },
        },
    }
    ok = {"200": {"description": "results", "content": {"application/json": {"schema": result}}}}
    err = {"description": "error", "content": {"application/json": {"schema": {"properties": {"error": {}}}}}}
    path_param = [{"name": "path", "in": "query", "required": True, "schema": {"type": "string"}}]
    from clip.search.retrieval_api import openapi_paths

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
                    "responses": {**ok, "400": err, "408": err, "413": err, "415": err, "500": err},
                }
            },
            "/api/thumb": {
                "get": {
                    "summary": "JPEG thumbnail of an indexed file (of a video: of its indexed frame at t seconds)",
                    "parameters": [
                        *path_param,
                        {"name": "t", "in": "query", "required": False, "schema": {"type": "number"}},
                    ],
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
            "/api/video": {
                "get": {
                    "summary": "An indexed video; a `Range: bytes=FIRST-LAST` header gets 206 Partial Content",
                    "parameters": path_param,
                    "responses": {
                        "200": {"description": "the video"},
                        "206": {"description": "the requested range (Content-Range)"},
                        "404": err,
                        "416": {"description": "the range starts past the end"},
                    },
                }
            },
            "/api/info": {
                "get": {"summary": "Index size and model", "responses": {"200": {"description": "info"}}}
            },
            **openapi_paths(limits),
        },
    }
