"""WebDataset tar shards as a stream of micro-batches, deterministic and resumable.

Each epoch the shard list is permuted with rng([seed, epoch]) and split over all ranks x workers (global worker
g takes shards g, g + G, ...); with `resampled` every worker instead draws shards with replacement forever.
A worker reads its shards with the `webdataset` library's tar reader, mixes sources by weight, shuffles the raw
(undecoded) samples with a seeded buffer, cuts them into micro-batches and only then decodes, so resuming can
skip the batches already trained on without decoding them. A worker with no shard (fewer shards than
ranks x workers) yields nothing; ranks that run dry keep stepping with empty batches until all are dry, so an
uneven split never hangs a collective.

The order depends on the number of ranks and workers (shards are split over them); for a fixed job it is the
same on every run, and resuming continues it exactly.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clip.preprocess import RandomResizedCrop
from clip.train.data import Batch, SampleError, collate

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


def expand_sources(spec: str) -> list[list[str]]:
    """'a/{000..009}.tar::b/{0..3}.tar' -> one list of shard URLs per '::'-separated source (braces expanded)."""
    try:
        from webdataset.shardlists import expand_urls
    except ImportError:
        raise ValueError(
            f"--train-data {spec!r} names WebDataset shards, which need the webdataset package that the "
            "training extra installs: pip install 'clipforge[train]'"
        ) from None

    sources = [expand_urls(part) for part in spec.split("::")]
    if not all(sources):
        raise ValueError(f"WebDataset source {spec!r} expands to no shards")
    return sources


def is_webdataset(spec: str) -> bool:
    """True when the '::'-separated sources name tar shards (a .tar pattern or a pipe:/URL source).

    Shards and CSV/folder sources cannot be mixed in one run (one is streamed, the other indexed).
    """
    flags = [part.startswith(REMOTE_PREFIXES) or part.endswith(TAR_SUFFIXES) for part in spec.split("::")]
    if any(flags) and not all(flags):
        raise ValueError(
            f"--train-data {spec!r} mixes WebDataset shards with CSV/folder sources; use one kind"
        )
    return all(flags)


def decode_caption(raw: dict) -> str:
    """The caption of a raw sample: its .txt, else the "caption" (or "text") string of its .json; "" when it
    has neither. Raises SampleError("unreadable_caption") for a .json that is not valid JSON, not an object, or
    whose caption is not a string (a ValueError, as before).
    """
    key = raw.get("__key__")
    if "txt" in raw:
        return raw["txt"].decode("utf-8", errors="replace")
    if "json" not in raw:
        return ""
    try:
        meta = json.loads(raw["json"])
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise SampleError("unreadable_caption", f"sample {key!r}: .json is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise SampleError(
            "unreadable_caption", f"sample {key!r}: .json holds a {type(meta).__name__}, not an object"
        )
    caption = meta.get("caption") or meta.get("text") or ""
    if not isinstance(caption, str):
        raise SampleError("unreadable_caption", f"sample {key!r}: its caption is a {type(caption).__name__}")
    return caption


def decode_sample(
    raw: dict, crop: RandomResizedCrop, rng: np.random.Generator, context_length: int, tokenizer: Any = None
) -> tuple:
    """Raw tar sample -> (key, image [3, n, n], tokens [L]) or (key, skip reason).

    The image gets its EXIF orientation applied, as `load_image(path, exif=True)` does for `clip index`,
    `clip eval` and file-based training, so one photo looks the same to every command.
    """
    from PIL import Image, ImageOps

    from clip.tokenizer import tokenize

    key = str(raw.get("__key__"))
    if "txt" not in raw and "json" not in raw:
        return key, "missing_caption"
    try:
        caption = decode_caption(raw)
    except SampleError as err:
        return key, err.reason
    if not caption.strip():
        return key, "empty_caption"
    data = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
    if data is None:
        return key, "missing_image"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            image = crop(ImageOps.exif_transpose(img), rng)
    except Exception:  # Pillow raises many types for corrupt data; the sample is skipped and counted
        return key, "unreadable_image"
    if tokenizer is not None:  # the model's own tokenizer (SigLIP, CLIPA, ...)
        return key, image, tokenizer([caption], context_length=context_length)[0]
    return key, image, tokenize([caption], context_length=context_length, truncate=True)[0]


class _TailStream:
    """A read-only stream wrapper that remembers how many bytes went through and the last 1 KiB of them."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.total, self.tail = stream, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-1024:]
        return data

    def complete(self) -> bool:
        """Read what tar left unread (end-of-archive padding, bounded); True when the archive ended properly.

        A tar archive ends with two zero 512-byte blocks, so a file cut short anywhere (even between members,
        where the tar reader would just stop and lose the rest silently) lacks them.
        """
        for _ in range(64):  # 64 x 16 KiB: more than any record padding; stop checking beyond that
            if not self.read(16384):
                break
        else:
            return True
        return self.total % 512 == 0 and len(self.tail) == 1024 and not any(self.tail)

    def close(self) -> None:
        self.stream.close()

    def __getattr__(self, name: str) -> Any:  # anything else the tar reader asks of the stream (name, ...)
        return getattr(self.stream, name)


