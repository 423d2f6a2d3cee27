"""clip.preprocess against torchvision's real pipeline (a test-only oracle), plus loading and augmentation."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ImageNotFoundError,
    Preprocess,
    RandomResizedCrop,
    center_crop,
    image_transform,
    load_image,
    resized_size,
    to_tensor_normalized,
)

try:  # torchvision is the test-only oracle; without it the other tests still run
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
except Exception as err:  # ImportError, or OSError where a CPU torch wheel lacks torchvision's CUDA libraries
    T = TF = None
    TV_ERROR = f"{type(err).__name__}: {err}"
else:
    TV_ERROR = ""
needs_tv = pytest.mark.skipif(T is None, reason=f"torchvision (the oracle) does not import: {TV_ERROR}")

SIZES = [(1, 1), (7, 300), (300, 7), (223, 225), (640, 480)]  # (width, height)
RESOLUTIONS = [224, 32, 336]
MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Per-image tensors are small: on a busy 2-core machine intra-op threads cost ~10x in spinning, no gain.
    # Element-wise results do not depend on the thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def oracle(resolution: int) -> T.Compose:
    """openai/CLIP's `_transform(n)`, written out with torchvision."""
    return T.Compose(
        [
            T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(resolution),
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def rgb_noise(width: int, height: int, seed: int = 0) -> Image.Image:
    # Smooth gradients plus noise: bicubic over- and undershoot both get exercised.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], -1)
    noisy = base + rng.normal(0, 40, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_mode(img: Image.Image, mode: str) -> Image.Image:
    if mode == "P+trns-int":
        out = img.convert("P")
        out.info["transparency"] = 3
        return out
    if mode == "P+trns-bytes":
        out = img.quantize(16)
        out.info["transparency"] = bytes(range(0, 256, 16))
        return out
    if mode == "P-adaptive":
        return img.quantize(37)
    if mode in ("LA", "RGBA"):
        # Varying alpha, including fully transparent pixels, so premultiplied resizing matters.
        alpha = Image.fromarray(
            (np.arange(img.width * img.height) % 7 * 42).astype(np.uint8).reshape(img.size[::-1])
        )
        out = img.convert(mode)
        out.putalpha(alpha)
        return out
    return img.convert(mode)


# Every mode torchvision's pipeline handles correctly; "I" and "F" hold 8-bit-range values here.
COMMON_MODES = ["RGB", "L", "P-adaptive", "RGBA"]
OTHER_MODES = [
    "1",
    "LA",
    "P",
    "P+trns-int",
    "P+trns-bytes",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "F",
]


def resolutions_for(mode: str, size: tuple[int, int]) -> list[int]:
    # The full size x resolution grid on the common modes; the other modes take one resolution per size,
    # rotated with the mode so that every (size, resolution) pair still meets several modes. Keeps it fast.
    if mode in COMMON_MODES:
        return RESOLUTIONS
    return [RESOLUTIONS[(SIZES.index(size) + OTHER_MODES.index(mode)) % len(RESOLUTIONS)]]


@needs_tv
@pytest.mark.parametrize("mode", COMMON_MODES + OTHER_MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_torchvision_exactly(mode: str, size: tuple[int, int]) -> None:
    img = make_mode(rgb_noise(*size), mode)
    for n in resolutions_for(mode, size):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about byte transparency in the oracle only
            want = oracle(n)(img)
        got = image_transform(n)(img)
        assert got.dtype == torch.float32 and got.shape == (3, n, n) and got.is_contiguous()
        # Bit-identical, which is stronger than the 1/255 pixel tolerance; the message shows the pixel error.
        assert torch.equal(got, want), (
            f"{mode} {size} at {n}: {(unnormalise(got) - unnormalise(want)).abs().max()}"
        )


def test_no_pillow_warning_for_byte_transparency() -> None:
    img = make_mode(rgb_noise(40, 30), "P+trns-bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_transform(32)(img)
    assert "transparency" in img.info  # the caller's image is not modified


@needs_tv
def test_resized_size_rule() -> None:
    assert resized_size(640, 480, 224) == (298, 224)  # int(224 * 640 / 480) = 298.67 -> 298
    assert resized_size(480, 640, 224) == (224, 298)
    assert resized_size(7, 300, 224) == (224, 9600)
    assert resized_size(1, 1, 336) == (336, 336)
    for w, h in [(223, 225), (1000, 999), (3, 5), (5, 3), (333, 1000)]:
        for n in (32, 224, 336):
            assert resized_size(w, h, n) == T.Resize(n)(Image.new("L", (w, h))).size


@needs_tv
@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "F", "I;16"])
@pytest.mark.parametrize("crop", [(9, 9), (4, 12), (12, 4), (5, 6), (8, 7)])
def test_center_crop_pads_like_torchvision(mode: str, crop: tuple[int, int]) -> None:
    # Images smaller than the crop (even and odd differences) are zero-padded; palette index 0 for "P".
    img = rgb_noise(7, 6, seed=1)
    img = img.convert("L").convert(mode) if mode == "I;16" else img.convert(mode)
    got, want = center_crop(img, crop), T.CenterCrop(crop)(img)
    assert got.mode == want.mode and got.size == want.size == (crop[1], crop[0])
    assert np.array_equal(np.asarray(got), np.asarray(want))
    if mode == "P":
        assert got.getpalette() == want.getpalette()


@needs_tv
def test_center_crop_offsets_round_half_to_even() -> None:
    # (11 - 4) / 2 = 3.5 -> round() gives 4; (9 - 4) / 2 = 2.5 -> 2 (Python's round-half-even, as torchvision).
    img = Image.fromarray(np.arange(11 * 9, dtype=np.uint8).reshape(9, 11))
    got = np.asarray(center_crop(img, 4))
    assert got[0, 0] == 2 * 11 + 4
    assert np.array_equal(got, np.asarray(T.CenterCrop(4)(img)))


SIXTEEN = ["I;16", "I;16L", "I;16B", "I;16N"]


def sixteen_bit(values: np.ndarray, mode: str) -> Image.Image:
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, values.shape[::-1], values.astype(dtype).tobytes())


@pytest.mark.parametrize("mode", SIXTEEN)
def test_sixteen_bit_is_scaled_not_clipped(mode: str) -> None:
    # A 16-bit image holding an 8-bit image's values x 257 must look like that 8-bit image (torchvision clips
    # nearly everything to white instead).
    gray = rgb_noise(223, 225).convert("L")
    img = sixteen_bit(np.asarray(gray).astype(np.uint32) * 257, mode)
    assert img.mode == mode
    for n in (32, 224):
        got, want = image_transform(n)(img), image_transform(n)(gray)
        assert got.shape == (3, n, n) and torch.isfinite(got).all()
        assert (unnormalise(got) - unnormalise(want)).abs().max() <= 1 / 255 + 1e-6


def test_int_and_float_modes_outside_8bit_range() -> None:
    gray = rgb_noise(300, 7).convert("L")
    arr = np.asarray(gray).astype(np.float64)
    want = image_transform(32)(gray)
    cases = {
        "I 16-bit values": Image.fromarray((arr * 257).astype(np.int32)),
        "F in 0..1": Image.fromarray((arr / 255).astype(np.float32)),
        "F 16-bit values": Image.fromarray((arr * 257).astype(np.float32)),
    }
    for name, img in cases.items():
        got = image_transform(32)(img)
        assert (unnormalise(got) - unnormalise(want)).abs().max() <= 1 / 255 + 1e-6, name


def test_odd_float_values_give_finite_output() -> None:
    arr = np.full((30, 40), 0.5, np.float32)
    arr[0, 0], arr[1, 1], arr[2, 2], arr[3, 3] = np.nan, np.inf, -np.inf, -5.0
    for img in (Image.fromarray(arr), Image.fromarray(np.full((5, 5), 2**31 - 1, np.int32))):
        got = image_transform(32)(img)
        assert got.shape == (3, 32, 32) and torch.isfinite(got).all()
        pixels = unnormalise(got)
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_la_and_pa_modes() -> None:
    rgba = make_mode(rgb_noise(50, 31), "RGBA")
    la = make_mode(rgb_noise(50, 31), "LA")
    pa = rgba.convert("PA")
    premult = la.convert("La")
    assert pa.mode == "PA" and premult.mode == "La"
    # PA is made RGBA before resizing, so palette indices are never blended.
    assert torch.equal(image_transform(32)(pa), image_transform(32)(pa.convert("RGBA")))
    got = image_transform(32)(premult)  # torchvision raises: Pillow cannot convert La to RGB
    assert torch.equal(got, image_transform(32)(premult.convert("LA")))


def test_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="PIL.Image"):
        image_transform(32)(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="empty image"):
        image_transform(32)(Image.new("RGB", (0, 5)))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="resolution"):
            image_transform(bad)
    with pytest.raises(ValueError, match="std"):
        image_transform(32, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="3 values"):
        image_transform(32, mean=(0.5, 0.5))


