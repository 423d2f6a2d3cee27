"""clip-retrieval's back-end protocol on `clip serve`: its own `ClipClient` (clip_retrieval/clip_client.py,
installed with --no-deps by scripts/test and loaded by path) queries a server on 127.0.0.1 and gets the ids
and similarities of `Index.search_text`; the guard (Host allow-list, headers, served files) holds there too."""

from __future__ import annotations

import base64
import importlib.util
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
from starlette.testclient import TestClient  # noqa: E402

from clip.cli import main  # noqa: E402
from clip.search.index import Index  # noqa: E402
from clip.search.retrieval_api import DEDUP_THRESHOLD  # noqa: E402
from clip.search.server import ServerLimits, create_app, server_config  # noqa: E402

QUERIES = ["a dog", "red and blue", "a photo of stripes"]


def load_clip_client():
    """clip-retrieval's ClipClient module, loaded by path (its package __init__ imports its whole back end)."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "clip-retrieval is not installed: pip install --no-deps clip-retrieval (scripts/test does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((48, 40), Image.NEAREST).save(
        path
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A folder index of 10 images (two of them identical) served by uvicorn on 127.0.0.1."""
    from clip.config import get_config
    from clip.loading import save_model
    from clip.model import CLIP

    tmp = tmp_path_factory.mktemp("knn")
    torch.manual_seed(0)
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), tmp / "tiny.pt")
    photos = tmp / "photos"
    photos.mkdir()
    for i in range(9):
        save_png(photos / f"p{i}.png", i)
    (photos / "p9.png").write_bytes((photos / "p3.png").read_bytes())  # a duplicate
    idx = Index.open(tmp / "idx", model=str(tmp / "tiny.pt"))
    idx.sync(photos, num_workers=0)
    port = free_port()
    config = server_config(idx, "127.0.0.1", port, ServerLimits(), index_name="photos", log_level="warning",
                           lifespan="off")  # fmt: skip
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield idx, photos, f"http://127.0.0.1:{port}", tmp
    srv.should_exit = True
    thread.join(10)
    idx.close()


def test_clip_client_gets_the_ids_and_similarities_of_search_text(served):
    idx, photos, url, _ = served
    cc = load_clip_client()
    client = cc.ClipClient(url=f"{url}/knn-service", indice_name="photos", num_images=6, deduplicate=False)
    for q in QUERIES:
        got = client.query(text=q)
        want = idx.search_text(q, k=6)
        assert [r["id"] for r in got] == [h.id for h in want]
        assert [r["similarity"] for r in got] == [h.score for h in want]  # exact: float64 through JSON
        assert [r["image_path"] for r in got] == [h.path for h in want]
        thumb = Image.open(__import__("io").BytesIO(base64.b64decode(got[0]["image"])))
        assert thumb.format == "JPEG" and max(thumb.size) <= 256
    image = client.query(image=str(photos / "p5.png"))
    assert image[0]["image_path"] == str(photos / "p5.png") and image[0]["similarity"] > 0.999
    assert [r["id"] for r in image] == [h.id for h in idx.search_image(photos / "p5.png", k=6)]
    vec = idx.vectors_of([image[0]["id"]])[0]
    by_vec = client.query(embedding_input=vec.tolist())
    assert [r["id"] for r in by_vec] == [
        h.id for h in idx.search_vectors(torch.from_numpy(vec[None]), k=6)[0]
    ]


def test_deduplicate_keeps_the_best_of_each_near_duplicate_group(served):
    idx, photos, url, _ = served
    cc = load_clip_client()
    plain = cc.ClipClient(url=f"{url}/knn-service", indice_name="photos", num_images=10, deduplicate=False)
    dedup = cc.ClipClient(url=f"{url}/knn-service", indice_name="photos", num_images=10)  # its default: True
    full = plain.query(image=str(photos / "p3.png"))
    kept = dedup.query(image=str(photos / "p3.png"))
    assert {full[0]["image_path"], full[1]["image_path"]} == {str(photos / "p3.png"), str(photos / "p9.png")}
    assert kept[0]["id"] == full[0]["id"] and full[1]["id"] not in {r["id"] for r in kept}
    ids = [r["id"] for r in kept]
    assert ids == [r["id"] for r in full if r["id"] in set(ids)]  # order kept
    v = idx.vectors_of(ids)
    sims = v @ v.T
    assert (sims[np.triu_indices(len(ids), 1)] < DEDUP_THRESHOLD).all()  # no two kept ones are duplicates
    every = idx.vectors_of([r["id"] for r in full])
    for i, r in enumerate(full):  # every dropped result is a near-duplicate of a better result
        if r["id"] not in ids:
            assert (every[:i] @ every[i] >= DEDUP_THRESHOLD).any()


def test_indices_list_and_metadata(served):
    import requests

    idx, photos, url, _ = served
    assert requests.get(f"{url}/indices-list", timeout=10).json() == ["photos"]
    hits = idx.search_text("a dog", k=3)
    body = requests.post(f"{url}/metadata", data='{"ids": %s, "indice_name": "photos"}' % [h.id for h in hits] ,
                         timeout=10).json()  # fmt: skip
    assert [m["id"] for m in body] == [h.id for h in hits]
    assert [m["metadata"]["image_path"] for m in body] == [h.path for h in hits]
    assert all("image" in m["metadata"] for m in body)
    assert requests.post(f"{url}/metadata", json={"ids": [10**9]}, timeout=10).json() == [
        {"id": 10**9, "metadata": {}}
    ]