def _checked_streams(sources: Iterator[dict], errors: Counter) -> Iterator[dict]:
    """Pass opened shards on with a `_TailStream`; count each one that ends without its end-of-archive blocks.

    The check of a shard runs when the tar reader asks for the next one (or the sources end), i.e. after it
    has read everything it could from it.
    """
    last: _TailStream | None = None
    for source in sources:
        if last is not None and not last.complete():
            errors["truncated_shard"] += 1
        last = source["stream"] = _TailStream(source["stream"])
        yield source
    if last is not None and not last.complete():
        errors["truncated_shard"] += 1


def shard_samples(urls: Iterator[dict], errors: Counter) -> Iterator[dict]:
    """Raw samples ({"__key__", ext: bytes, ...}) of the shards in `urls`; broken members and truncated
    shards are counted in `errors` (unreadable_shard_entry, truncated_shard) and reading goes on."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    def handler(exn: Exception) -> bool:
        errors["unreadable_shard_entry"] += 1  # a broken tar member or shard: count it and read on
        return True

    streams = _checked_streams(url_opener(urls, handler=handler), errors)
    return group_by_keys(tar_file_expander(streams, handler=handler), handler=handler)


def _shuffle(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Buffer shuffle: keep `size` samples, emit a random one for each new arrival, then the rest shuffled."""
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = sample
    rng.shuffle(buf)
    yield from buf


def _mix(streams: list[Iterator[dict]], weights: np.ndarray, rng: np.random.Generator) -> Iterator[dict]:
    """Draw each sample's source by weight; an exhausted source drops out and the others share its weight."""
    active = list(range(len(streams)))
    while active:
        p = weights[active] / weights[active].sum()
        k = active[int(rng.choice(len(active), p=p))]
        try:
            yield next(streams[k])
        except StopIteration:
            active.remove(k)


@dataclass
class WebDatasetEpoch(torch.utils.data.IterableDataset):
    """One epoch of one rank's micro-batches; give it to a DataLoader with batch_size=None.

    skip[w]: micro-batches of logical worker w already consumed (resume). shift rotates physical worker ids so
    that the DataLoader's round robin starts at the logical worker that was due next when the run stopped.
    """

    sources: list[list[str]]
    weights: Sequence[float]
    epoch: int
    seed: int
    rank: int
    world: int
    batch_size: int
    shuffle_buffer: int
    resampled: bool
    resolution: int
    context_length: int
    crop_scale: tuple[float, float] = (0.9, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    skip: Sequence[int] = ()
    shift: int = 0
    tokenizer: Any = None

    def __post_init__(self) -> None:
        super().__init__()

    def _urls(self, urls: list[str], source: int, worker: int, gworker: int, gworkers: int) -> Iterator[dict]:
        if self.resampled:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, source, 2])
            while True:
                yield {"url": urls[int(rng.integers(len(urls)))]}
        perm = np.random.default_rng([self.seed, self.epoch, source, 3]).permutation(len(urls))
        for k in range(gworker, len(urls), gworkers):
            yield {"url": urls[perm[k]]}

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.shift) % workers
        gworker, gworkers = self.rank * workers + worker, self.world * workers
        errors: Counter[str] = Counter()
        streams = [
            iter(shard_samples(self._urls(urls, s, worker, gworker, gworkers), errors))
            for s, urls in enumerate(self.sources)
        ]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        raw = streams[0] if len(streams) == 1 else _mix(streams, np.asarray(self.weights, float), rng)
        raw = _shuffle(raw, self.shuffle_buffer, rng)
        crop = RandomResizedCrop(self.resolution, scale=self.crop_scale, **_norm(self.mean, self.std))
        skip = self.skip[worker] if worker < len(self.skip) else 0
        # Each batch is held back until the next chunk has been read, so that shard errors met while reading
        # (a truncated last shard, say) are counted on a batch instead of being lost after the final one.
        pending: Batch | None = None
        for batch_no, chunk in enumerate(_chunks(raw, self.batch_size)):
            if pending is not None:
                yield _with_errors(pending, errors)
                pending = None
            if batch_no < skip:
                continue
            items = [
                decode_sample(s, crop, np.random.default_rng([self.seed, self.epoch, self.rank, worker, batch_no, i]),
                              self.context_length, self.tokenizer)
                for i, s in enumerate(chunk)
            ]  # fmt: skip
            pending = collate(items, epoch=self.epoch, batch_no=batch_no, worker=worker)
        if pending is not None:
            yield _with_errors(pending, errors)
        elif errors:  # nothing readable at all in this worker's share: report the errors in an empty batch
            yield Batch(None, None, [], dict(errors), self.epoch, skip, worker)


