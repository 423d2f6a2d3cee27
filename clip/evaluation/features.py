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


@dataclass(frozen=True)
class EncodeOptions:
    """How the evaluators run a model: images (and texts) per batch, decoding workers, device, autocast
    precision (`clip.runtime.PRECISIONS`), progress bars.  One object instead of five positional arguments."""

    batch_size: int = 64
    workers: int = 0
    device: str | torch.device = "cpu"
    precision: str = "fp32"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError(
                f"batch size must be >= 1 and workers >= 0, got {self.batch_size}, {self.workers}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")


DEFAULT_OPTIONS = EncodeOptions()  # frozen: safe as a default argument


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
    options: EncodeOptions = DEFAULT_OPTIONS,
    desc: str = "images",
) -> EncodedImages:
    """Decode, transform and encode `sources` in batches; unreadable images are skipped and recorded.

    encode: images [B, 3, H, W] on `device` -> features [B, D] (e.g. `model.encode_image`).
    Returns unit-norm float32 features on the CPU. `progress` shows a tqdm bar on stderr.
    """
    from tqdm import tqdm

    o = options
    feats: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    failed: list[tuple[int, str]] = []
    with tqdm(total=len(sources), desc=desc, unit="img", disable=not o.progress, leave=False) as bar:
        for batch in _batches(sources, transform, o.batch_size, o.workers):
            failed += batch["failed"]
            if batch["images"] is not None:
                with autocast(o.device, o.precision):
                    out = encode(batch["images"].to(o.device, non_blocking=True))
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
    options: EncodeOptions = EncodeOptions(batch_size=256),
    desc: str = "texts",
) -> torch.Tensor:
    """Encode token ids [N, L] in batches of `options.batch_size` -> unit-norm float32 features [N, D] on the CPU."""
    from tqdm import tqdm

    o, out = options, []
    for start in tqdm(
        range(0, len(tokens), o.batch_size), desc=desc, unit="batch", disable=not o.progress, leave=False
    ):
        with autocast(o.device, o.precision):
            feats = encode(tokens[start : start + o.batch_size].to(o.device))
        out.append(F.normalize(feats.float(), dim=-1).cpu())
    if not out:
        raise ValueError("no texts to encode")
    return torch.cat(out)
