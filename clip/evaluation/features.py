"""Batched feature extraction shared by the evaluators: a data set and an encode function in, features out."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from clip.evaluation.datasets import ImageDataset, ImageSource, collate_skipping
from clip.runtime import PRECISIONS, autocast  # noqa: F401  (re-exported: the evaluators' names)

MAX_LISTED_FAILURES = 20  # unreadable images named in results; all of them are counted


@dataclass
class EncodedImages:
    """Features of the readable images: `features[k]` belongs to source `index[k]`; `failed` lists the rest."""

    features: torch.Tensor  # [N_ok, D] float32, unit norm
    index: torch.Tensor  # [N_ok] positions in the source list
    failed: list[tuple[int, str]] = field(default_factory=list)  # (position, error message)

    @property
    def n_skipped(self) -> int:
        return len(self.failed)


def _batches(
    sources: Sequence[ImageSource], transform: Callable[[Any], torch.Tensor], batch_size: int, workers: int
) -> Iterator[dict[str, Any]]:
    loader = torch.utils.data.DataLoader(
        ImageDataset(sources, transform),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_skipping,
        shuffle=False,
    )
    yield from loader


def describe_failures(
    sources: Sequence[ImageSource], failed: list[tuple[int, str]], limit: int = MAX_LISTED_FAILURES
) -> list[dict[str, str]]:
    """The first `limit` unreadable images as [{'image': path (or '#index'), 'error': message}]."""
    return [
        {"image": sources[i] if isinstance(sources[i], str) else f"#{i}", "error": message}
        for i, message in failed[:limit]
    ]


@torch.no_grad()
def encode_images(
    encode: Callable[[torch.Tensor], torch.Tensor],
    sources: Sequence[ImageSource],
    transform: Callable[[Any], torch.Tensor],
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: bool = True,
    desc: str = "images",
) -> EncodedImages:
    """Decode, transform and encode `sources` in batches; unreadable images are skipped and recorded.

    encode: images [B, 3, H, W] on `device` -> features [B, D] (e.g. `model.encode_image`).
    Returns unit-norm float32 features on the CPU. `progress` shows a tqdm bar on stderr.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    feats: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    failed: list[tuple[int, str]] = []
    with tqdm(total=len(sources), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in _batches(sources, transform, batch_size, workers):
            failed += batch["failed"]
            if batch["images"] is not None:
                with autocast(device, precision):
                    out = encode(batch["images"].to(device, non_blocking=True))
                feats.append(F.normalize(out.float(), dim=-1).cpu())
                index.append(batch["index"])
            bar.update(len(batch["index"]) + len(batch["failed"]))
    if not feats:
        detail = f"; first error: {failed[0][1]}" if failed else ""
        raise ValueError(f"none of the {len(sources)} images could be read{detail}")
    return EncodedImages(torch.cat(feats), torch.cat(index), failed)


@torch.no_grad()
def encode_texts(
    encode: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: bool = True,
    desc: str = "texts",
) -> torch.Tensor:
    """Encode token ids [N, L] in batches -> unit-norm float32 features [N, D] on the CPU."""
    from tqdm import tqdm

    out = []
    for start in tqdm(
        range(0, len(tokens), batch_size), desc=desc, unit="batch", disable=not progress, leave=False
    ):
        with autocast(device, precision):
            feats = encode(tokens[start : start + batch_size].to(device))
        out.append(F.normalize(feats.float(), dim=-1).cpu())
    if not out:
        raise ValueError("no texts to encode")
    return torch.cat(out)
