"""The search page in a real browser: Debian's headless Chromium driven by Playwright, against uvicorn.

Type a query and see thumbnails, page through results, drop an image and find it first.  Set CLIP_SCREENSHOT
to a PNG path to save a screenshot of the page (docs/search-page.png is made this way).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

CHROMIUM = os.environ.get("CLIP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

playwright_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")
# CI sets CLIP_REQUIRE_BROWSER=1 so that a missing browser fails instead of skipping.
pytestmark = pytest.mark.skipif(
    not shutil.which(CHROMIUM) and not os.environ.get("CLIP_REQUIRE_BROWSER"),
    reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)",
)

COLOURS = [(220, 60, 50), (40, 120, 220), (250, 190, 40), (60, 170, 90), (150, 80, 200), (240, 130, 180)]


def draw_images(folder, n):
    """Colourful pictures (a gradient sky, a sun or a box, a ground band), so the screenshot shows a real grid."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        top, bottom = COLOURS[i % 6], COLOURS[(i + i // 6 + 1) % 6]
        ramp = np.linspace(0, 1, 120)[:, None, None]
        sky = (np.array(top) * (1 - ramp) + np.array(bottom) * ramp).astype(np.uint8)
        img = Image.fromarray(np.repeat(sky, 160, axis=1))
        d = ImageDraw.Draw(img)
        x, y, r = (int(v) for v in rng.integers([30, 25, 14], [130, 65, 28]))
        shape_colour = COLOURS[(i + 3) % 6]
        if i % 2:
            d.ellipse([x - r, y - r, x + r, y + r], fill=shape_colour)
        else:
            d.rectangle([x - r, y - r, x + r, y + r], fill=shape_colour)
        d.rectangle([0, 95, 160, 120], fill=COLOURS[(i + 1) % 6])
        img.save(folder / f"picture-{i:02d}.png")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from clip.config import get_config
    from clip.loading import save_model
    from clip.model import CLIP
    from clip.search.index import Index
    from clip.search.server import create_app

    tmp = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), tmp / "tiny.pt")
    draw_images(tmp / "photos", 30)
    idx = Index.open(tmp / "idx", model=str(tmp / "tiny.pt"))
    idx.sync(tmp / "photos", num_workers=0)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(idx), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", tmp
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def page():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1200, "height": 640})
        yield pg
        browser.close()


ALL_THUMBS_LOADED = """n => {
  const imgs = [...document.querySelectorAll('#results figure img')];
  return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""

# Predicates are functions, not expression strings: the page's CSP forbids eval, and the test keeps the CSP.
PAGE_IS = "text => document.getElementById('page').textContent === text"


def names(page):
    return page.eval_on_selector_all("#results figcaption .name", "els => els.map(e => e.textContent)")


def test_type_query_see_thumbnails_and_page(server, page):
    base, _ = server
    page.goto(f"{base}/?k=8")
    page.fill("#q", "a red sun over green hills")
    page.press("#q", "Enter")
    page.wait_for_function(ALL_THUMBS_LOADED, arg=8, timeout=20000)
    assert "Results 1–8" in page.inner_text("#status") and "30 images" in page.inner_text("#status")
    assert page.inner_text("#page") == "Page 1" and page.is_disabled("#prev") and page.is_enabled("#next")
    scores = [float(s) for s in page.eval_on_selector_all(".score", "els => els.map(e => e.textContent)")]
    assert scores == sorted(scores, reverse=True)
    seen = [names(page)]
    for number in (2, 3, 4):
        page.click("#next")
        page.wait_for_function(PAGE_IS, arg=f"Page {number}")
        page.wait_for_function(ALL_THUMBS_LOADED, arg=8 if number < 4 else 6, timeout=20000)
        seen.append(names(page))
    assert page.is_disabled("#next")
    flat = [n for group in seen for n in group]
    assert len(flat) == 30 and len(set(flat)) == 30  # every image exactly once across the pages
    page.click("#prev")
    page.wait_for_function(PAGE_IS, arg="Page 3")
    assert names(page) == seen[2]


def drop_file(page, data: bytes, name: str, mime: str) -> None:
    transfer = page.evaluate_handle(
        """([b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: mime }));
            return dt;
        }""",
        [base64.b64encode(data).decode(), name, mime],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def test_drop_an_image(server, page):
    base, tmp = server
    page.goto(f"{base}/?k=8")
    page.fill("#q", "a blue sky")
    page.press("#q", "Enter")
    page.wait_for_function(ALL_THUMBS_LOADED, arg=8, timeout=20000)
    drop_file(page, (tmp / "photos" / "picture-07.png").read_bytes(), "picture-07.png", "image/png")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('dropped image')")
    page.wait_for_function(ALL_THUMBS_LOADED, arg=8, timeout=20000)
    assert names(page)[0] == "picture-07.png"
    assert page.inner_text("#results figure .score") == "1.000"
    assert page.is_visible("#drop-preview") and page.inner_text("#drop-label") == "picture-07.png"
    if os.environ.get("CLIP_SCREENSHOT"):
        page.screenshot(path=os.environ["CLIP_SCREENSHOT"])

    # A dropped non-image is refused with a message; the results stay.
    drop_file(page, b"just text", "notes.txt", "text/plain")
    page.wait_for_function("() => document.getElementById('status').classList.contains('error')")
    assert "image file" in page.inner_text("#status") and len(names(page)) == 8