def _with_errors(batch: Batch, errors: Counter) -> Batch:
    batch.skipped.update({k: batch.skipped.get(k, 0) + v for k, v in errors.items()})
    errors.clear()
    return batch


def _norm(mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> dict:
    return {k: tuple(v) for k, v in (("mean", mean), ("std", std)) if v is not None}


def _chunks(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk  # the last partial batch is kept: every sample is seen once per epoch


def _identity(x: Batch) -> Batch:
    return x


class WdsStream:
    """This rank's WebDataset micro-batches, one optimizer step at a time, epoch after epoch.

    `next_step()` returns up to `accum` batches; [] means this rank's share of the epoch is used up (or the
    epoch reached `steps_per_epoch`). The loop calls `end_epoch()` once every rank has run dry.
    position(): {"kind": "wds", "epoch", "batch" (steps taken this epoch), "worker_batches" (micro-batches
    consumed per logical worker), "last_worker", "workers", "world"}.
    """

    uneven = True  # ranks can hold different numbers of samples

    def __init__(self, make_epoch, *, accum: int, workers: int, world: int, pin_memory: bool,
                 steps_per_epoch: int | None, position: dict | None = None) -> None:  # fmt: skip
        self.make_epoch = make_epoch  # (epoch, skip, shift) -> WebDatasetEpoch
        self.accum, self.workers, self.world = accum, workers, world
        self.pin_memory = pin_memory
        self.steps_per_epoch = steps_per_epoch
        self.nw = max(1, workers)
        if position is not None:
            if (position["workers"], position["world"]) != (workers, world):
                raise ValueError(
                    f"this WebDataset run was saved with {position['workers']} workers x {position['world']} "
                    f"processes; resume it with the same --workers and number of processes (got {workers} x {world})"
                )
            self._open(position["epoch"], list(position["worker_batches"]), position["last_worker"])
            self.batch = int(position["batch"])
        else:
            self._open(0, [0] * self.nw, -1)

    def _open(self, epoch: int, consumed: list[int], last_worker: int) -> None:
        self.epoch, self.consumed, self.last_worker, self.batch = epoch, consumed, last_worker, 0
        shift = (last_worker + 1) % self.nw
        dataset = self.make_epoch(epoch, tuple(consumed), shift)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
        )
        self._it = iter(self.loader)

    def next_step(self) -> list[Batch]:
        # `batch` counts step attempts, so it advances on every rank alike, dry or not.
        if self.steps_per_epoch is not None and self.batch >= self.steps_per_epoch:
            return []
        self.batch += 1
        out = []
        for _ in range(self.accum):
            batch = next(self._it, None)
            if batch is None:
                break
            self.consumed[batch.worker] += 1
            self.last_worker = batch.worker
            out.append(batch)
        return out

    def end_epoch(self) -> None:
        self.close()
        self._open(self.epoch + 1, [0] * self.nw, -1)

    def position(self) -> dict:
        return {"kind": "wds", "epoch": self.epoch, "batch": self.batch, "worker_batches": list(self.consumed),
                "last_worker": self.last_worker, "workers": self.workers, "world": self.world}  # fmt: skip

    def close(self) -> None:
        self._it = None