def test_guard_and_bad_requests(served):
    import requests

    idx, photos, url, tmp = served
    knn = f"{url}/knn-service"
    r = requests.post(knn, json={"text": "a dog", "modality": "image", "num_images": 3}, headers={"Host": "evil.example"},
                      timeout=10)  # fmt: skip
    assert r.status_code == 400 and "not allowed" in r.json()["error"]
    r = requests.post(knn, json={"text": "a dog", "num_images": 3}, timeout=10)
    assert r.status_code == 200 and r.headers["x-frame-options"] == "DENY"
    assert "access-control-allow-origin" not in r.headers  # no cross-origin reads unless --cors-origin
    for body, status, words in [
        ({"image_url": "http://169.254.169.254/latest", "num_images": 3}, 400, "image_url is not fetched"),
        ({"text": "x", "modality": "audio"}, 400, "modality"),
        ({"text": "x", "indice_name": "laion5B"}, 400, "unknown indice_name"),
        ({"text": "x", "modality": "text"}, 400, "holds none"),
        ({"text": "x", "num_images": 0}, 400, "num_images"),
        ({"image": "not base64!"}, 400, "base64"),
        ({"image": base64.b64encode(b"not an image").decode()}, 415, "not a readable image"),
        ({"embedding_input": [0.1, 0.2]}, 400, "embedding_input must be a list of 64"),
        ({}, 400, "give one of text"),
    ]:
        r = requests.post(knn, json=body, timeout=10)
        assert r.status_code == status and words in r.json()["error"], (body, r.text)
    r = requests.post(knn, data=b"{not json", timeout=10)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    # A file re-pointed outside the indexed folder after indexing: its result carries no picture.
    link = photos / "p7.png"
    saved = link.read_bytes()
    os.remove(link)
    (tmp / "elsewhere.png").write_bytes(saved)
    os.symlink(tmp / "elsewhere.png", link)
    try:
        hits = requests.post(
            knn, json={"image": base64.b64encode(saved).decode(), "num_images": 2}, timeout=10
        ).json()
        assert hits[0]["image_path"] == str(link) and "image" not in hits[0]
    finally:
        os.remove(link)
        link.write_bytes(saved)
        os.utime(link, ns=(idx.file_info(str(link)).mtime_ns,) * 2)


def test_cors_only_for_named_origins_and_openapi(served):
    idx = served[0]
    app = create_app(idx, ServerLimits(), cors_origins=["http://localhost:1235"])
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    ok = client.post(
        "/knn-service", json={"text": "a dog", "num_images": 2}, headers={"Origin": "http://localhost:1235"}
    )
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:1235"
    other = client.post("/knn-service", json={"text": "a dog"}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    pre = client.options("/knn-service", headers={"Origin": "http://localhost:1235", "Access-Control-Request-Method":
                                                   "POST", "Access-Control-Request-Headers": "content-type"})  # fmt: skip
    assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]
    spec = client.get("/openapi.json").json()["paths"]
    assert {"/knn-service", "/metadata", "/indices-list", "/api/search"} <= set(spec)
    assert "image_url" in spec["/knn-service"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "description"]  # fmt: skip


def test_embeddings_index_captions_through_the_protocol(tmp_path, tiny_checkpoint, one_thread):
    """modality "text" searches the captions of an index built from a `clip embed --text` job."""
    pytest.importorskip("pyarrow")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        save_png(photos / f"c{i}.png", i)
        (photos / f"c{i}.txt").write_text(f"caption number {i}")
    assert main(["embed", str(photos), "--model", str(tiny_checkpoint), "--output", str(tmp_path / "emb"),
                 "--workers", "0", "--text", "--no-progress"]) == 0  # fmt: skip
    assert main(["index", "--from-embeddings", str(tmp_path / "emb"), "--index", str(tmp_path / "idx")]) == 0
    with Index.open(tmp_path / "idx") as idx:
        client = TestClient(
            create_app(idx, ServerLimits(), index_name="coll"), base_url="http://127.0.0.1:8000"
        )
        got = client.post("/knn-service", json={"text": "caption number 4", "modality": "text", "num_images": 3,
                                                "indice_name": "coll"}).json()  # fmt: skip
        want = idx.search_text("caption number 4", k=3, target="captions")
        assert [r["id"] for r in got] == [h.id for h in want] and [r["similarity"] for r in got] == [
            h.score for h in want
        ]
        assert [r["caption"] for r in got] == [h.caption for h in want] and "image" in got[0]
        page = client.get("/api/search", params={"q": "caption number 4", "k": 2}).json()
        assert page["results"][0]["caption"] and page["results"][0]["thumb"].startswith("api/thumb?path=")
        assert client.get("/" + page["results"][0]["thumb"]).headers["content-type"] == "image/jpeg"
