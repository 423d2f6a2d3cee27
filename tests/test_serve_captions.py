"""Caption search through `clip serve`'s API: `target=captions` on an index built from a `clip embed --text` job
gives the ids and scores of `EmbeddingsIndex.search_*(..., target="captions")`; an index without captions
answers 400 with one line; the page's toggle is shown only where captions exist."""

from __future__ import annotations

import io

import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("pyarrow")
from starlette.testclient import TestClient  # noqa: E402
from test_from_embeddings import make_photos  # noqa: E402

from clip.cli import main  # noqa: E402
from clip.search.embbuild import build_from_embeddings  # noqa: E402
from clip.search.index import Index  # noqa: E402
from clip.search.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """(with captions, without captions, folder index) over one small `clip embed --text` job."""
    import torch

    from clip.config import get_config
    from clip.loading import save_model
    from clip.model import CLIP

    tmp = tmp_path_factory.mktemp("captions")
    torch.manual_seed(0)
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), tmp / "tiny.pt")
    photos = tmp / "photos"
    make_photos(photos)
    args = ["embed", str(photos), "--model", str(tmp / "tiny.pt"), "--output", str(tmp / "emb")]
    assert main([*args, "--shard-size", "5", "--workers", "0", "--text", "--no-progress"]) == 0
    build_from_embeddings(tmp / "emb", tmp / "with.idx", ann="never")
    build_from_embeddings(tmp / "emb", tmp / "without.idx", ann="never", captions=False)
    with Index.open(tmp / "folder.idx", model=str(tmp / "tiny.pt")) as idx:
        idx.sync(photos, num_workers=0)
    opened = [Index.open(tmp / name) for name in ("with.idx", "without.idx", "folder.idx")]
    yield opened, photos
    for idx in opened:
        idx.close()


def client(idx) -> TestClient:
    return TestClient(create_app(idx, allowed_hosts=["testserver"]))


def test_text_query_on_captions_matches_the_library(indexes):
    (with_captions, *_), _ = indexes
    assert with_captions.has_captions
    want = with_captions.search_text("picture number 3 of stripes", k=6, target="captions")
    body = (
        client(with_captions)
        .get("/api/search", params={"q": "picture number 3 of stripes", "k": 5, "target": "captions"})
        .json()
    )
    assert body["target"] == "captions"
    assert [(r["id"], r["score"]) for r in body["results"]] == [(h.id, round(h.score, 5)) for h in want[:5]]
    assert [r["caption"] for r in body["results"]] == [h.caption for h in want[:5]]
    assert body["has_more"]
    # The same query on the images is another ranking (the default target).
    images = (
        client(with_captions).get("/api/search", params={"q": "picture number 3 of stripes", "k": 5}).json()
    )
    assert images["target"] == "images"
    want_images = with_captions.search_text("picture number 3 of stripes", k=5)
    assert [r["id"] for r in images["results"]] == [h.id for h in want_images]


def test_image_query_on_captions_matches_the_library(indexes):
    (with_captions, *_), photos = indexes
    data = (photos / "im004.png").read_bytes()
    want = with_captions.search_image(Image.open(io.BytesIO(data)), k=4, target="captions")
    response = client(with_captions).post(
        "/api/search/image?k=4&target=captions", content=data, headers={"content-type": "image/png"}
    )
    assert response.status_code == 200
    got = response.json()["results"]
    assert [(r["id"], r["score"], r["caption"]) for r in got] == [
        (h.id, round(h.score, 5), h.caption) for h in want
    ]


@pytest.mark.parametrize("which", [1, 2])  # an embeddings index built without captions, a folder index
def test_no_captions_is_one_clear_line(indexes, which):
    idx = indexes[0][which]
    c = client(idx)
    assert c.get("/api/info").json()["captions"] is False
    for response in [
        c.get("/api/search", params={"q": "stripes", "target": "captions"}),
        c.post("/api/search/image?target=captions", content=b"x", headers={"content-type": "image/png"}),
    ]:
        error = response.json()["error"]
        assert response.status_code == 400 and "\n" not in error
        assert "holds no captions" in error and "clip embed --text" in error
    bad = c.get("/api/search", params={"q": "stripes", "target": "texts"})
    assert bad.status_code == 400 and bad.json()["error"] == "target must be images or captions, got 'texts'"


def test_page_shows_the_toggle_only_with_captions(indexes):
    (with_captions, without, _), _ = indexes
    page = client(with_captions).get("/").text
    assert '<label id="target" hidden' in page and "target=captions" in page  # hidden until /api/info says so
    assert "info.captions" in page
    assert client(with_captions).get("/api/info").json()["captions"] is True
    assert client(without).get("/api/info").json()["captions"] is False
