"""Map-style training data: CSV/TSV files, image folders with .txt captions, weighted mixtures of them,
and the sampler that cuts global batches from an epoch's order.

Determinism contract: a sample's augmentation is drawn from `numpy.random.default_rng([seed, epoch, index])`
and an epoch's order is a function of (seed, epoch), so a run is the same for any number of DataLoader workers,
and resuming at (epoch, batch) needs no replay. Global batches of `world x accum x batch` samples are cut from
the order in sequence and rank r takes the r-th contiguous slice, so 2 ranks x B equals 1 process x 2B.

A sample that cannot be used (missing or undecodable image, empty caption) raises `SampleError` (or the
ValueError / OSError of `load_image`); the DataLoader wrapper turns that into a counted skip and the batch is
simply shorter, so one bad file never stops a run.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip.files import IMAGE_EXTENSIONS, is_image_name  # the one definition (clip index / eval see the same)
from clip.preprocess import RandomResizedCrop, image_transform, load_image

Order = Callable[[int], np.ndarray]


class SampleError(ValueError):
    """A sample that cannot be trained on; `reason` names the counter it goes to."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def skip_reason(err: BaseException) -> str:
    """Counter name for a failed sample: missing_image, unreadable_image, empty_caption, ..."""
    if isinstance(err, SampleError):
        return err.reason
    if isinstance(err, FileNotFoundError):
        return "missing_image"
    return "unreadable_image"


@dataclass
class Batch:
    """One micro-batch for one rank.

    images: [b, 3, H, W] float32 (None when every sample was skipped); texts: [b, L] int64; keys: b sample ids.
    skipped: counts of samples dropped from this batch by reason. epoch, batch_no: where the batch sits in its
    epoch (map-style: the global batch index; WebDataset: the worker's batch index); worker: WebDataset worker.
    """

    images: torch.Tensor | None
    texts: torch.Tensor | None
    keys: list[str]
    skipped: dict[str, int]
    epoch: int
    batch_no: int
    worker: int = 0

    @property
    def size(self) -> int:
        return 0 if self.images is None else int(self.images.shape[0])

    def pin_memory(self) -> Batch:
        if self.images is not None:
            self.images, self.texts = self.images.pin_memory(), self.texts.pin_memory()
        return self


def collate(items: Sequence[tuple], epoch: int, batch_no: int, worker: int = 0) -> Batch:
    """Stack (key, image, tokens) samples and count the (key, reason) failures among `items`."""
    good = [it for it in items if len(it) == 3]
    skipped = Counter(it[1] for it in items if len(it) == 2)
    if not good:
        return Batch(None, None, [], dict(skipped), epoch, batch_no, worker)
    images = torch.stack([it[1] for it in good])  # [b, 3, H, W]
    texts = torch.stack([torch.as_tensor(it[2]).long() for it in good])  # [b, L]
    return Batch(images, texts, [it[0] for it in good], dict(skipped), epoch, batch_no, worker)


@dataclass
class PairDataset:
    """Image-caption pairs from files: `get(index, epoch)` -> (image [3, n, n] float32, tokens [L] int32).

    The image is augmented with a random resized crop drawn from rng([seed, epoch, index]). Captions longer
    than the context are truncated (the end-of-text token is kept).
    """

    image_paths: list[str]
    captions: list[str | None]
    resolution: int
    context_length: int
    seed: int = 0
    crop_scale: tuple[float, float] = (0.9, 1.0)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    read_captions: bool = False  # captions[i] is a .txt path to read at load time
    augment: bool = True  # False: the evaluation transform (resize, center crop) instead of the random crop
    name: str = "data"
    tokenizer: Any = None  # the model's own (`clip.get_tokenizer`) when it is not OpenAI's BPE; picklable
    _crop: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.image_paths)

    def crop(self) -> Any:
        if self._crop is None:
            extra = {k: tuple(v) for k, v in (("mean", self.mean), ("std", self.std)) if v is not None}
            if self.augment:
                self._crop = RandomResizedCrop(self.resolution, scale=self.crop_scale, **extra)
            else:
                self._crop = image_transform(self.resolution, **extra)
        return self._crop

    def caption(self, index: int) -> str:
        text = self.captions[index]
        if self.read_captions:
            if text is None or not os.path.isfile(text):
                raise SampleError("missing_caption", f"no caption file for {self.image_paths[index]!r}")
            text = Path(text).read_text(encoding="utf-8", errors="replace")
        if text is None or not text.strip():
            raise SampleError("empty_caption", f"empty caption for {self.image_paths[index]!r}")
        return text

    def get(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        from clip.tokenizer import tokenize

        text = self.caption(index)
        img = load_image(self.image_paths[index], exif=True)  # upright, as clip index and clip eval see it
        if self.augment:
            image = self.crop()(img, np.random.default_rng([self.seed, epoch, index]))
        else:
            image = self.crop()(img)
        if self.tokenizer is not None:
            return image, self.tokenizer([text], context_length=self.context_length)[0]
        tokens = tokenize([text], context_length=self.context_length, truncate=True)[0]
        return image, tokens

    def key(self, index: int) -> str:
        return self.image_paths[index]


def read_csv(path: str, img_key: str, caption_key: str, separator: str | None) -> tuple[list[str], list[str]]:
    """(image paths resolved against the file's folder, captions) from a CSV/TSV with a header row."""
    if separator is None:
        separator = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        columns = reader.fieldnames or []
        missing = [k for k in (img_key, caption_key) if k not in columns]
        if missing:
            raise ValueError(
                f"{path}: no column(s) {missing} (columns: {columns}); choose them with --csv-img-key / "
                "--csv-caption-key, or --csv-separator if the file is not split correctly"
            )
        rows = list(reader)
    paths = [os.path.join(base, r[img_key]) if r[img_key] else "" for r in rows]
    return paths, [r[caption_key] for r in rows]


def scan_folder(root: str) -> tuple[list[str], list[str]]:
    """(image paths, same-named .txt caption paths) under `root`, recursively, in sorted order."""
    images = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if is_image_name(f))
    return images, [os.path.splitext(p)[0] + ".txt" for p in images]


