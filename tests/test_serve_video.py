"""`clip serve` over an index holding videos: a real server on 127.0.0.1 returns `time` for video hits, serves
the video with HTTP Range (206, exact bytes), a thumbnail of the hit's frame, refuses what is not indexed, and
its page holds the video player."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
av = pytest.importorskip("av")

from test_search_hardening_serve import REPO, free_port, request  # noqa: E402
from test_search_video import BLUE, GREEN, RED, write_video  # noqa: E402

from clip.search.guard import video_media_type  # noqa: E402
from clip.search.index import Index  # noqa: E402
from clip.search.media import RangeNotSatisfiable, parse_range  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(port, tmp, media folder): `clip serve` over an index of a video, an image and a non-indexed file."""
    from clip.collection.video import VideoOptions
    from clip.config import get_config
    from clip.loading import save_model
    from clip.model import CLIP

    tmp = tmp_path_factory.mktemp("serve_video")
    torch.manual_seed(0)
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), tmp / "tiny.pt")
    media = tmp / "media"
    write_video(media / "a.mp4", [(RED, 0.0, 1.0), (GREEN, 1.0, 2.0), (BLUE, 2.0, 3.0)])
    Image.new("RGB", (40, 40), (128, 128, 128)).save(media / "grey.png")
    with Index.open(tmp / "idx", model=str(tmp / "tiny.pt")) as idx:
        assert idx.sync(media, num_workers=0, video=VideoOptions(frame_interval=0.5)).frames == 6
    write_video(media / "later.mp4", [(RED, 0.0, 1.0)])  # in the folder, not in the index
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clip", "serve", str(tmp / "idx"), "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "clip serve did not start"
        try:
            if request(port, "/api/info", timeout=2)[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    yield port, tmp, media
    proc.kill()
    proc.wait(10)


def png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(out, format="PNG")
    return out.getvalue()


def search_image(port, colour, k=3) -> dict:
    status, _, body = request(port, f"/api/search/image?k={k}", method="POST", body=png(colour),
                              headers={"Content-Type": "image/png"})  # fmt: skip
    assert status == 200, body
    return json.loads(body)


def test_api_returns_path_and_time_for_video_hits(server):
    port, _, media = server
    body = search_image(port, GREEN, k=3)
    top = body["results"][:2]
    assert [(r["path"], r["time"]) for r in top] == [(str(media / "a.mp4"), 1.0), (str(media / "a.mp4"), 1.5)]
    assert all(
        r["score"] > 0.99 and r["video"].startswith("api/video?path=") and r["image"] is None for r in top
    )
    assert body["target"] == "images"
    grey = next(
        r for r in search_image(port, (128, 128, 128), k=7)["results"] if r["path"].endswith("grey.png")
    )
    assert "time" not in grey and "video" not in grey and grey["image"]

    # The thumbnail of a hit is its own frame (green at 1.0 s), not the video's first (red).
    status, headers, data = request(port, "/" + top[0]["thumb"])
    assert status == 200 and headers["content-type"] == "image/jpeg"
    r, g, b = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).reshape(-1, 3).mean(0)
    assert g > 150 and r < 80 and b < 80
    status, _, _ = request(port, "/" + top[0]["thumb"].replace("&t=1.0", "&t=1.25"))
    assert status == 404  # no indexed frame at 1.25 s: nothing decoded or cached for it


def test_video_is_served_with_range_support(server):
    port, _, media = server
    hit = search_image(port, RED, k=1)["results"][0]
    data = (media / "a.mp4").read_bytes()
    size = len(data)
    status, headers, body = request(port, "/" + hit["video"])
    assert status == 200 and body == data and headers["accept-ranges"] == "bytes"
    assert headers["content-type"] == "video/mp4" and int(headers["content-length"]) == size
    cases = {"bytes=0-99": (0, 99), "bytes=100-": (100, size - 1), "bytes=-64": (size - 64, size - 1),
             f"bytes=10-{size + 500}": (10, size - 1)}  # fmt: skip
    for spec, (first, last) in cases.items():
        status, headers, body = request(port, "/" + hit["video"], headers={"Range": spec})
        assert status == 206, spec
        assert headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert body == data[first : last + 1] and int(headers["content-length"]) == len(body)
    status, headers, _ = request(port, "/" + hit["video"], headers={"Range": f"bytes={size}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{size}"
    # If-Range naming another version of the file: the whole file.
    status, _, body = request(port, "/" + hit["video"], headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert status == 200 and body == data


def test_only_indexed_videos_are_served(server):
    port, tmp, media = server
    for path in [media / "later.mp4", tmp / "tiny.pt", "../a.mp4", media / "sub" / ".." / "a.mp4"]:
        status, _, body = request(port, f"/api/video?path={quote(os.fsencode(str(path)), safe='')}")
        assert status == 404 and json.loads(body) == {"error": "not an indexed file"}, path
    grey = quote(str(media / "grey.png"), safe="")
    assert request(port, f"/api/video?path={grey}")[0] == 404  # an image is no video
    video = quote(str(media / "a.mp4"), safe="")
    status, _, body = request(port, f"/api/image?path={video}")  # never read whole into memory as an image
    assert status == 404 and "api/video" in json.loads(body)["error"]
    # Changed after indexing (same size, new bytes and mtime): refused until `clip index` has seen it.
    original = (media / "a.mp4").read_bytes()
    st = os.stat(media / "a.mp4")
    try:
        (media / "a.mp4").write_bytes(b"not a video" + original[11:])
        assert request(port, f"/api/video?path={video}", headers={"Range": "bytes=0-9"})[0] == 404
    finally:
        (media / "a.mp4").write_bytes(original)
        os.utime(media / "a.mp4", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert request(port, f"/api/video?path={video}", headers={"Range": "bytes=0-9"})[0] == 206


def test_page_has_the_video_player(server):
    port = server[0]
    status, headers, body = request(port, "/")
    page = body.decode()
    assert status == 200 and 'id="player-video"' in page and "<video" in page
    assert "#t=${hit.time}" in page and "video.currentTime = hit.time" in page
    assert "media-src 'self'" in headers["content-security-policy"]


def test_range_parsing_and_signatures():
    assert parse_range(None, 100) is None and parse_range("bytes=0-1,5-6", 100) is None
    assert parse_range("items=0-5", 100) is None and parse_range("bytes=9-3", 100) is None
    assert parse_range("bytes=5-5", 100) == (5, 5) and parse_range("bytes=-500", 100) == (0, 99)
    for bad in ["bytes=100-", "bytes=-0"]:
        with pytest.raises(RangeNotSatisfiable):
            parse_range(bad, 100)
    assert video_media_type(b"\x00\x00\x00\x18ftypisom" + bytes(52)) == "video/mp4"
    assert video_media_type(b"\x00\x00\x00\x14ftypqt  " + bytes(52)) == "video/quicktime"
    assert video_media_type(b"\x1aE\xdf\xa3\x9fB\x86\x81\x01B\x82\x84webm") == "video/webm"
    assert video_media_type(b"RIFF\x00\x00\x00\x00AVI LIST") == "video/x-msvideo"
    assert video_media_type(b"\x89PNG\r\n\x1a\n" + bytes(56)) is None and video_media_type(b"") is None
