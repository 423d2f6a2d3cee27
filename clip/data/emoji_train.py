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

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, i: int) -> str:
        row = int(self.indices[i])
        style = self.data.style_names[int(self.data.image_style[row])]
        return f"{style}/{self.data.codepoints[self.data.image_concept[row]]}"

    def get(self, i: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, epoch, i])
        row = int(self.indices[i])
        image = self.crop(Image.fromarray(self.data.images[row]), rng)  # [3, S, S], normalised
        if self.jitter > 0:
            image = self._jitter(image, rng)
        if self.gray_blur > 0:
            image = self._gray_blur(image, rng)
        if self.shade > 0:
            image = self._shade(image, rng)
        caption = sample_caption(self.concepts[int(self.data.image_concept[row])], rng)
        tokens = tokenize([caption], context_length=self.context_length, truncate=True)[0]
        return image, tokens

    def _gray_blur(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """With probability `gray_blur` each: drop colour, and blur with a 3x3 box (shape over outlines)."""
        u = rng.random(2)
        if u[0] < self.gray_blur:
            image = image.mean(dim=0, keepdim=True).expand_as(image).contiguous()
        if u[1] < self.gray_blur:
            image = torch.nn.functional.avg_pool2d(
                image[None], 3, stride=1, padding=1, count_include_pad=False
            )[0]
        return image

    def _shade(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Light the drawing from a random side: scale the non-white pixels by a linear ramp 1 +- `shade`
        across the image (flat vector art made to look lit, like the held-out 3-D renders)."""
        angle, strength = (float(v) for v in rng.random(2) * np.array([2 * np.pi, self.shade]))
        axis = self._axis
        ramp = 1 + strength * (math.cos(angle) * axis[None, :] + math.sin(angle) * axis[:, None])  # [S, S]
        mean, std = self._mean, self._std
        pixels = image * std + mean
        ink = (pixels < 0.95).any(dim=0)  # [S, S]: not the white background
        pixels = torch.where(ink, (pixels * ramp).clamp(0, 1), pixels)
        return (pixels - mean) / std

    def _jitter(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Brightness, contrast and saturation jitter applied in normalised space (cheap, 3 scalars)."""
        b, c, s = 1 + self.jitter * (2 * rng.random(3) - 1)  # each in [1 - jitter, 1 + jitter]
        mean = image.mean()
        gray = image.mean(dim=0, keepdim=True)
        image = gray + s * (image - gray)
        image = mean + c * (image - mean)
        return image + (b - 1) * 2.0  # brightness: a shift of up to +-jitter x 2 std units


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
