"""Finding image files and decoding them in DataLoader workers.

Each worker stats, hashes and decodes one file and returns either the preprocessed pixels, "unchanged" (the
file's stat changed but its SHA-256 did not, so the stored embedding stays), or the error message.  Reading,
hashing and decoding all happen in the workers, so they overlap with the model running in the main process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from PIL import Image

from clip.files import IMAGE_EXTENSIONS, is_image_name, is_video_name  # noqa: F401  (one definition; re-exported)
from clip.files import sha256_file as file_sha256
from clip.search.store import ErrorRecord, FileRecord


def walk_images(root: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Absolute paths of the image files under `root` (recursive, sorted), skipping hidden folders.

    Symlinked folders are not followed (no cycles); `exclude` lists folders to skip (the index itself, when it
    lives inside the photo folder, so its thumbnails are not indexed).  Unreadable folders are left out; use
    `scan_images` to learn which.
    """
    return scan_images(root, exclude)[0]


def scan_images(
    root: str | os.PathLike, exclude: Iterable[str | os.PathLike] = (), *, videos: bool = False
) -> tuple[list[str], list[tuple[str, str]]]:
    """`walk_images`, plus (folder, message) for every folder that could not be listed; with `videos`, the
    video files (`clip.files.VIDEO_EXTENSIONS`) too, in the same sorted list.

    Names that are not valid UTF-8 come back as Python holds them (surrogate escapes), usable with open().
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"photo folder not found: {root!r}; pass an existing directory")
    skip = {os.path.abspath(p) for p in exclude}
    found: list[str] = []
    unreadable: list[tuple[str, str]] = []

    def failed(err: OSError) -> None:
        unreadable.append((err.filename or root, err.strerror or str(err)))

    for folder, dirs, files in os.walk(root, onerror=failed):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(folder, d) not in skip)
        found.extend(
            os.path.join(folder, f)
            for f in files
            if (is_image_name(f) or (videos and is_video_name(f))) and not f.startswith(".")
        )
    return sorted(found), sorted(unreadable)


@dataclass(frozen=True)
class Job:
    """A file to (re-)embed; `known_sha256` is set when the index holds an embedding of an earlier version."""

    path: str
    known_sha256: str | None = None


@dataclass
class Batch:
    """What the DataLoader yields: pixels [n, 3, H, W] for `records` (same order), errors and unchanged."""

    pixels: torch.Tensor
    records: list[FileRecord] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)
    unchanged: list[tuple[str, int, int]] = field(default_factory=list)


def read_job(job: Job, preprocess: Callable[[Image.Image], torch.Tensor]) -> tuple[str, object]:
    """Stat, hash and decode one file.  Returns ("image", (record, pixels)), ("same", (path, size, mtime))
    or ("error", ErrorRecord); never raises for a bad file."""
    from clip.preprocess import load_image

    size = mtime = -1
    try:
        # Stat before reading: if the file changes while we read, the next run sees a newer mtime.
        st = os.stat(job.path)
        size, mtime = st.st_size, st.st_mtime_ns
        digest = file_sha256(job.path)
        if digest == job.known_sha256:
            return "same", (job.path, size, mtime)
        img = load_image(job.path, exif=True)
        pixels = preprocess(img)
        return "image", (FileRecord(job.path, size, mtime, digest, img.width, img.height), pixels)
    except (ValueError, OSError) as err:
        return "error", ErrorRecord(job.path, size, mtime, str(err) or type(err).__name__)
    except Exception as err:  # noqa: BLE001 - a decoder bug on one odd file must not end a long run
        return "error", ErrorRecord(job.path, size, mtime, f"{type(err).__name__}: {err}")


class ImageFiles(torch.utils.data.Dataset):
    """Map-style dataset over `jobs`; items are `read_job` results (picklable for worker processes)."""

    def __init__(self, jobs: list[Job], preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.jobs = jobs
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> tuple[str, object]:
        return read_job(self.jobs[i], self.preprocess)


def collate(items: list[tuple[str, object]]) -> Batch:
    batch = Batch(pixels=torch.empty(0))
    pixels = []
    for kind, value in items:
        if kind == "image":
            record, px = value
            batch.records.append(record)
            pixels.append(px)
        elif kind == "same":
            batch.unchanged.append(value)
        else:
            batch.errors.append(value)
    if pixels:
        batch.pixels = torch.stack(pixels)  # [n, 3, H, W]
    return batch


def make_loader(
    jobs: list[Job], preprocess: Callable[[Image.Image], torch.Tensor], batch_size: int, num_workers: int
) -> torch.utils.data.DataLoader:
    """Batches of decoded files, in job order, decoded by `num_workers` processes (0: in this process)."""
    return torch.utils.data.DataLoader(
        ImageFiles(jobs, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )


def default_workers() -> int:
    """Decoding processes: one per core, at most 8 (beyond that the model is the bottleneck)."""
    return max(
        1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def relative_to(path: str, root: str | os.PathLike) -> bool:
    """Whether `path` lies inside folder `root` (both absolute)."""
    root = os.path.join(os.path.abspath(root), "")
    return path.startswith(root)


def resolve_paths(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Absolute, normalised paths (symlinks kept as given), de-duplicated, in order."""
    return list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in paths))
