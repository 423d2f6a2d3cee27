"""The emoji data as a training set for `clip.train.train`: augmented images, sampled captions, and
a concept-balanced batch order.

Every random choice of sample `i` in epoch `e` comes from `numpy.random.default_rng([seed, e, i])`,
so a run does not depend on the number of DataLoader workers and resumes exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from clip.data.emoji import EmojiData, sample_caption
from clip.preprocess import CLIP_MEAN, CLIP_STD, RandomResizedCrop, to_tensor_normalized
from clip.tokenizer import tokenize


class EmojiPairs:
    """Image-caption pairs from `EmojiData` rows `indices`.

    `get(i, epoch)` -> (image float [3, S, S] normalised with CLIP's mean/std, token ids int32 [L]).
    Augmentation: a random resized crop (scale `crop_scale`) and a brightness/contrast/saturation
    jitter of up to `jitter` (0 = none), with probability `gray_blur` a grey-scale copy and a 3x3 blur, and a
    lighting ramp of strength up to `shade` (0 = none): the last two help the held-out, differently shaded style.
    No flips: names say "facing right" and images hold text and arrows.
    """

    def __init__(
        self,
        data: EmojiData,
        indices: np.ndarray,
        context_length: int,
        seed: int = 0,
        crop_scale: tuple[float, float] = (0.7, 1.0),
        jitter: float = 0.3,
        gray_blur: float = 0.0,
        shade: float = 0.0,
    ) -> None:
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        self.context_length = context_length
        self.seed = seed
        self.crop = RandomResizedCrop(data.size, scale=crop_scale)
        self.jitter = jitter
        self.gray_blur = gray_blur
        self.shade = shade
        self._mean = torch.tensor(CLIP_MEAN)[:, None, None]
        self._std = torch.tensor(CLIP_STD)[:, None, None]
        self._axis = torch.linspace(-1.0, 1.0, data.size)
        self.concepts = [data.concept(int(c)) for c in range(data.num_concepts)]
        self._token_cache: dict[str, torch.Tensor] = {}
        self._pil_cache: dict[int, Image.Image] = {}

    def _image(self, row: int) -> Image.Image:
        """The stored pixels of `row` as a PIL image, made once per process (a few thousand 32 px images, ~3 KB
        each): converting the array every time was a quarter of the crops' cost."""
        image = self._pil_cache.get(row)
        if image is None:
            image = self._pil_cache[row] = Image.fromarray(self.data.images[row])
        return image

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, i: int) -> str:
        row = int(self.indices[i])
        style = self.data.style_names[int(self.data.image_style[row])]
        return f"{style}/{self.data.codepoints[self.data.image_concept[row]]}"

    def get(self, i: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, tokens = self.get_batch([i], epoch)
        return images[0], tokens[0]

    def get_batch(self, positions: list[int], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `positions` of `epoch` at once: images float [B, 3, S, S], token ids int32 [B, L].

        Each sample's random draws come from its own generator, in the same order as one at a time, so a batch
        equals its samples' `get`; the pixel work then runs on the whole batch (the training loop's DataLoader
        calls this through `__getitems__`), an order of magnitude fewer tensor ops than sample by sample.
        """
        crops, draws, captions = [], [], []
        for i in positions:
            rng = np.random.default_rng([self.seed, epoch, i])
            row = int(self.indices[i])
            box = self.crop.get_params(self.data.size, self.data.size, rng)
            crops.append(_crop_pixels(self._image(row), box, self.data.size))
            draws.append([*(rng.random(3) if self.jitter > 0 else ()), *(rng.random(2) if self.gray_blur > 0 else ()),
                          *(rng.random(2) if self.shade > 0 else ())])  # fmt: skip
            captions.append(sample_caption(self.concepts[int(self.data.image_concept[row])], rng))
        images = to_tensor_normalized(np.stack(crops))  # [B, 3, S, S]
        u = torch.tensor(np.asarray(draws, dtype=np.float64)).float().reshape(len(positions), -1)
        if self.jitter > 0:
            images, u = self._jitter(images, u[:, :3]), u[:, 3:]
        if self.gray_blur > 0:
            images, u = self._gray_blur(images, u[:, :2]), u[:, 2:]
        if self.shade > 0:
            images = self._shade(images, u[:, :2])
        return images, self._tokens(captions)

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        """Token ids int32 [B, L], each distinct caption tokenized once per process (captions repeat every epoch:
        a few thousand names and keyword lists; BPE was ~10 ms of a batch's ~20 ms of data work)."""
        new = sorted({c for c in captions if c not in self._token_cache})
        if new:
            for c, row in zip(new, tokenize(new, context_length=self.context_length, truncate=True)):
                self._token_cache[c] = row
        return torch.stack([self._token_cache[c] for c in captions])

    def _gray_blur(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """With probability `gray_blur` each: drop colour, and blur with a 3x3 box (shape over outlines)."""
        gray = (u[:, 0] < self.gray_blur)[:, None, None, None]
        images = torch.where(gray, images.mean(dim=1, keepdim=True).expand_as(images), images)
        blur = (u[:, 1] < self.gray_blur).nonzero().flatten()
        if len(blur):
            images[blur] = box_blur3(images[blur])  # only the images drawn for a blur: half the work
        return images

    def _shade(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Light the drawing from a random side: scale the non-white pixels by a linear ramp 1 +- `shade`
        across the image (flat vector art made to look lit, like the held-out 3-D renders)."""
        angle, strength = (u[:, 0].double() * 2 * math.pi).float(), u[:, 1] * self.shade  # [B]
        axis = self._axis
        ramp = 1 + strength[:, None, None] * (
            angle.cos()[:, None, None] * axis[None, None, :]
            + angle.sin()[:, None, None] * axis[None, :, None]
        )  # [B, S, S]
        pixels = images * self._std + self._mean
        ink = (pixels < 0.95).any(dim=1, keepdim=True)  # [B, 1, S, S]: not the white background
        pixels = torch.where(ink, (pixels * ramp[:, None]).clamp(0, 1), pixels)
        return (pixels - self._mean) / self._std

    def _jitter(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and saturation jitter applied in normalised space (cheap, 3 scalars each)."""
        b, c, s = (1 + self.jitter * (2 * u - 1)).T[
            :, :, None, None, None
        ]  # each [B, 1, 1, 1] in 1 +- jitter
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        gray = images.mean(dim=1, keepdim=True)
        images = gray + s * (images - gray)
        images = mean + c * (images - mean)
        return images + (b - 1) * 2.0  # brightness: a shift of up to +-jitter x 2 std units


def _sum3(x: torch.Tensor) -> torch.Tensor:
    """The sum over each 3x3 window of the last two dims, zero-padded: [..., H, W] -> [..., H, W]."""
    p = torch.nn.functional.pad(x, (1, 1, 1, 1))
    rows = p[..., :, :-2] + p[..., :, 1:-1] + p[..., :, 2:]
    return rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]


def box_blur3(images: torch.Tensor) -> torch.Tensor:
    """A 3x3 box blur of [B, C, H, W] that averages only the pixels inside the image: what
    `avg_pool2d(images, 3, 1, 1, count_include_pad=False)` computes, up to float rounding (< 1e-6), as two
    separable sums of shifted slices, ~4x faster on the CPU (that pooling was the largest op of a batch's
    augmentation)."""
    counts = _sum3(torch.ones(images.shape[-2:], dtype=images.dtype))
    return _sum3(images) / counts


def _crop_pixels(image: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """An RGB image -> the crop `box` (top, left, height, width) resized to uint8 [size, size, 3] (bicubic, PIL),
    as `RandomResizedCrop.apply` does before normalising."""
    top, left, h, w = box
    img = image.crop((left, top, left + w, top + h))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img)


def eval_images(data: EmojiData, indices: np.ndarray) -> torch.Tensor:
    """Evaluation images [M, 3, S, S]: the stored pixels, normalised, no augmentation."""
    return to_tensor_normalized(data.images[np.asarray(indices)])


def concept_balanced_order(concepts: np.ndarray, batch_size: int, seed: int) -> Callable[[int], np.ndarray]:
    """Epoch -> an order of sample positions in which each run of `batch_size` has distinct concepts.

    concepts: concept id per sample [N].  Two images of one concept in a batch would be false
    negatives for the contrastive loss (their captions match both), so each batch takes at most one
    image per concept: samples are shuffled, then batches are filled greedily from the front of the
    queue, skipping concepts already in the batch.  Each sample appears at most once per epoch; the
    few left when no full batch of distinct concepts remains wait for the next epoch's shuffle.
    """
    concepts = np.asarray(concepts)

    def order(epoch: int) -> np.ndarray:
        rng = np.random.default_rng([seed, epoch, 7])
        queue = list(rng.permutation(len(concepts)))
        out: list[int] = []
        while queue:
            seen: set[int] = set()
            rest: list[int] = []
            for pos in queue:
                c = int(concepts[pos])
                if len(seen) < batch_size and c not in seen:
                    seen.add(c)
                    out.append(int(pos))
                else:
                    rest.append(pos)
            if len(seen) < batch_size:
                del out[len(out) - len(seen) :]  # a short batch would shift every later batch boundary
                break
            queue = rest
        return np.asarray(out, dtype=np.int64)

    return order


def subset_concepts(data: EmojiData, concepts: np.ndarray) -> EmojiData:
    """`data` restricted to the given concept ids (renumbered 0..K-1 in the given order), for small runs."""
    concepts = np.asarray(concepts, dtype=np.int64)
    new_id = np.full(data.num_concepts, -1, dtype=np.int64)
    new_id[concepts] = np.arange(len(concepts))
    rows = np.flatnonzero(new_id[data.image_concept] >= 0)
    return dataclasses.replace(
        data,
        images=data.images[rows],
        image_concept=new_id[data.image_concept[rows]].astype(data.image_concept.dtype),
        image_style=data.image_style[rows],
        **{name: getattr(data, name)[concepts] for name in _PER_CONCEPT},
    )


_PER_CONCEPT = ("codepoints", "names", "keywords", "categories", "subcategories", "held_out")