@needs_tv
def test_custom_mean_std_match_torchvision() -> None:
    img = rgb_noise(64, 48)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.25, 0.125)
    want = T.Compose(
        [T.Resize(40, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(40), T.ToTensor()]
    )
    assert torch.equal(image_transform(40, mean, std)(img), T.Normalize(mean, std)(want(img)))


def test_repr_attributes_and_pickle() -> None:
    pre = image_transform(224)
    assert isinstance(pre, Preprocess)
    assert (pre.resolution, pre.mean, pre.std) == (224, CLIP_MEAN, CLIP_STD)
    assert repr(pre).startswith("Preprocess(resolution=224, mean=(0.48145466")
    img = rgb_noise(30, 20)
    for obj in (pre, RandomResizedCrop(32, scale=(0.5, 1.0))):
        back = pickle.loads(pickle.dumps(obj))
        assert back == obj and repr(back) == repr(obj)
    assert torch.equal(pickle.loads(pickle.dumps(pre))(img), pre(img))


# ---------------------------------------------------------------------------------------------- fast path


@needs_tv
def test_to_tensor_normalized_matches_torchvision() -> None:
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (4, 17, 13, 3), dtype=np.uint8)
    tv = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    got = to_tensor_normalized(batch)
    assert got.shape == (4, 3, 17, 13) and got.dtype == torch.float32 and got.is_contiguous()
    for i in range(4):
        assert torch.equal(got[i], tv(batch[i]))
        assert torch.equal(to_tensor_normalized(batch[i]), tv(batch[i]))
    batch.flags.writeable = False  # e.g. np.asarray of a PIL image or a memory map
    assert torch.equal(to_tensor_normalized(batch), got)
    with pytest.raises(ValueError, match="uint8"):
        to_tensor_normalized(batch.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_tensor_normalized(batch[..., :2])


# ------------------------------------------------------------------------------------------- augmentation


def test_random_resized_crop_deterministic_per_rng() -> None:
    aug = RandomResizedCrop(32, scale=(0.3, 1.0))
    img = rgb_noise(64, 48)
    first = aug(img, np.random.default_rng(7))
    torch.manual_seed(123)
    np.random.seed(123)  # global seeds must not matter
    assert torch.equal(aug(img, np.random.default_rng(7)), first)
    assert not torch.equal(aug(img, np.random.default_rng(8)), first)
    for size in SIZES:
        out = aug(rgb_noise(*size), np.random.default_rng(0))
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_random_resized_crop_params_in_bounds() -> None:
    aug = RandomResizedCrop(16, scale=(0.5, 0.9), ratio=(0.75, 4 / 3))
    rng = np.random.default_rng(0)
    for width, height in [(100, 80), (80, 100), (300, 7), (1, 1), (2, 3)]:
        for _ in range(200):
            top, left, h, w = aug.get_params(width, height, rng)
            assert 0 < h <= height and 0 < w <= width
            assert 0 <= top <= height - h and 0 <= left <= width - w
    areas = [np.prod(aug.get_params(100, 80, rng)[2:]) / 8000 for _ in range(300)]
    assert 0.47 <= min(areas) and max(areas) <= 0.93  # within `scale`, up to rounding of the sides
    # An extreme aspect image falls back to a central crop with the aspect clamped to `ratio`.
    assert aug.get_params(300, 7, rng) == (0, 145, 7, 9)


@needs_tv
@pytest.mark.parametrize("mode", ["RGB", "P", "RGBA", "L"])
def test_random_resized_crop_box_matches_torchvision(mode: str) -> None:
    aug = RandomResizedCrop(24)
    img = make_mode(rgb_noise(70, 50), mode)
    box = aug.get_params(img.width, img.height, np.random.default_rng(5))
    cropped = TF.resized_crop(img, *box, [24, 24], interpolation=T.InterpolationMode.BICUBIC)
    want = T.Normalize(CLIP_MEAN, CLIP_STD)(T.ToTensor()(cropped.convert("RGB")))
    assert torch.equal(aug.apply(img, box), want)
    assert torch.equal(aug(img, np.random.default_rng(5)), want)


def test_random_resized_crop_full_square_equals_preprocess() -> None:
    img = rgb_noise(50, 50)
    aug = RandomResizedCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(aug(img, np.random.default_rng(0)), image_transform(32)(img))


def test_random_resized_crop_rejects_bad_args() -> None:
    for kwargs in (
        {"scale": (0.0, 1.0)},
        {"scale": (0.9, 0.5)},
        {"scale": (0.5, 1.5)},
        {"ratio": (2.0, 1.0)},
    ):
        with pytest.raises(ValueError):
            RandomResizedCrop(32, **kwargs)


# ------------------------------------------------------------------------------------------------ loading


def test_load_image_keeps_mode_and_decodes(tmp_path: Path) -> None:
    path = tmp_path / "pal.png"
    make_mode(rgb_noise(20, 10), "P-adaptive").save(path)
    fds = Path("/proc/self/fd")
    before = len(list(fds.iterdir())) if fds.is_dir() else None
    img = load_image(path)
    assert img.mode == "P" and img.size == (20, 10) and np.asarray(img).shape == (10, 20)
    if before is not None:  # decoded and closed: a lazily loaded image would still hold the file open
        assert len(list(fds.iterdir())) == before


def test_load_image_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgb_noise(40, 20).save(path, exif=exif)
    assert load_image(path).size == (40, 20)  # OpenAI's behaviour: orientation ignored
    assert load_image(str(path), exif=True).size == (20, 40)


def test_load_image_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError, match="not found.*nope.png") as info:
        load_image(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ImageNotFoundError)

    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    with pytest.raises(ValueError, match="not an image.*notes.txt"):
        load_image(text)

    good = tmp_path / "good.png"
    rgb_noise(64, 64).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.png.*truncated"):
        load_image(truncated)

    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path)


def test_package_does_not_import_torchvision() -> None:
    code = "import sys, clip.preprocess; assert 'torchvision' not in sys.modules, 'torchvision imported'"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
