"""`clip serve`'s JSON API and its safety: only indexed files, capped uploads, non-images refused."""

from __future__ import annotations

import io
import os
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from clip.config import get_config  # noqa: E402
from clip.model import CLIP  # noqa: E402
from clip.search.index import Index  # noqa: E402
from clip.search.server import ServerLimits, create_app  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from clip.loading import save_model

    tmp = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), tmp / "tiny.pt")
    photos = tmp / "photos"
    (photos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(30):
        img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((64, 48))
        img.save(photos / ("sub" if i % 2 else "") / f"img{i:02d}.png")
    (tmp / "secret.txt").write_text("not for the web")
    idx = Index.open(tmp / "idx", model=str(tmp / "tiny.pt"))
    idx.sync(photos, num_workers=0)
    limits = ServerLimits(max_upload_bytes=200_000, max_upload_pixels=4_000_000)
    client = TestClient(create_app(idx, limits, allowed_hosts=["testserver"]))
    return client, idx, photos, tmp


def png_bytes(size=(40, 30), color=(200, 30, 30)):
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def test_text_search_and_paging(served):
    client, idx, _, _ = served
    first = client.get("/api/search", params={"q": "a red square", "k": 8})
    assert first.status_code == 200
    body = first.json()
    assert body["count"] == 30 and body["has_more"] and len(body["results"]) == 8
    assert [r["rank"] for r in body["results"]] == list(range(1, 9))
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    expected = idx.search_text("a red square", k=30)
    last = client.get("/api/search", params={"q": "a red square", "k": 8, "offset": 24}).json()
    assert [r["path"] for r in last["results"]] == [h.path for h in expected[24:]] and not last["has_more"]
    # Thumbnails and originals of results are served, and the thumbnail is cached on disk.
    hit = body["results"][0]
    thumb = client.get("/" + hit["thumb"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (64, 48)
    assert len(list((idx.root / "thumbs").iterdir())) >= 1
    original = client.get("/" + hit["image"])
    assert original.status_code == 200 and original.content == open(hit["path"], "rb").read()


def test_image_search_raw_and_multipart(served):
    client, idx, photos, _ = served
    target = photos / "img04.png"
    raw = client.post(
        "/api/search/image?k=3", content=target.read_bytes(), headers={"content-type": "image/png"}
    )
    assert raw.status_code == 200
    top = raw.json()["results"][0]
    assert top["path"] == str(target) and top["score"] == pytest.approx(1.0, abs=2e-3)
    form = client.post("/api/search/image?k=3", files={"image": ("q.png", target.read_bytes(), "image/png")})
    assert form.status_code == 200 and form.json()["results"] == raw.json()["results"]


def test_page_and_openapi(served):
    client = served[0]
    page = client.get("/")
    assert (
        page.status_code == 200
        and 'id="drop"' in page.text
        and "default-src 'none'" in page.headers["content-security-policy"]
    )
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.") and {"/api/search", "/api/search/image"} <= set(spec["paths"])
    info = client.get("/api/info").json()
    assert info["count"] == 30


@pytest.mark.parametrize(
    "path",
    [
        "../secret.txt",
        "../../../../../../etc/passwd",
        "%2e%2e%2fsecret.txt",
        "..%2F..%2Fetc%2Fpasswd",
        "%252e%252e%252fsecret.txt",
        "/etc/passwd",
        "SECRET",  # replaced by the absolute path of secret.txt
        "PHOTOS/sub/../img00.png",  # an indexed file reached through a non-canonical path
        "PHOTOS/img00.png\x00.txt",
        "",
    ],
)
@pytest.mark.parametrize("route", ["/api/thumb", "/api/image"])
def test_path_traversal_is_refused(served, route, path):
    client, _, photos, tmp = served
    path = path.replace("SECRET", str(tmp / "secret.txt")).replace("PHOTOS", str(photos))
    response = client.get(route, params={"path": path})
    assert response.status_code == 404 and response.json() == {"error": "not an indexed file"}
    # The same, with the query string written by hand: existing %-escapes go to the server as they are.
    assert client.get(f"{route}?path={quote(path, safe='/%')}").status_code == 404


def test_raw_url_traversal_is_refused(served):
    client, _, _, tmp = served
    for url in [
        "/../secret.txt",
        "/api/../../secret.txt",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/static/../../secret.txt",
    ]:
        response = client.get(url)
        assert response.status_code == 404 and "not for the web" not in response.text


def test_upload_limits_and_non_images(served):
    client = served[0]
    big = client.post(
        "/api/search/image", content=b"\x89PNG" + b"0" * 300_000, headers={"content-type": "image/png"}
    )
    assert big.status_code == 413 and "too large" in big.json()["error"]
    big_form = client.post("/api/search/image", files={"image": ("x.png", b"0" * 300_000, "image/png")})
    assert big_form.status_code == 413
    text = client.post(
        "/api/search/image", content=b"hello, not an image", headers={"content-type": "image/png"}
    )
    assert text.status_code == 415 and "not a readable image" in text.json()["error"]
    truncated = client.post(
        "/api/search/image", content=png_bytes()[:50], headers={"content-type": "image/png"}
    )
    assert truncated.status_code == 415
    # Few bytes, many pixels (a decompression bomb) is refused before decoding.
    bomb = io.BytesIO()
    Image.new("L", (2100, 2100)).save(bomb, format="PNG", optimize=True)
    assert len(bomb.getvalue()) < 200_000
    assert client.post("/api/search/image", content=bomb.getvalue()).status_code == 413
    assert client.post("/api/search/image", content=b"").status_code == 400


def test_query_validation(served):
    client = served[0]
    assert client.get("/api/search").status_code == 400
    assert client.get("/api/search", params={"q": "x" * 1001}).status_code == 400
    assert client.get("/api/search", params={"q": "dog", "k": 0}).status_code == 400
    assert client.get("/api/search", params={"q": "dog", "k": 10_000}).status_code == 400
    assert client.get("/api/search", params={"q": "dog", "k": "ten"}).status_code == 400
    assert client.get("/api/search", params={"q": "dog", "offset": -1}).status_code == 400
    assert client.get("/api/search", params={"q": "a long " * 100, "k": 2}).status_code == 200  # truncated


def test_server_keeps_answering_after_a_failure(served, monkeypatch):
    client, idx, _, _ = served
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("model exploded")

    monkeypatch.setattr(idx, "search_text", broken)
    failed = client.get("/api/search", params={"q": "dog"})
    assert failed.status_code == 500 and "model exploded" in failed.json()["error"] and calls
    monkeypatch.undo()
    assert client.get("/api/search", params={"q": "dog"}).status_code == 200


def test_new_files_show_up_without_restart(served):
    client, idx, photos, tmp = served
    extra = tmp / "later.png"
    extra.write_bytes(png_bytes((50, 50), (10, 200, 10)))
    other = Index.open(idx.root)  # another writer, as `clip index` would be
    other.add([extra], num_workers=0)
    other.close()
    response = client.post("/api/search/image?k=1", content=extra.read_bytes())
    assert response.json()["results"][0]["path"] == os.path.abspath(extra)
    assert client.get("/api/thumb", params={"path": str(extra)}).status_code == 200