def open_map_source(
    source: str, *, resolution: int, context_length: int, seed: int, crop_scale: tuple[float, float],
    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
    img_key: str = "filepath", caption_key: str = "caption", separator: str | None = None, augment: bool = True,
    tokenizer: Any = None,
) -> PairDataset:  # fmt: skip
    """A CSV/TSV file or an image folder as a `PairDataset`."""
    common = dict(resolution=resolution, context_length=context_length, seed=seed, crop_scale=crop_scale,
                  mean=mean, std=std, name=source, augment=augment, tokenizer=tokenizer)  # fmt: skip
    if os.path.isdir(source):
        images, captions = scan_folder(source)
        if not images:
            raise ValueError(
                f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under folder {source!r}"
            )
        return PairDataset(images, captions, read_captions=True, **common)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"training data {source!r} is neither a file nor a folder")
    paths, captions = read_csv(source, img_key, caption_key, separator)
    if not paths:
        raise ValueError(f"{source}: the file has a header but no rows")
    return PairDataset(paths, captions, **common)


class MixedDataset:
    """Several map-style data sets behind one index space (their concatenation), mixed by weight.

    `order(epoch)` draws `length` samples: the source of each position by weight, and within a source its own
    permutations back to back, so each source is seen in proportion to its weight without repeats until exhausted.
    """

    def __init__(
        self, datasets: Sequence[Any], weights: Sequence[float], seed: int, length: int | None = None
    ):
        self.datasets = list(datasets)
        self.sizes = [len(d) for d in self.datasets]
        self.offsets = np.cumsum([0, *self.sizes])
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self.seed = seed
        self.length = int(length if length is not None else sum(self.sizes))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        source = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return source, index - int(self.offsets[source])

    def get(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        source, local = self.locate(index)
        return get_item(self.datasets[source], local, epoch)

    def key(self, index: int) -> str:
        source, local = self.locate(index)
        return sample_key(self.datasets[source], local)

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 1])
        choice = rng.choice(len(self.datasets), size=self.length, p=self.probs)
        out = np.empty(self.length, dtype=np.int64)
        for s, size in enumerate(self.sizes):
            where = np.flatnonzero(choice == s)
            reps = -(-len(where) // size) if len(where) else 0
            local = np.concatenate([rng.permutation(size) for _ in range(reps)] or [np.empty(0, np.int64)])
            out[where] = local[: len(where)] + self.offsets[s]
        return out


def get_item(dataset: Any, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `index` of epoch `epoch`: `dataset.get(index, epoch)` when defined, else `dataset[index]`."""
    get = getattr(dataset, "get", None)
    if callable(get):
        return get(index, epoch)
    return dataset[index]


def sample_key(dataset: Any, index: int) -> str:
    key = getattr(dataset, "key", None)
    return str(key(index)) if callable(key) else str(index)


def default_order(n: int, seed: int, length: int | None = None) -> Order:
    """Epoch -> a permutation of range(n) from rng([seed, epoch]); `length` repeats / truncates permutations."""

    def order(epoch: int) -> np.ndarray:
        rng = np.random.default_rng([seed, epoch])
        want = n if length is None else length
        parts = [rng.permutation(n) for _ in range(-(-want // n))]
        return np.concatenate(parts)[:want]

    return order


class IndexedPairs(torch.utils.data.Dataset):
    """DataLoader-facing view of a map-style data set.

    Item (epoch, step, index) -> (epoch, step, key, image, tokens), or (epoch, step, key, skip reason) when the
    sample cannot be read; `collate_indexed` stacks them into a `Batch`.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int, int]) -> tuple:
        epoch, step, index = item
        key = sample_key(self.dataset, index)
        try:
            image, tokens = get_item(self.dataset, index, epoch)
        except (ValueError, OSError) as err:
            return epoch, step, key, skip_reason(err)
        return epoch, step, key, image, tokens

    def __getitems__(self, items: list[tuple[int, int, int]]) -> list[tuple]:
        """A whole micro-batch (the DataLoader calls this when it exists): through `dataset.get_batch(indices,
        epoch)` -> (images [B, ...], tokens [B, L]) when the data set has one (in-memory data sets augment a batch
        in a few tensor ops), else item by item. A failing batch is retried item by item, so one bad sample is
        skipped as always, never the batch."""
        get_batch = getattr(self.dataset, "get_batch", None)
        if not callable(get_batch) or len({it[0] for it in items}) != 1:
            return [self[it] for it in items]
        epoch, indices = items[0][0], [it[2] for it in items]
        try:
            images, tokens = get_batch(indices, epoch)
        except (ValueError, OSError):
            return [self[it] for it in items]
        return [(e, step, sample_key(self.dataset, i), images[j], tokens[j])
                for j, (e, step, i) in enumerate(items)]  # fmt: skip


