"""Videos in a folder index (`clip index`): one frame every `VideoOptions.frame_interval` seconds, each stored
as its own embedding with its presentation time (`clip.search.store`: one row per frame, keyed (path, time)).

Frames are decoded by `clip.collection.video.read_frames` (the same sampling as `clip embed`) in DataLoader
workers, one video per worker at a time, and reach the model in chunks of at most `batch_size` frames; only the
vectors of a video are held until its last frame, so memory stays at one chunk of pixels whatever the length.
All frames of a video are committed in one transaction, so a killed run never leaves half a video that the next
run would take as indexed.  A video is hashed like an image (an unchanged file whose mtime moved keeps its
frames), and its record holds the sampling too (`video_token`: other options embed it again); one that yields no frame is an unreadable file (recorded, retried once it changes); one that breaks
off mid-stream, or reaches `max_frames`, keeps the frames read and gets a note naming it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from clip.collection.video import AV_EXTRA, VideoOptions, read_frames
from clip.files import is_video_name
from clip.files import sha256_file as file_sha256
from clip.search.report import IndexReport
from clip.search.scan import Job
from clip.search.store import ErrorRecord, FileRecord

OPTIONS_KEY = "video_options"  # meta: the sampling the index's videos were embedded with


def av_available() -> bool:
    """Whether PyAV can be imported (checked without importing it: FFmpeg's libraries are large)."""
    return importlib.util.find_spec("av") is not None


def missing_av_note(count: int) -> tuple[str, str]:
    return (
        "",
        f"{count} video file(s) left out: reading videos needs PyAV, which is not installed: {AV_EXTRA}",
    )


def split_videos(paths: list[str]) -> tuple[list[str], list[str]]:
    """(images, videos) of `paths`, by file name."""
    videos = [p for p in paths if is_video_name(p)]
    chosen = set(videos)
    return [p for p in paths if p not in chosen], videos


def sampling_tag(options: VideoOptions) -> str:
    """How a video's frames were chosen, as stored after its content hash (`video_token`)."""
    return f"v{options.frame_interval:g}x{options.max_frames}"


def video_token(content_sha256: str, options: VideoOptions) -> str:
    """What a video's `sha256` column holds: its content's SHA-256 and the sampling, so that a video embedded
    with another --frame-interval or --max-frames-per-video is embedded again (and its cached thumbnails,
    named by this token, are pruned)."""
    return f"{content_sha256}_{sampling_tag(options)}"


def resampled(path: str, token: str, options: VideoOptions) -> bool:
    """Whether the indexed file `path` (stored token `token`) is a video sampled otherwise than `options`."""
    return is_video_name(path) and not token.endswith("_" + sampling_tag(options))


@dataclass
class VideoChunk:
    """What a worker sends: frames of a video ("frames"), its end ("end", with the record every frame shares),
    an unchanged video ("same") or an unreadable one ("error")."""

    kind: str
    path: str
    times: list[float] = field(default_factory=list)
    pixels: torch.Tensor | None = None  # [len(times), 3, H, W]
    record: FileRecord | ErrorRecord | None = None
    unchanged: tuple[str, int, int] | None = None
    notes: list[str] = field(default_factory=list)


def read_video_job(
    job: Job, preprocess: Callable[[Image.Image], torch.Tensor], options: VideoOptions, chunk: int
) -> Iterator[VideoChunk]:
    """Stat, hash and decode one video into chunks of at most `chunk` preprocessed frames; never raises."""
    path, size, mtime = job.path, -1, -1
    try:
        st = os.stat(path)  # before reading: a file changed meanwhile shows a newer mtime next run
        size, mtime = st.st_size, st.st_mtime_ns
        digest = video_token(file_sha256(path), options)
    except OSError as err:
        yield VideoChunk("error", path, record=ErrorRecord(path, size, mtime, str(err) or type(err).__name__))
        return
    if digest == job.known_sha256:
        yield VideoChunk("same", path, unchanged=(path, size, mtime))
        return
    times: list[float] = []
    pixels: list[torch.Tensor] = []
    notes: list[str] = []
    shape = None
    try:
        for item in read_frames(path, options):
            if isinstance(item, str):
                notes.append(item)
                continue
            shape = shape or item.image.size
            times.append(item.time)
            pixels.append(preprocess(item.image))
            if len(pixels) == chunk:
                yield VideoChunk("frames", path, times, torch.stack(pixels))
                times, pixels = [], []
    except Exception as err:  # noqa: BLE001 - a preprocessing bug on one odd frame must not end the run
        notes.append(f"video {path!r}: a frame could not be preprocessed: {type(err).__name__}: {err}")
    if pixels:
        yield VideoChunk("frames", path, times, torch.stack(pixels))
    if shape is None:
        message = notes[-1] if notes else f"video {path!r}: no frame could be decoded"
        yield VideoChunk("error", path, record=ErrorRecord(path, size, mtime, message))
        return
    yield VideoChunk("end", path, record=FileRecord(path, size, mtime, digest, *shape), notes=notes)


class VideoFiles(torch.utils.data.IterableDataset):
    """The chunks of `jobs`' videos; each DataLoader worker reads every n-th video, whole."""

    def __init__(
        self,
        jobs: list[Job],
        preprocess: Callable[[Image.Image], torch.Tensor],
        options: VideoOptions,
        chunk: int,
    ) -> None:
        self.jobs, self.preprocess, self.options, self.chunk = jobs, preprocess, options, chunk

    def __iter__(self) -> Iterator[VideoChunk]:
        info = torch.utils.data.get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id :: info.num_workers]
        for job in jobs:
            yield from read_video_job(job, self.preprocess, self.options, self.chunk)


