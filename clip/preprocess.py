"""Image preprocessing: openai/CLIP's torchvision pipeline restated with Pillow, NumPy and torch.

OpenAI's `clip.load` returns

    Compose([Resize(n, interpolation=BICUBIC), CenterCrop(n), convert("RGB"), ToTensor(), Normalize(m, s)])

and `image_transform(n)` gives the same float32 numbers (bit for bit on every mode torchvision handles)
without importing torchvision. The steps, in order, and the rules they follow:

1. Resize so the short side is `n`; the long side becomes `int(n * long / short)` (torchvision truncates).
   Pillow's bicubic filter runs in the image's *own* mode: "1" and "P" are always resized nearest-neighbour
   (Pillow forces it, so palette indices are never blended); "LA" and "RGBA" are resized premultiplied.
2. Centre-crop `n x n`, with the offset `int(round((size - n) / 2.0))` (Python's round: halves go to even).
   Where the image is smaller than the crop it is padded with zeros (palette index 0 for "P"), the extra pixel
   of an odd padding going right / bottom. After step 1 this never happens, but `center_crop` supports it.
3. `convert("RGB")`: alpha and transparency are dropped (not composited on a background), as OpenAI does.
4. uint8 HWC -> float32 CHW, divided by 255, minus mean, divided by std (the same float32 operations).

Modes where torchvision's pipeline fails or gives nonsense are first mapped to a mode that works (this is the
only place the numbers differ from torchvision, and only for these inputs). High-bit images are scaled to the
8-bit range and rounded to an "L" image *before* resizing, so a 16-bit image holding an 8-bit image's values
times 257 gives exactly that 8-bit image's result:

- "I;16", "I;16L", "I;16B", "I;16N" (16-bit PNG / TIFF): torchvision clips to 255, so nearly every pixel is
  white. Here values are scaled by 1/257 (65535 -> 255).
- "I" (32-bit int; older Pillow opens 16-bit PNGs this way): kept as is when every value lies in 0..255
  (exactly torchvision's result); otherwise values up to 65535 are scaled by 1/257, larger ranges by 255/max.
- "F" (32-bit float): kept as is when finite and within 0..255 with a maximum above 1 (torchvision's result:
  resized in float, then truncated to 8 bits by Pillow). If the maximum is at most 1 the image is taken as
  0..1 data (float TIFF) and scaled by 255; above 255 the "I" rule applies. NaN becomes 0, +inf 255, and negative
  values clip to 0. Because the range is read from the image, a float image whose maximum is at most 1 is
  always treated as 0..1 data, even one that was meant on the 0..255 scale (it would be nearly black).
- "La" (premultiplied): Pillow cannot convert it to RGB; it is un-premultiplied to "LA" first.
- "PA" (palette + alpha): Pillow would blend palette *indices* bicubically; it is converted to "RGBA" first.

Every other mode ("1", "L", "LA", "P" with or without transparency, "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
"YCbCr", "LAB", "HSV") follows torchvision exactly, oddities included (CMYK uses Pillow's naive conversion).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from clip.config import CLIP_MEAN, CLIP_STD, CLIPConfig  # CLIP_MEAN/STD: the one definition, re-exported

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


# ----------------------------------------------------------------------------------------------- geometry


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's `Resize(size)` with an int size: short side = size.

    The long side is `int(size * long / short)`, computed in that order in floating point, like torchvision.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize `img` bicubically (in its own mode) so its short side is `size`; unchanged if already so."""
    new_size = resized_size(img.width, img.height, size)
    if new_size == img.size:
        return img
    return img.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Crop the centre `size` (an int or (height, width)) as torchvision's `CenterCrop`; always a new image.

    Where the image is smaller than the crop, the outside is zero (palette index 0 for "P"), with the extra
    pixel of an odd difference on the right / bottom: Pillow's `crop` zero-fills outside the image, which is what
    torchvision's pad-with-0-then-crop amounts to.
    """
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    top = _crop_offset(img.height, crop_h)
    left = _crop_offset(img.width, crop_w)
    return img.crop((left, top, left + crop_w, top + crop_h))


def _crop_offset(length: int, crop: int) -> int:
    if crop > length:
        # torchvision pads (crop - length) // 2 before, the rest after, then crops at 0.
        return -((crop - length) // 2)
    return int(round((length - crop) / 2.0))


# -------------------------------------------------------------------------------------------------- modes


def _prepare_mode(img: Image.Image) -> Image.Image:
    """Map the modes torchvision mishandles (see the module docstring) to ones it handles; others as is."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(img).__name__}; open files with load_image()")
    if img.width == 0 or img.height == 0:
        raise ValueError(f"cannot preprocess an empty image (size {img.width}x{img.height})")
    if img.mode == "La":
        return img.convert("LA")
    if img.mode == "PA":
        return img.convert("RGBA")
    if img.mode in _SIXTEEN_BIT_MODES:
        return _to_l(np.asarray(img, dtype=np.float64) / 257.0)
    if img.mode in ("I", "F"):
        return _wide_to_8bit_scale(img)
    return img


