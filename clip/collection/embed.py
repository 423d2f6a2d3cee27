"""`clip embed`: image (and caption) embeddings of a large collection, on one process or many through torchrun.

How the work is split: the input is cut into units (`sources.Collection.units`: slices of `shard_size` rows,
or one tar shard each) that do not depend on the job's shape. Rank r of W takes units r, r + W, ...; within a
rank, DataLoader worker k of K takes every K-th of those, reads and decodes its samples (so decoding overlaps
the model, which runs in the main process) and cuts them into batches that never span a chunk of
`shard_size` samples. A chunk's batches are therefore the same for any number of ranks and workers, and so are
its embeddings, written to files named by unit and chunk (`shards`). A unit or chunk already complete in the
output folder is skipped, so a killed job resumes where it stopped, with any world size. A bad image is
skipped and listed in its chunk's status, never stopping the job.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clip.collection import shards
from clip.collection.sources import Collection, Sample, Unit, decode, require_pyarrow
from clip.collection.video import VideoOptions
from clip.cpu_inference import CPUInferenceModel
from clip.runtime import INFERENCE_PRECISIONS

JOB_FORMAT = 1
MAX_LISTED_ERRORS = 20


@dataclass(frozen=True)
class EmbedConfig:
    """One `clip embed` job. Everything that changes the output is recorded in OUT/embed.json."""

    inputs: tuple[str, ...]
    output: str
    model: str
    shard_size: int = 10_000
    batch_size: int = 256
    workers: int = 4
    text: bool = False  # also embed each caption (stored in the metadata's text_emb column)
    precision: str = "fp32"  # fp32; bf16 (CPU: bf16 weights, GPU: autocast); fp16 autocast; int8 (CPU only)
    device: str = "auto"
    img_key: str = "filepath"
    caption_key: str = "caption"
    separator: str | None = None
    progress: bool = True
    frame_interval: float = 1.0  # videos: a frame every this many seconds
    max_frames_per_video: int = 10_000

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(
                f"--shard-size and --batch-size must be at least 1 (got {self.shard_size}, {self.batch_size})"
            )
        if self.workers < 0:
            raise ValueError(f"--workers must be 0 or more, got {self.workers}")
        if self.precision not in INFERENCE_PRECISIONS:
            raise ValueError(
                f"unknown precision {self.precision!r}; use one of {', '.join(INFERENCE_PRECISIONS)}"
            )
        self.video_options()  # checks the video options
        if self.precision == "int8" and self.device == "cuda":
            raise ValueError("--precision int8 is a CPU precision; on a GPU use bf16 or fp16")

    def video_options(self) -> VideoOptions:
        return VideoOptions(self.frame_interval, self.max_frames_per_video)


# ------------------------------------------------------------------------------------- worker side


@dataclass
class Piece:
    """What a worker hands the main process: one batch of a chunk, or the end of a unit.

    pixels [b, 3, n, n] and tokens [b, L] (when captions are embedded) belong to `meta` (b rows); `rows` counts
    the input samples this piece accounts for, skipped ones included; `unit_chunks` is set on a unit's last piece.
    """

    unit: int
    chunk: int
    pixels: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    meta: list[tuple] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    rows: int = 0
    chunk_end: bool = False
    unit_chunks: int | None = None

    def pin_memory(self) -> Piece:
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class _Builder:
    """Collects decoded samples of one chunk into pieces."""

    def __init__(self, unit: int, chunk: int, tar: str | None) -> None:
        self.unit, self.chunk, self.tar = unit, chunk, tar
        self.active = False
        self._reset()

    def _reset(self) -> None:
        self.pixels: list[torch.Tensor] = []
        self.captions: list[str] = []
        self.meta: list[tuple] = []
        self.errors: list[dict] = []
        self.rows = 0

    def add(self, sample: Sample, preprocess: Any) -> None:
        self.active = True
        self.rows += 1
        out = decode(sample, preprocess)
        if isinstance(out, str):
            self.errors.append({"key": sample.key, "row": sample.row, "error": out})
            return
        self.pixels.append(out.pixels)
        self.captions.append(out.caption)
        self.meta.append((sample.key, sample.path, self.tar, out.caption, out.width, out.height, sample.row,
                          sample.frame_time, sample.video))  # fmt: skip

    def take(self, tokenizer: Any, chunk_end: bool = False) -> Piece:
        """The batch so far; captions become ids with the model's `tokenizer` (None: no text embeddings)."""
        tokens = tokenizer(self.captions) if tokenizer is not None and self.captions else None
        pixels = torch.stack(self.pixels) if self.pixels else None
        piece = Piece(self.unit, self.chunk, pixels, tokens, self.meta, self.errors, self.rows, chunk_end)
        self._reset()
        return piece