def _collate(chunk: VideoChunk) -> VideoChunk:
    return chunk  # chunks come batched already


@dataclass
class VideoRun:
    """One run's video embedding: `encode` turns pixels [n, 3, H, W] into vectors [n, D]; `flush` commits the
    pending (vectors, records, errors, unchanged) lists and empties them (`Index._flush`)."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    flush: Callable[[tuple[list, list, list, list]], None]
    report: IndexReport
    options: VideoOptions
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = False
    commit_seconds: float = 2.0

    def run(self, jobs: list[Job], preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        from tqdm import tqdm

        workers = min(self.num_workers, len(jobs))
        loader = torch.utils.data.DataLoader(
            VideoFiles(jobs, preprocess, self.options, self.batch_size), batch_size=None,
            num_workers=workers, collate_fn=_collate, prefetch_factor=2 if workers else None,
        )  # fmt: skip
        known = {j.path for j in jobs if j.known_sha256 is not None}
        partial: dict[str, tuple[list[np.ndarray], list[float]]] = {}
        pending: tuple[list, list, list, list] = ([], [], [], [])
        last = time.monotonic()
        with tqdm(total=len(jobs), unit="video", desc="videos", disable=not self.progress) as bar:
            for chunk in loader:
                if chunk.kind == "frames":
                    vecs, times = partial.setdefault(chunk.path, ([], []))
                    vecs.append(self.encode(chunk.pixels).to(torch.float16).numpy())
                    times.extend(chunk.times)
                    continue
                self._finish(chunk, partial.pop(chunk.path, ([], [])), pending, chunk.path in known)
                bar.update(1)
                if time.monotonic() - last >= self.commit_seconds:
                    self.flush(pending)  # whole videos only: a video's frames are never split over commits
                    last = time.monotonic()
        self.flush(pending)

    def _finish(
        self, chunk: VideoChunk, frames: tuple[list, list[float]], pending: tuple, known: bool
    ) -> None:
        report = self.report
        if chunk.kind == "same":
            pending[3].append(chunk.unchanged)
            report.unchanged_content += 1
        elif chunk.kind == "error":
            pending[2].append(chunk.record)
            report.failed.append((chunk.path, chunk.record.message))
        else:
            vecs, times = frames
            pending[0].extend(vecs)
            pending[1].extend(dataclasses.replace(chunk.record, time=t) for t in times)
            report.frames += len(times)
            report.updated += known
            report.added += not known
            report.notes.extend((chunk.path, n) for n in chunk.notes)


def frame_label(t: float) -> str:
    """A frame's time as `clip search` prints it after the path: `#t=12.000` (a media fragment)."""
    return f"#t={t:.3f}"


def hit_fields(time_s: float | None) -> dict[str, Any]:
    """The JSON fields of a hit's time: {"time": seconds} for a video frame, nothing for an image."""
    return {} if time_s is None else {"time": round(time_s, 6)}
