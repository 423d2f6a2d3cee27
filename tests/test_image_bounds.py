"""`load_image` bounds decoding memory by pixel count and mode, before decoding anything.

A 7000x7000 float TIFF is a few hundred KB on disk but took ~1.95 GB to load and preprocess, so a handful
of such files could kill `clip index` and its decoding workers.  The bound (`decode_cost`) is checked
against real peak memory (ru_maxrss of a child process) for the costly modes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clip
from clip.preprocess import ImageTooLargeError, decode_cost, image_transform, load_image

REPO = str(Path(clip.__file__).resolve().parents[1])


def child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def float_tiff(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bounds") / "hostile.tif"
    Image.new("F", (7000, 7000), 0.25).save(path, compression="tiff_adobe_deflate")
    assert path.stat().st_size < 2_000_000
    return str(path)


# One child process measures both: the path `clip index` takes for the hostile file (read_job, as in a
# decoding worker), then load_image + CLIP preprocessing per mode.  Linux's peak RSS (VmHWM) is reset before
# each step (clear_refs 5) and compared with the RSS then.
MEASURE = """
import json, sys
from PIL import Image
from clip.preprocess import image_transform, load_image
from clip.search.scan import Job, read_job

def kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return kb("VmRSS:")

t = image_transform(224)
t(Image.new("RGB", (300, 300)))
base = reset()
kind, value = read_job(Job(sys.argv[1]), t)
out = {"read_job": [kind, getattr(value, "message", ""), (kb("VmHWM:") - base) * 1024]}
for path in sys.argv[2:]:
    base = reset()
    img = load_image(path, exif=True, max_bytes=None)
    x = t(img)
    out[img.mode] = (kb("VmHWM:") - base) * 1024
    del img, x
print(json.dumps(out))
"""
SIZE = (2000, 1500)


@pytest.fixture(scope="module")
def measured(float_tiff, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("modes")
    w, h = SIZE
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (h // 50, w // 50, 3), dtype=np.uint8)).resize((w, h))
    grey = np.asarray(rgb.convert("L"))
    images = [
        (rgb, "rgb.png"),
        (rgb.convert("RGBA"), "rgba.png"),
        (Image.fromarray(grey.astype(np.uint16) * 257), "i16.png"),
        (Image.fromarray(grey.astype(np.float32) / 255), "f.tif"),
    ]
    for img, name in images:
        img.save(folder / name, compress_level=1) if name.endswith(".png") else img.save(folder / name)
    return child(MEASURE, float_tiff, *(str(folder / name) for _, name in images))


def test_hostile_float_tiff_is_refused_before_decoding(float_tiff, measured):
    with pytest.raises(ImageTooLargeError, match=r"hostile\.tif.*7000x7000 in mode F.*limit is 1,024 MiB"):
        load_image(float_tiff)
    kind, message, peak = measured["read_job"]
    assert kind == "error" and "too large to decode safely" in message
    assert peak < 100 * 2**20  # it was ~1,950 MB
    # The bound depends on the mode: 8-bit photos are cheap, float images are not.
    assert decode_cost("RGB", 6000, 4000) < 2**27 < decode_cost("F", 6000, 4000)
    small = os.path.join(os.path.dirname(float_tiff), "small.tif")
    Image.new("F", (600, 600), 0.5).save(small)
    with pytest.raises(ImageTooLargeError):
        load_image(small, max_bytes=10 * 2**20)
    img = load_image(small, max_bytes=None)
    assert img.mode == "F" and image_transform(32)(img).shape == (3, 32, 32)


def test_decode_cost_bounds_the_real_peak(measured):
    w, h = SIZE
    peaks = {mode: peak for mode, peak in measured.items() if mode != "read_job"}
    assert set(peaks) == {"RGB", "RGBA", "I;16", "F"}
    for mode, peak in peaks.items():
        assert 0 < peak <= decode_cost(mode, w, h, exif=True), (mode, peak / (w * h))