class UnitStream(torch.utils.data.IterableDataset):
    """Pieces of `units` (this rank's share), split over DataLoader workers; completed chunks are not decoded."""

    def __init__(self, collection: Collection, units: list[Unit], done: frozenset[tuple[int, int]],
                 preprocess: Any, shard_size: int, batch_size: int, tokenizer: Any) -> None:  # fmt: skip
        super().__init__()
        self.collection, self.units, self.done = collection, units, done
        self.preprocess, self.shard_size, self.batch_size = preprocess, shard_size, batch_size
        self.tokenizer = (
            tokenizer  # the model's own (`clip.get_tokenizer`), pickled to workers; None: no text
        )

    def __iter__(self) -> Iterator[Piece]:
        info = torch.utils.data.get_worker_info()
        mine = self.units if info is None else self.units[info.id :: info.num_workers]
        for unit in mine:
            yield from self._unit(unit)

    def _unit(self, unit: Unit) -> Iterator[Piece]:
        builder = _Builder(unit.index, 0, unit.tar)
        chunks = 0
        for i, sample in enumerate(self.collection.samples(unit)):
            chunk = i // self.shard_size
            if chunk != builder.chunk:
                if builder.active:
                    yield builder.take(self.tokenizer, chunk_end=True)
                builder = _Builder(unit.index, chunk, unit.tar)
            chunks = chunk + 1
            if (unit.index, chunk) in self.done:
                continue  # finished by an earlier run: its samples are read past, not decoded
            builder.add(sample, self.preprocess)
            if len(builder.pixels) >= self.batch_size:
                yield builder.take(self.tokenizer)
        if builder.active:
            yield builder.take(self.tokenizer, chunk_end=True)
        yield Piece(unit.index, chunks, unit_chunks=chunks)


# --------------------------------------------------------------------------------------- main side


@dataclass
class _ChunkBuffer:
    embeddings: list[np.ndarray] = field(default_factory=list)
    text: list[np.ndarray] = field(default_factory=list)
    meta: list[tuple] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    rows: int = 0

    def data(self, dim: int, with_text: bool) -> shards.ChunkData:
        emb = np.concatenate(self.embeddings) if self.embeddings else np.zeros((0, dim), np.float16)
        text = None
        if with_text:
            text = np.concatenate(self.text) if self.text else np.zeros((0, dim), np.float16)
        cols = list(zip(*self.meta)) if self.meta else [[] for _ in range(9)]
        return shards.ChunkData(emb, *[list(c) for c in cols], text_embeddings=text)


class _RowCounter:
    """Input rows done by all ranks together, for rank 0's progress bar.

    Uses the rendezvous key-value store torchrun already runs (an atomic add per batch, no collective), so
    ranks never wait for each other while embedding.
    """

    KEY = "clip_embed_rows"

    def __init__(self, distributed: bool) -> None:
        self.local = 0
        self.store = None
        if distributed:
            try:
                from torch.distributed import distributed_c10d

                self.store = distributed_c10d._get_default_store()
            except Exception:  # noqa: BLE001 - without the store the bar shows this rank only
                self.store = None

    def add(self, n: int) -> int:
        self.local += n
        if self.store is None:
            return self.local
        return int(self.store.add(self.KEY, n))