def _wide_to_8bit_scale(img: Image.Image) -> Image.Image:
    """An "I" or "F" image on the 8-bit scale: `img` itself when it already is (0..255), else an "L" copy."""
    arr = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(arr)
    all_finite = bool(finite.all())
    values = arr if all_finite else arr[finite]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    unit_float = img.mode == "F" and hi <= 1.0
    if all_finite and lo >= 0.0 and hi <= 255.0 and not unit_float:
        return img  # torchvision's own route gives the right numbers
    if unit_float:
        scale = 255.0
    elif hi <= 255.0:
        scale = 1.0
    elif hi <= 65535.0:
        scale = 1.0 / 257.0
    else:
        scale = 255.0 / hi
    return _to_l(np.nan_to_num(arr * scale, nan=0.0, posinf=255.0, neginf=0.0))


def _to_l(arr: np.ndarray) -> Image.Image:
    """An "L" image from values on the 0..255 scale, rounded to nearest (Pillow's F -> L would truncate)."""
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    """`img.convert("RGB")`, without Pillow's warning about byte-string palette transparency (same pixels)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and isinstance(img.info.get("transparency"), bytes):
        img = img.copy()  # the caller's image keeps its info
        del img.info["transparency"]
    return img.convert("RGB")


# ------------------------------------------------------------------------------------------------ tensors


def _check_mean_std(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean_t) != 3 or len(std_t) != 3:
        raise ValueError(f"mean and std need 3 values (R, G, B), got mean={mean!r} std={std!r}")
    if not all(math.isfinite(m) for m in mean_t) or not all(math.isfinite(s) and s > 0 for s in std_t):
        raise ValueError(f"mean must be finite and std finite and positive, got mean={mean!r} std={std!r}")
    return mean_t, std_t


def to_tensor_normalized(
    arr: np.ndarray, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> torch.Tensor:
    """uint8 RGB pixels -> normalised float32 tensor, no resizing: the fast path for data already at size.

    arr: uint8 [H, W, 3] or [N, H, W, 3]. Returns float32 [3, H, W] or [N, 3, H, W], contiguous, equal bit for
    bit to torchvision's `Normalize(mean, std)(ToTensor()(arr))` (x / 255, minus mean, divided by std).
    """
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 numpy array, got {type(arr).__name__} {getattr(arr, 'dtype', '')}"
        )
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"expected shape [H, W, 3] or [N, H, W, 3], got {list(arr.shape)}")
    mean_t, std_t = _check_mean_std(mean, std)
    # torch.tensor copies, so read-only arrays (np.asarray of a PIL image) are fine; HWC -> CHW in uint8.
    x = torch.tensor(arr).movedim(-1, -3).contiguous().to(torch.float32).div_(255)
    view = (3, 1, 1)
    mean_x = torch.tensor(mean_t, dtype=torch.float32).view(view)
    return x.sub_(mean_x).div_(torch.tensor(std_t, dtype=torch.float32).view(view))


def _rgb_to_tensor(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[3, H, W] float32 from an image of any mode via `convert("RGB")`."""
    return to_tensor_normalized(np.asarray(_to_rgb(img), dtype=np.uint8), mean, std)


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")


# ------------------------------------------------------------------------------------------- transforms


