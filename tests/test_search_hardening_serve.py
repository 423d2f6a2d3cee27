"""`clip serve` as an attacker meets it: a real server process on 127.0.0.1 (uvicorn in a thread for the
slow-client timeouts, which `clip serve` sets to 10 s).

Only the file that was indexed is ever sent; other Host names are refused; nothing can be framed; slow
clients are cut off; uploads cannot blow up memory; thumbnails of deleted photos are gone.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

import clip  # noqa: E402
from clip.config import get_config  # noqa: E402
from clip.model import CLIP  # noqa: E402
from clip.search.index import Index  # noqa: E402

REPO = str(Path(clip.__file__).resolve().parents[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_png(path, seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST).save(path)


def request(port, path, host=None, method="GET", body=None, headers=None, timeout=30):
    """(status, headers dict (lower-case names), body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def get_file(port, route, path):
    return request(port, f"{route}?path={quote(os.fsencode(str(path)), safe='')}")


def peak_rss_mb(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A `clip serve` process over a small index; yields (port, process, tmp, photos, index path)."""
    from clip.loading import save_model

    tmp = tmp_path_factory.mktemp("harden")
    torch.manual_seed(0)
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), tmp / "tiny.pt")
    photos, outside = tmp / "photos", tmp / "outside"
    photos.mkdir()
    outside.mkdir()
    for i, name in enumerate(["a", "b", "c", "d", "e", "target"]):
        save_png(photos / f"{name}.png", i)
    save_png(outside / "elsewhere.png", 10)
    os.symlink(photos / "target.png", photos / "link.png")  # a link inside the indexed folder
    os.symlink(outside / "elsewhere.png", photos / "out.png")  # a link leading out of it
    (tmp / "secret.txt").write_text("root:$6$not-for-the-web")
    with Index.open(tmp / "idx", model=str(tmp / "tiny.pt")) as idx:
        assert idx.sync(photos, num_workers=0).added == 8
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "clip", "serve", str(tmp / "idx"), "--port", str(port)]
    proc = subprocess.Popen(
        [*argv, "--allowed-host", "photos.lan"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "clip serve did not start"
        try:
            if request(port, "/api/info", timeout=2)[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    yield port, proc, tmp, photos, tmp / "idx"
    proc.kill()
    proc.wait(10)


def test_only_the_indexed_file_is_served(server):
    port, _, tmp, photos, _ = server
    status, headers, body = get_file(port, "/api/image", photos / "link.png")
    assert status == 200 and body == (photos / "target.png").read_bytes()
    assert headers["content-type"] == "image/png"  # from the bytes, not the name

    # The link re-pointed at a secret after indexing: refused, for the original and the thumbnail.
    os.remove(photos / "link.png")
    os.symlink(tmp / "secret.txt", photos / "link.png")
    for route in ("/api/image", "/api/thumb"):
        status, _, body = get_file(port, route, photos / "link.png")
        assert status == 404 and b"not-for-the-web" not in body

    # An indexed image overwritten by a text file.
    (photos / "b.png").write_text("root:$6$not-for-the-web")
    for route in ("/api/image", "/api/thumb"):
        status, _, body = get_file(port, route, photos / "b.png")
        assert status == 404 and b"not-for-the-web" not in body

    # Same size and mtime, other bytes: only the SHA-256 tells, and it does.
    path = photos / "c.png"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    status, _, body = get_file(port, "/api/image", path)
    assert status == 404 and "content" in json.loads(body)["error"]

    # A link that led out of the indexed folder (at indexing time already) is not followed out of it.
    status, _, body = get_file(port, "/api/image", photos / "out.png")
    assert status == 404 and json.loads(body)["error"].startswith("indexed file now resolves outside")
    # An untouched file is still served.
    assert get_file(port, "/api/image", photos / "a.png")[0] == 200


def test_host_allow_list_and_framing(server):
    port = server[0]
    status, headers, body = request(port, "/api/search?q=dog", host=f"rebind.example:{port}")
    assert status == 400 and "--allowed-host rebind.example" in json.loads(body)["error"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "photos.lan", f"[::1]:{port}", "LOCALHOST."):
        assert request(port, "/api/search?q=dog", host=host)[0] == 200, host
    for path in ("/", "/api/info", "/api/search?q=dog", "/no/such/page"):
        _, headers, _ = request(port, path)
        assert headers["x-frame-options"] == "DENY", path
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["cross-origin-resource-policy"] == "same-origin"
    page_csp = request(port, "/")[1]["content-security-policy"]
    assert "default-src 'none'" in page_csp  # the page's own policy is kept, framing added to it


@pytest.fixture(scope="module")
def big_uploads():
    """A 7000x7000 float TIFF (tiny on disk, ~1.9 GB to decode and preprocess) and a 49 MP PNG."""
    grey = Image.new("F", (7000, 7000), 0.5)
    tiff = io.BytesIO()
    grey.save(tiff, format="TIFF", compression="tiff_adobe_deflate")
    del grey
    png = io.BytesIO()
    Image.new("RGB", (7000, 7000), (10, 200, 30)).save(png, format="PNG", compress_level=1)
    return tiff.getvalue(), png.getvalue()


def test_uploads_cannot_amplify_memory(server, big_uploads):
    port, proc = server[0], server[1]
    tiff, png = big_uploads
    assert len(tiff) < 2_000_000 and len(png) < 2_000_000
    before = peak_rss_mb(proc.pid)
    status, _, body = request(port, "/api/search/image", method="POST", body=tiff)
    assert status == 413 and "mode F" in json.loads(body)["error"]
    assert peak_rss_mb(proc.pid) - before < 150  # refused before decoding (it took 1.8 GB before)
    # Six 49-megapixel PNGs at once: decoded two at a time, so memory stays near two images' worth.
    with ThreadPoolExecutor(6) as pool:
        statuses = list(
            pool.map(lambda _: request(port, "/api/search/image?k=1", method="POST", body=png)[0], range(6))
        )
    assert statuses == [200] * 6
    assert peak_rss_mb(proc.pid) - before < 800  # six at once took well over 1.2 GB


def test_slow_clients_are_cut_off(tmp_path, tiny_checkpoint):
    from clip.search.server import ServerLimits, server_config

    photos = tmp_path / "photos"
    photos.mkdir()
    save_png(photos / "a.png", 0)
    idx = Index.open(tmp_path / "idx", model=str(tiny_checkpoint))
    idx.sync(photos, num_workers=0)
    port = free_port()
    limits = ServerLimits(header_timeout=0.5, body_timeout=0.5)
    srv = uvicorn.Server(server_config(idx, "127.0.0.1", port, limits, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)

        def seconds_until_closed(chunks, pause):
            with socket.create_connection(("127.0.0.1", port), timeout=6) as s:
                t0 = time.monotonic()
                try:
                    for chunk in chunks:
                        s.sendall(chunk)
                        time.sleep(pause)
                    while s.recv(4096):
                        pass
                except (BrokenPipeError, ConnectionResetError):
                    pass
                except TimeoutError:
                    return float("inf")
                return time.monotonic() - t0

        # Half the headers, then nothing; then headers trickled a few bytes at a time.
        assert seconds_until_closed([b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n"], 0) < 2
        trickle = [bytes([c]) for c in b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: yes"]
        assert seconds_until_closed(trickle, 0.05) < 2
        # A body that never arrives: a 408 with a message after body_timeout.
        with socket.create_connection(("127.0.0.1", port), timeout=6) as s:
            s.sendall(
                b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n\r\nPNG"
            )
            t0 = time.monotonic()
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408") and b"too slow" in s.recv(4096) + reply
            assert time.monotonic() - t0 < 2
        # A normal client is unaffected.
        assert request(port, "/api/info")[0] == 200
    finally:
        srv.should_exit = True
        thread.join(10)
        idx.close()


def test_deleted_photos_lose_their_thumbnails(server):
    port, _, _, photos, idx_dir = server
    path, thumbs = photos / "d.png", idx_dir / "thumbs"
    before = set(thumbs.iterdir()) if thumbs.is_dir() else set()
    assert get_file(port, "/api/thumb", path)[0] == 200
    cached = set(thumbs.iterdir()) - before
    assert len(cached) == 1
    path.unlink()
    status, _, body = get_file(port, "/api/thumb", path)  # the cached thumbnail is not served either
    assert status == 404 and "no longer there" in json.loads(body)["error"]
    with Index.open(idx_dir) as idx:  # `clip index` runs again while the server keeps running
        report = idx.sync(photos, num_workers=0)
    assert report.removed >= 1 and report.thumbs_pruned >= 1
    assert not cached & set(thumbs.iterdir())  # pruned
    assert get_file(port, "/api/thumb", photos / "e.png")[0] == 200