def _encode(
    model: Any, piece: Piece, device: torch.device, precision: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Unit-norm float16 image (and caption) embeddings [b, D] of a piece."""
    from clip.evaluation.features import autocast

    # A CPU-prepared model (bf16 / int8 on the CPU) carries its precision itself: no autocast around it.
    amp = "fp32" if isinstance(model, CPUInferenceModel) else precision
    with torch.no_grad(), autocast(device, amp):
        img = model.encode_image(piece.pixels.to(device, non_blocking=True))
        txt = model.encode_text(piece.tokens.to(device)) if piece.tokens is not None else None
    img = F.normalize(img.float(), dim=-1).cpu()
    return img, (F.normalize(txt.float(), dim=-1).cpu() if txt is not None else None)


def _agreement(reference: Any, piece: Piece, device: torch.device, img: torch.Tensor,
               txt: torch.Tensor | None) -> dict:  # fmt: skip
    """Cosine of this batch's features [b, D] against the fp32 reference model's, per sample (mean and min)."""
    from clip.cpu_inference import cosine_agreement

    ref_img, ref_txt = _encode(reference, piece, device, "fp32")
    out = {
        "batch_size": int(img.shape[0]),
        **{f"image_cosine_{k}": v for k, v in cosine_agreement(ref_img, img).items()},
    }
    if txt is not None and ref_txt is not None:
        out.update({f"text_cosine_{k}": v for k, v in cosine_agreement(ref_txt, txt).items()})
    return out


def _consume(loader: Any, model: Any, cfg: EmbedConfig, device: torch.device, dim: int, bar: Any,
             counter: _RowCounter, references: list | None = None) -> dict:  # fmt: skip
    """Embed every piece and write each chunk as it completes; returns this rank's counts.

    With a reference in `references` (the fp32 model, when --precision is not fp32) the first batch is also
    embedded by it, and the agreement is recorded in the counts; the reference is dropped after that batch.
    """
    reference = references.pop() if references else None
    buffers: dict[tuple[int, int], _ChunkBuffer] = {}
    stats = {"rows": 0, "embedded": 0, "skipped": 0, "chunks": 0, "units": 0, "agreement": None}
    for piece in loader:
        if piece.unit_chunks is not None:
            shards.write_unit_done(cfg.output, piece.unit, piece.unit_chunks)
            stats["units"] += 1
            continue
        buf = buffers.setdefault((piece.unit, piece.chunk), _ChunkBuffer())
        if piece.pixels is not None:
            img, txt = _encode(model, piece, device, cfg.precision)
            if reference is not None:
                stats["agreement"] = _agreement(reference, piece, device, img, txt)
                reference = None
            buf.embeddings.append(img.numpy().astype(np.float16))
            if txt is not None:
                buf.text.append(txt.numpy().astype(np.float16))
        buf.meta += piece.meta
        buf.errors += piece.errors
        buf.rows += piece.rows
        stats["rows"] += piece.rows
        stats["embedded"] += len(piece.meta)
        stats["skipped"] += len(piece.errors)
        if piece.chunk_end:
            del buffers[(piece.unit, piece.chunk)]
            shards.write_chunk(
                cfg.output, piece.unit, piece.chunk, buf.data(dim, cfg.text), buf.rows, buf.errors
            )
            stats["chunks"] += 1
        total = counter.add(piece.rows)
        if bar is not None:
            bar.update(bar.initial + total - bar.n)
    return stats


def _job_record(cfg: EmbedConfig, collection: Collection, embed_dim: int) -> dict:
    return {
        "format": JOB_FORMAT,
        "model": cfg.model,
        "input": collection.describe(),
        "img_key": cfg.img_key,
        "caption_key": cfg.caption_key,
        "shard_size": cfg.shard_size,
        "text": cfg.text,
        "precision": cfg.precision,
        "embed_dim": embed_dim,
    }


def prepare_output(cfg: EmbedConfig, job: dict, is_main: bool) -> None:
    """Check a resumed job is the same job; rank 0 records a new one and removes a killed run's temp files."""
    from clip.io import atomic_write_json

    old = shards.read_job(cfg.output)
    if old is not None and old != job:
        diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
        raise ValueError(
            f"{cfg.output} holds embeddings of a different job (differs in: {', '.join(diff)}); "
            "rerun with the same input and options to resume, or choose a new --output"
        )
    if is_main:
        shards.remove_partial_files(cfg.output)
        if old is None:
            atomic_write_json(os.path.join(cfg.output, shards.JOB_FILE), job)


def _load_model(cfg: EmbedConfig, device: torch.device) -> tuple[Any, Any, Any]:
    """(the model to embed with, its preprocess, the fp32 reference to measure agreement, or None)."""
    import clip
    from clip.cpu_inference import optimize_for_cpu

    # Loaded on the CPU in fp32 (clip.load would round weights to fp16 on CUDA).
    model, preprocess = clip.load(cfg.model, device="cpu")
    model = model.to(device).eval()
    if device.type == "cpu" and cfg.precision in ("fp32", "bf16", "int8"):
        # clip.cpu_inference: oneDNN matmuls (fp32: the same arithmetic), bf16 weights (AVX512-BF16) or int8
        # linears (VNNI), with no per-call casts.
        fast = optimize_for_cpu(model, cfg.precision)
        return fast, preprocess, (None if cfg.precision == "fp32" else model)
    if cfg.precision == "fp32":
        return model, preprocess, None
    if cfg.precision == "int8":
        raise ValueError("--precision int8 is a CPU precision; on a GPU use bf16 or fp16")
    return model, preprocess, model  # autocast around the fp32 model; the reference runs without it


def run_embed(cfg: EmbedConfig) -> dict:
    """Run (or resume) the job on this rank; returns the job's report (complete on rank 0).

    Under torchrun every rank calls this; without it, one process does the whole job.
    """
    from tqdm import tqdm

    from clip.collection.sources import open_collection
    from clip.loading import get_tokenizer
    from clip.train.distributed import barrier, gather_objects, init_from_env, shutdown

    require_pyarrow("clip embed's Parquet metadata files")
    collection = open_collection(
        list(cfg.inputs), cfg.img_key, cfg.caption_key, cfg.separator, cfg.video_options()
    )
    info = init_from_env(cfg.device)
    try:
        model, preprocess, reference = _load_model(cfg, info.device)
        dim = int(model.config.embed_dim)
        prepare_output(cfg, _job_record(cfg, collection, dim), info.is_main)
        barrier()
        done = shards.scan_status(cfg.output)
        units = [
            u
            for u in collection.units(cfg.shard_size)[info.rank :: info.world_size]
            if u.index not in done.units
        ]
        stream = UnitStream(collection, units, done.chunks, preprocess, cfg.shard_size, cfg.batch_size,
                            get_tokenizer(reference) if cfg.text else None)  # fmt: skip
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=cfg.workers, pin_memory=info.device.type == "cuda",
            prefetch_factor=4 if cfg.workers > 0 else None,
        )  # fmt: skip
        bar = None
        if info.is_main and cfg.progress:
            bar = tqdm(
                total=len(collection) or None, initial=done.rows, unit="img", desc="embed", smoothing=0.1
            )
        start = time.perf_counter()
        # Handed over in a list so that only _consume holds the reference, and drops it after one batch.
        refs = [reference] if reference is not None else []
        del reference
        stats = _consume(loader, model, cfg, info.device, dim, bar, _RowCounter(info.distributed), refs)
        stats["seconds"] = time.perf_counter() - start
        if bar is not None:
            bar.close()
        all_stats = gather_objects(stats, info)
        barrier()
        report = write_report(cfg.output, collection, all_stats) if info.is_main else {}
        barrier()
        return report
    finally:
        shutdown(info)