_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocess:
    """CLIP's evaluation transform: PIL image (any mode, any size) -> float32 [3, resolution, resolution].

    Equal to openai/CLIP's torchvision `Compose` (see the module docstring for the rules and the handful of
    modes that are mapped first). Picklable, so it can go to DataLoader workers.

    OpenCLIP's other preprocessing options: `resize_mode="squash"` resizes both sides to `resolution` with no
    crop (SigLIP, CLIPA: torchvision's `Resize((n, n))`, Hugging Face's `SiglipImageProcessor`), and
    `interpolation="bilinear"` resamples bilinearly; both resize in the image's own mode, as above.
    """

    resolution: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        _check_resolution(self.resolution)
        if self.resize_mode not in ("shortest", "squash") or self.interpolation not in _RESAMPLING:
            raise ValueError(
                f"resize_mode must be 'shortest' or 'squash' and interpolation 'bicubic' or 'bilinear', got "
                f"{self.resize_mode!r} and {self.interpolation!r}"
            )
        mean, std = _check_mean_std(self.mean, self.std)
        object.__setattr__(self, "mean", mean)  # frozen: store normalised tuples (lists would not hash)
        object.__setattr__(self, "std", std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = _prepare_mode(img)
        n, resample = self.resolution, _RESAMPLING[self.interpolation]
        if self.resize_mode == "squash":
            img = img if img.size == (n, n) else img.resize((n, n), resample)
        else:
            size = resized_size(img.width, img.height, n)
            img = center_crop(img if size == img.size else img.resize(size, resample), n)
        return _rgb_to_tensor(img, self.mean, self.std)

    @property
    def transforms(self) -> list:
        """openai/CLIP's steps in its order (Resize, CenterCrop, convert RGB, ToTensor, Normalize), for
        code that slices `preprocess.transforms`; composed they equal this transform exactly."""
        from clip.transforms import openai_steps

        if (self.resize_mode, self.interpolation) != ("shortest", "bicubic"):  # not openai/CLIP's steps
            raise ValueError(
                f"transforms lists openai/CLIP's steps (short side, bicubic, centre crop); this transform is "
                f"resize_mode={self.resize_mode!r}, interpolation={self.interpolation!r}: call it directly"
            )
        return openai_steps(self.resolution, self.mean, self.std)


def image_transform(
    resolution: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD, *,
    resize_mode: str = "shortest", interpolation: str = "bicubic",
) -> Preprocess:  # fmt: skip
    """The transform `clip.load` returns for a model with input size `resolution` (e.g. 224 or 336);
    `resize_mode` / `interpolation` as the model's config says (SigLIP: "squash", "bicubic")."""
    return Preprocess(resolution, tuple(mean), tuple(std), resize_mode, interpolation)


def preprocess_for(config: CLIPConfig) -> Preprocess:
    """The evaluation transform a model config asks for: size, mean/std, resize mode and interpolation."""
    return image_transform(config.vision.image_size, config.mean, config.std, resize_mode=config.resize_mode,
                           interpolation=config.interpolation)  # fmt: skip


@dataclass(frozen=True)
class RandomResizedCrop:
    """Training augmentation: a random crop (area fraction `scale`, aspect `ratio`) resized to a square.

    `__call__(img, rng)` draws only from `rng`, so a sample's crop depends on the generator the caller derives
    for it (for example `numpy.random.default_rng([seed, epoch, index])`), not on worker count or global
    seeds. The crop is chosen as torchvision's `RandomResizedCrop.get_params` does (10 tries, then a central
    crop with the aspect clamped to `ratio`); crop and bicubic resize happen in the image's mode, then the same RGB
    conversion and normalisation as `Preprocess`. Returns float32 [3, resolution, resolution].
    """

    resolution: int
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        _check_resolution(self.resolution)
        scale, ratio = tuple(float(s) for s in self.scale), tuple(float(r) for r in self.ratio)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.scale!r}")
        if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1] or not math.isfinite(ratio[1]):
            raise ValueError(f"ratio must be (lo, hi) with 0 < lo <= hi, got {self.ratio!r}")
        mean, std = _check_mean_std(self.mean, self.std)
        for name, value in (("scale", scale), ("ratio", ratio), ("mean", mean), ("std", std)):
            object.__setattr__(self, name, value)

    def get_params(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Crop box (top, left, height, width) for an image of `width` x `height`, drawn from `rng`."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        # Fallback (rare: extreme aspect images): the largest central crop with the aspect clamped to `ratio`.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        h, w = max(h, 1), max(w, 1)  # only an extreme `ratio` could round a side to 0
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        img = _prepare_mode(img)
        return self._crop_resize(img, self.get_params(img.width, img.height, rng))

    def apply(self, img: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
        """Crop `box` = (top, left, height, width) and resize to the output square; no randomness."""
        return self._crop_resize(_prepare_mode(img), box)

    def _crop_resize(self, img: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
        top, left, h, w = box
        img = img.crop((left, top, left + w, top + h))
        n = self.resolution
        if img.size != (n, n):
            img = img.resize((n, n), Image.Resampling.BICUBIC)
        return _rgb_to_tensor(img, self.mean, self.std)


# ------------------------------------------------------------------------------------------------ loading


class ImageNotFoundError(ValueError, FileNotFoundError):
    """A missing image file; both a ValueError (like every unreadable image) and a FileNotFoundError."""


class ImageTooLargeError(ValueError):
    """An image whose decoding and preprocessing would need more memory than allowed (checked before decoding)."""


# The most memory one image may take to decode and preprocess (`load_image`'s default bound): a photo of up to
# ~200 megapixels in RGB, ~31 in 16-bit grey, ~22 in 32-bit float.  With one decoding worker per core, a few
# hostile files (a 344 KB 7000x7000 float TIFF needs ~1.9 GB) can no longer exhaust a machine's memory.
MAX_DECODE_BYTES = 1 << 30

# Peak bytes per pixel of `load_image` followed by CLIP's preprocessing, by mode: measured peaks (5 and 9
# megapixels; RGB 4.5, RGBA 8.5, I;16 26-30, F 36-37) rounded up to what the steps could hold at once.
# Pillow holds 8-bit multi-band images as 4 bytes per pixel, alpha modes are resized premultiplied (a second
# copy), and "I" / "F" / 16-bit images pass through several float64 arrays in `_prepare_mode`.  Modes not
# listed are charged like "F".
_BYTES_PER_PIXEL = {
    "1": 2, "L": 2, "P": 2,
    "RGB": 5, "RGBX": 5, "CMYK": 5, "YCbCr": 5, "LAB": 5, "HSV": 5,
    "LA": 9, "La": 9, "PA": 13, "RGBA": 9, "RGBa": 9,
    "I;16": 34, "I;16L": 34, "I;16B": 34, "I;16N": 34,
    "I": 48, "F": 48,
}  # fmt: skip
_STORED_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # else 4


def decode_cost(mode: str, width: int, height: int, exif: bool = False) -> int:
    """Bytes that decoding a `width` x `height` image of `mode` and preprocessing it for CLIP may take at peak.

    Known from the file's header alone (after `Image.open`, before `load`), so callers can refuse an image
    before it costs anything.  `exif`: the orientation is applied, which may hold a rotated copy.
    """
    pixels = int(width) * int(height)
    per_pixel = _BYTES_PER_PIXEL.get(mode, _BYTES_PER_PIXEL["F"])
    if exif:
        per_pixel += _STORED_BYTES_PER_PIXEL.get(mode, 4)
    return pixels * per_pixel


def _check_decode_budget(name: str, img: Image.Image, exif: bool, max_bytes: int | None) -> None:
    """Raise ImageTooLargeError, naming the file, if decoding `img` would exceed `max_bytes`."""
    if max_bytes is None:
        return
    cost = decode_cost(img.mode, img.width, img.height, exif)
    if cost > max_bytes:
        raise ImageTooLargeError(
            f"image too large to decode safely: {name!r} is {img.width}x{img.height} in mode {img.mode}, "
            f"which needs ~{cost / 2**20:,.0f} MiB to decode and preprocess (the limit is "
            f"{max_bytes / 2**20:,.0f} MiB); downscale it or convert it to 8 bits per channel"
        )


def load_image(
    path: str | os.PathLike[str], exif: bool = False, *, max_bytes: int | None = MAX_DECODE_BYTES
) -> Image.Image:
    """Open and fully decode an image file, in its stored mode, with nothing applied (as OpenAI's clip does).

    With `exif=True` the EXIF orientation tag is applied (the image is rotated / flipped upright); OpenAI does
    not do this, so leave it off to reproduce their numbers. Raises ValueError naming the file and the problem
    for a missing (`ImageNotFoundError`, also a FileNotFoundError), unreadable, non-image or truncated file.

    max_bytes: refuse (`ImageTooLargeError`, a ValueError) before decoding an image whose decoding plus CLIP
    preprocessing would take more memory than this (`decode_cost`: pixel count times a cost per mode); None
    for no bound beyond Pillow's decompression-bomb check.
    """
    name = os.fspath(path)
    try:
        with Image.open(name) as img:
            _check_decode_budget(name, img, exif, max_bytes)  # from the header: nothing decoded yet
            img.load()  # decode now: a truncated file fails here, not later in a DataLoader worker
    except ImageTooLargeError:
        raise
    except FileNotFoundError as err:
        raise ImageNotFoundError(f"image file not found: {name!r}") from err
    except Image.UnidentifiedImageError as err:
        raise ValueError(f"not an image file (format not recognised): {name!r}") from err
    except Image.DecompressionBombError as err:
        raise ValueError(f"image too large to decode safely: {name!r}: {err}") from err
    except IsADirectoryError as err:
        raise ValueError(f"expected an image file, got a directory: {name!r}") from err
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as err:
        # Pillow reports corrupt or truncated data with any of these, depending on the format and the break.
        raise ValueError(f"cannot decode image {name!r} (truncated or corrupt?): {err}") from err
    if exif:
        ImageOps.exif_transpose(img, in_place=True)  # no copy of an upright image
    return img
