"""openai/CLIP's preprocessing as a list of steps, for code that slices `preprocess.transforms`.

openai/CLIP returns `Compose([Resize(n, BICUBIC), CenterCrop(n), _convert_image_to_rgb, ToTensor(),
Normalize(mean, std)])`, and client code reuses its parts: `preprocess.transforms[-1]` to normalise
differentiable tensors (CLIP guidance), `Compose(preprocess.transforms[:2])` for the PIL geometry.
These steps are torchvision-free and compose to exactly `Preprocess.__call__` (tested).  Their
attributes are torchvision's (`size`, `interpolation`, `mean`, `std`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Resize:
    """Short side to `size` (bicubic; the long side truncated as torchvision does)."""

    size: int
    interpolation: str = "bicubic"

    def __call__(self, img: Image.Image) -> Image.Image:
        from clip.preprocess import _prepare_mode, resize_short_side

        return resize_short_side(_prepare_mode(img), self.size)


@dataclass(frozen=True)
class CenterCrop:
    size: int

    def __call__(self, img: Image.Image) -> Image.Image:
        from clip.preprocess import center_crop

        return center_crop(img, self.size)


def _convert_image_to_rgb(image: Image.Image) -> Image.Image:
    """openai/CLIP's step: `image.convert("RGB")` (alpha dropped, not composited)."""
    from clip.preprocess import _to_rgb

    return _to_rgb(image)


@dataclass(frozen=True)
class ToTensor:
    """uint8 RGB PIL image -> float32 [3, H, W] in 0..1 (torchvision's ToTensor for RGB images)."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img, dtype=np.uint8)
        return torch.tensor(arr).movedim(-1, -3).contiguous().to(torch.float32).div_(255)


@dataclass(frozen=True)
class Normalize:
    """(x - mean) / std per channel on [..., 3, H, W] tensors; differentiable (not in place)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
        return (tensor - mean) / std


@dataclass(frozen=True)
class Compose:
    """Apply `transforms` in order (torchvision's Compose, for slices of `preprocess.transforms`)."""

    transforms: Sequence[Callable[[Any], Any]]

    def __call__(self, x: Any) -> Any:
        for t in self.transforms:
            x = t(x)
        return x


def openai_steps(
    resolution: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> list[Callable[[Any], Any]]:
    """The five steps of openai/CLIP's `_transform(n_px)`, in its order."""
    return [
        Resize(resolution),
        CenterCrop(resolution),
        _convert_image_to_rgb,
        ToTensor(),
        Normalize(tuple(mean), tuple(std)),
    ]