def write_report(out: str, collection: Collection, run_stats: list[dict]) -> dict:
    """OUT/report.json from every chunk's status (earlier runs included) and this run's per-rank counts."""
    from clip.io import atomic_write_json

    statuses = shards.chunk_statuses(out)
    progress = shards.scan_status(out)
    n_units = len(collection.units(int(shards.read_job(out)["shard_size"])))
    errors = [e for s in statuses for e in s["errors"]]
    seconds = max((s["seconds"] for s in run_stats), default=0.0)
    this_run = sum(s["rows"] for s in run_stats)
    report = {
        "complete": len(progress.units) == n_units,
        "units": n_units,
        "units_done": len(progress.units),
        "chunks": len(statuses),
        "rows": sum(s["rows"] for s in statuses),
        "embedded": sum(s["embedded"] for s in statuses),
        "skipped": len(errors),
        "errors": errors,
        "last_run": {
            "world_size": len(run_stats),
            "rows": this_run,
            "embedded": sum(s["embedded"] for s in run_stats),
            "seconds": round(seconds, 3),
            "images_per_second": round(this_run / seconds, 2) if seconds > 0 else None,
            # --precision other than fp32: each rank's first batch embedded by the fp32 model too
            "agreement_with_fp32": [s["agreement"] for s in run_stats if s.get("agreement")],
        },
    }
    atomic_write_json(os.path.join(out, shards.REPORT_FILE), report)
    return report


def print_summary(report: dict, out: str, file: Any = None) -> None:
    """A few lines for the terminal (`file`, default the current sys.stdout): totals, speed, skipped inputs."""
    file = sys.stdout if file is None else file  # read per call: a default bound at import goes stale
    run = report["last_run"]
    rate = (
        f" ({run['images_per_second']} images/s on {run['world_size']} rank(s))"
        if run["images_per_second"]
        else ""
    )
    print(f"embedded {run['embedded']} images in {run['seconds']:.1f} s{rate}", file=file)
    for a in run.get("agreement_with_fp32", [])[:1]:
        text = f", text {a['text_cosine_min']:.5f}" if "text_cosine_min" in a else ""
        print(f"agreement with fp32 on the first {a['batch_size']} images: min cosine "
              f"{a['image_cosine_min']:.5f} (mean {a['image_cosine_mean']:.5f}){text}", file=file)  # fmt: skip
    state = "complete" if report["complete"] else f"{report['units_done']} of {report['units']} units done"
    print(f"{out}: {report['embedded']} embeddings in {report['chunks']} shards, {report['skipped']} inputs skipped "
          f"({state})", file=file)  # fmt: skip
    for e in report["errors"][:MAX_LISTED_ERRORS]:
        print(f"  skipped {e['key']}: {e['error']}", file=file)
    if report["skipped"] > MAX_LISTED_ERRORS:
        print(f"  ... and {report['skipped'] - MAX_LISTED_ERRORS} more (all in {out}/report.json)", file=file)