def collate_indexed(items: list[tuple]) -> Batch:
    """collate_fn for `IndexedPairs` items (all from one micro-batch, so one epoch and step)."""
    epoch, step = items[0][0], items[0][1]
    return collate([it[2:] for it in items], epoch=epoch, batch_no=step)


@dataclass(frozen=True)
class BatchPlan:
    """How global batches are cut: `micro` samples per micro-batch, `accum` micro-batches per rank per step."""

    micro: int
    accum: int
    rank: int
    world: int

    @property
    def per_rank(self) -> int:
        return self.micro * self.accum

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world


class EpochBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of (epoch, step, index) from (start_epoch, start_batch) on, forever.

    Step s of an epoch uses order[s * G : (s + 1) * G] (G = global batch); rank r takes its r-th slice and
    cuts it into `accum` micro-batches. A trailing partial global batch is dropped.
    """

    def __init__(self, order: Order, plan: BatchPlan, start_epoch: int = 0, start_batch: int = 0) -> None:
        self.order, self.plan = order, plan
        self.start_epoch, self.start_batch = start_epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        p, epoch, first = self.plan, self.start_epoch, self.start_batch
        while True:
            order = np.asarray(self.order(epoch))
            steps = len(order) // p.global_batch
            if steps == 0:
                raise ValueError(
                    f"epoch {epoch} has {len(order)} samples, fewer than one global batch of {p.global_batch}"
                )
            for step in range(first, steps):
                mine = order[step * p.global_batch + p.rank * p.per_rank :][: p.per_rank]
                for j in range(p.accum):
                    yield [(epoch, step, int(i)) for i in mine[j * p.micro : (j + 1) * p.micro]]
            epoch, first = epoch + 1, 0


def require_readable(dataset: Any, name: str) -> None:
    """Fail at once, with the reasons, when no sample of `dataset` can be read (stops at the first good one)."""
    reasons: Counter[str] = Counter()
    first_error: BaseException | None = None
    for index in range(len(dataset)):
        try:
            get_item(dataset, index, 0)
            return
        except (ValueError, OSError) as err:
            reasons[skip_reason(err)] += 1
            first_error = first_error or err
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "it is empty"
    raise ValueError(
        f"no readable sample in {name} ({len(dataset)} tried; {detail}); first error: {first_error}"
    )


class MapStream:
    """This rank's micro-batches of a map-style data set, one optimizer step at a time, from a saved position.

    `position()` is {"kind": "map", "epoch": e, "batch": s}: the next step is step s of epoch e.
    """

    uneven = False  # every rank always has a full share

    def __init__(self, dataset: Any, order: Order, plan: BatchPlan, *, workers: int, pin_memory: bool,
                 position: dict | None = None) -> None:  # fmt: skip
        self.plan = plan
        self.steps_per_epoch = len(order(0)) // plan.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the data has {len(order(0))} samples per epoch, fewer than one global batch of "
                f"{plan.global_batch} (batch size x accum x processes); lower --batch-size"
            )
        self.epoch, self.batch = (int(position["epoch"]), int(position["batch"])) if position else (0, 0)
        sampler = EpochBatchSampler(order, plan, self.epoch, self.batch)
        self.loader = torch.utils.data.DataLoader(
            IndexedPairs(dataset), batch_sampler=sampler, num_workers=workers, collate_fn=collate_indexed,
            pin_memory=pin_memory, persistent_workers=workers > 0,
        )  # fmt: skip
        self._it = iter(self.loader)

    def next_step(self) -> list[Batch]:
        batches = [next(self._it) for _ in range(self.plan.accum)]
        self.epoch, self.batch = batches[0].epoch, batches[0].batch_no + 1
        return batches

    def end_epoch(self) -> None:  # epochs roll over inside the sampler
        raise AssertionError("a map-style stream never runs dry")

    def position(self) -> dict:
        return {"kind": "map", "epoch": self.epoch, "batch": self.batch}

    def close(self) -> None:
        self._it = None  # drops the iterator, which stops its worker processes
