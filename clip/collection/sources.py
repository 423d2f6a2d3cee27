"""Inputs of `clip embed`, `clip filter` and `clip score`: image-caption pairs from folders, tables or tar shards.

* A folder: every image under it (the extensions and walk of `clip.search.scan`: recursive, sorted, hidden
  folders and files skipped); an image's caption is the same-named `.txt` beside it (none: an empty caption).
  A folder that holds no images but `.tar` files is read as WebDataset shards.
* A table: CSV / TSV (`clip.train.data.read_csv`: a header row, columns `filepath` and `caption` by default)
  or Parquet (the same columns; needs pyarrow). Paths are relative to the table's folder.
* Videos (`clip.collection.video.VIDEO_EXTENSIONS`, in a folder or listed in a table): one sample per frame
  kept (every `VideoOptions.frame_interval` seconds), keyed `PATH#t=SECONDS` (a media-fragment time), with
  the frame's time and the video's path in the metadata. Each video is a unit of its own.
* WebDataset shards (img2dataset's layout): `.tar` files whose members `KEY.jpg` (or .jpeg/.png/.webp) and
  `KEY.txt` or `KEY.json` (its "caption") make one sample. Pass them as paths (the shell expands
  `shards/{00000..00009}.tar`) or as their folder.

The input is cut into `Unit`s that do not depend on the number of ranks or workers, so a job's output is the
same whoever runs which unit: a table or folder in slices of `shard_size` rows, tar shards one unit each (a
unit's samples are then cut into chunks of `shard_size`). Reading a sample never raises: a problem is carried
as `Sample.error` or returned by `decode`, so one bad file never stops a job.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from clip.collection.video import VideoOptions, is_video_name, read_frames, walk_videos

EMBED_EXTRA = "pip install 'clipforge[embed]'"
CSV_SUFFIXES = (".csv", ".tsv", ".tab")
PARQUET_SUFFIXES = (".parquet",)


def require_pyarrow(what: str = "Parquet files") -> None:
    """Raise one clear line naming the extra when pyarrow is missing."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"{what} need pyarrow, which is not installed: {EMBED_EXTRA}") from err


@dataclass(frozen=True)
class Sample:
    """One input pair before decoding.

    key: the sample's name (path relative to the folder / as listed in the table, or the tar member key);
    row: its position in the input (folder / table row) or in its tar shard; path: the image file, or None
    when `data` holds the image bytes (tar); caption: the text, or None to read `caption_path` when decoding.
    error: set when the sample cannot be used at all (no image in a tar sample, an unreadable shard).
    A video frame has `frame_time` (seconds), `video` (the file) and the decoded `image`.
    """

    key: str
    row: int
    path: str | None = None
    caption: str | None = None
    caption_path: str | None = None
    data: bytes | None = None
    error: str | None = None
    frame_time: float | None = None
    video: str | None = None
    image: Image.Image | None = None


@dataclass(frozen=True)
class Unit:
    """A slice of the input that one worker reads whole: rows [start, stop) of a folder or table, or one tar."""

    index: int
    start: int = 0
    stop: int = 0
    tar: str | None = None

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}"


@dataclass
class Collection:
    """The pairs of one input; `kind` is "folder", "table" or "tar". Rows hold (key, path, caption or .txt)."""

    kind: str
    source: list[str]
    keys: list[str]
    paths: list[str]
    captions: list[str | None]
    caption_files: bool = False  # captions[i] is a .txt path read when decoding
    tars: tuple[str, ...] = ()
    video: VideoOptions = VideoOptions()

    @property
    def has_videos(self) -> bool:
        return any(is_video_name(p) for p in self.paths)

    def __len__(self) -> int:
        """Number of rows (folders, tables); 0 for tar shards, whose sample count is known only once read."""
        return len(self.keys)

    def units(self, shard_size: int) -> list[Unit]:
        """The input cut into units: slices of `shard_size` rows, or one unit per tar shard."""
        if shard_size < 1:
            raise ValueError(f"shard size must be at least 1, got {shard_size}")
        if self.kind == "tar":
            return [Unit(i, tar=t) for i, t in enumerate(self.tars)]
        n = len(self.keys)
        if not self.has_videos:
            return [Unit(i, s, min(s + shard_size, n)) for i, s in enumerate(range(0, n, shard_size))]
        # A video expands to many frames: it is a unit of its own; the images between videos are sliced.
        bounds, start = [], 0
        for row, path in enumerate(self.paths):
            if is_video_name(path):
                bounds += [(s, min(s + shard_size, row)) for s in range(start, row, shard_size)]
                bounds.append((row, row + 1))
                start = row + 1
        bounds += [(s, min(s + shard_size, n)) for s in range(start, n, shard_size)]
        return [Unit(i, a, b) for i, (a, b) in enumerate(bounds)]

    def samples(self, unit: Unit) -> Iterator[Sample]:
        """The samples of `unit`, in input order (a tar is streamed; nothing is decoded yet)."""
        if unit.tar is not None:
            yield from tar_samples(unit.tar)
            return
        for i in range(unit.start, unit.stop):
            text = self.captions[i]
            if is_video_name(self.paths[i]):
                yield from self._frames(i)
            elif self.caption_files:
                yield Sample(self.keys[i], i, path=self.paths[i], caption_path=text)
            else:
                yield Sample(self.keys[i], i, path=self.paths[i], caption=text or "")

    def _frames(self, i: int) -> Iterator[Sample]:
        """The kept frames of the video in row i as samples (decoded lazily); a problem as one error sample."""
        caption = None if self.caption_files else (self.captions[i] or "")
        caption_path = self.captions[i] if self.caption_files else None
        for frame in read_frames(self.paths[i], self.video):
            if isinstance(frame, str):
                yield Sample(self.keys[i], i, path=self.paths[i], error=frame)
                continue
            key = f"{self.keys[i]}#t={frame.time:.3f}"
            yield Sample(key, i, path=self.paths[i], caption=caption, caption_path=caption_path,
                         frame_time=frame.time, video=self.paths[i], image=frame.image)  # fmt: skip

    def describe(self) -> dict:
        """What identifies this input in a job file (a resumed job must read the same input)."""
        out = {"kind": self.kind, "source": self.source, "rows": len(self.keys), "tars": list(self.tars)}
        if self.has_videos:  # the sampling changes the output; image-only jobs keep their old record
            out["video"] = {"frame_interval": self.video.frame_interval, "max_frames": self.video.max_frames}
        return out


# ------------------------------------------------------------------------------------------------ opening


def open_collection(
    inputs: list[str],
    img_key: str = "filepath",
    caption_key: str = "caption",
    separator: str | None = None,
    video: VideoOptions | None = None,
) -> Collection:
    """A folder, one CSV/TSV/Parquet table, or WebDataset `.tar` shards (several paths, or their folder).

    Videos in a folder or table are sampled as `video` says (default: a frame a second)."""
    collection = _open(inputs, img_key, caption_key, separator)
    if video is not None:
        collection.video = video
    return collection


def _open(inputs: list[str], img_key: str, caption_key: str, separator: str | None) -> Collection:
    from clip.train.wds import TAR_SUFFIXES

    if not inputs:
        raise ValueError("no input given; pass a folder of images, a CSV/TSV/Parquet table or .tar shards")
    if all(p.lower().endswith(TAR_SUFFIXES) for p in inputs):
        missing = [p for p in inputs if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"WebDataset shard not found: {missing[0]!r}")
        return _tar_collection([os.path.abspath(p) for p in inputs])
    if len(inputs) > 1:
        raise ValueError(f"several inputs {inputs[:3]}: pass one folder or one table, or only .tar shards")
    source = inputs[0]
    if os.path.isdir(source):
        return _folder_collection(source, TAR_SUFFIXES)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"input {source!r} is neither a folder nor a file")
    lower = source.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        paths, captions = read_parquet(source, img_key, caption_key)
    elif lower.endswith(CSV_SUFFIXES):
        from clip.train.data import read_csv

        paths, captions = read_csv(source, img_key, caption_key, separator)
    else:
        raise ValueError(f"input {source!r}: not a folder, .csv/.tsv/.parquet table or .tar shard")
    if not paths:
        raise ValueError(f"{source}: the table has a header but no rows")
    base = os.path.dirname(os.path.abspath(source))
    return Collection("table", [os.path.abspath(source)], [_key(p, base) for p in paths], paths, captions)


def _key(path: str, base: str) -> str:
    """A table row's key: its path relative to the table's folder (absolute when it lies outside)."""
    if not path:
        return ""
    rel = os.path.relpath(path, base)
    return path if rel.startswith("..") else rel


def _folder_collection(root: str, tar_suffixes: tuple[str, ...]) -> Collection:
    from clip.search.scan import IMAGE_EXTENSIONS, walk_images

    root = os.path.abspath(root)
    paths = sorted(walk_images(root) + walk_videos(root))
    if paths:
        keys = [os.path.relpath(p, root) for p in paths]
        captions: list[str | None] = [os.path.splitext(p)[0] + ".txt" for p in paths]
        return Collection("folder", [root], keys, paths, captions, caption_files=True)
    tars = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(tar_suffixes))
    if tars:
        return _tar_collection(tars)
    raise ValueError(
        f"folder {root!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}), no videos and no .tar shards"
    )


def _tar_collection(tars: list[str]) -> Collection:
    return Collection("tar", list(tars), [], [], [], tars=tuple(tars))


def read_parquet(path: str, img_key: str, caption_key: str) -> tuple[list[str], list[str]]:
    """(image paths resolved against the file's folder, captions) from a Parquet table."""
    require_pyarrow()
    import pyarrow.parquet as pq

    columns = pq.read_schema(path).names
    missing = [k for k in (img_key, caption_key) if k not in columns]
    if missing:
        raise ValueError(
            f"{path}: no column(s) {missing} (columns: {columns}); choose them with --csv-img-key / "
            "--csv-caption-key"
        )
    table = pq.read_table(path, columns=[img_key, caption_key])
    base = os.path.dirname(os.path.abspath(path))
    paths = [os.path.join(base, p) if p else "" for p in table.column(img_key).to_pylist()]
    captions = ["" if c is None else str(c) for c in table.column(caption_key).to_pylist()]
    return paths, captions


# ------------------------------------------------------------------------------------------------ tar shards


def _split_member(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): WebDataset's rule, the extension starts at the first dot."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def tar_samples(path: str) -> Iterator[Sample]:
    """Stream the samples of one tar shard (members grouped by key, as WebDataset does); never raises.

    A shard that breaks off (truncated, corrupt) ends with one error sample naming it.
    """
    from clip.train.wds import IMAGE_KEYS, decode_caption

    row = 0
    current: str | None = None
    parts: dict[str, bytes] = {}

    def finish() -> Sample:
        image_ext = next((k for k in IMAGE_KEYS if k in parts), None)
        caption = decode_caption(parts)
        if image_ext is None:
            error = f"no image ({', '.join('.' + k for k in IMAGE_KEYS)}) in sample {current!r} of {path}"
            return Sample(str(current), row, caption=caption, error=error)
        return Sample(str(current), row, caption=caption, data=parts[image_ext])

    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if key != current and current is not None:
                    yield finish()
                    row += 1
                    parts = {}
                current = key
                handle = tar.extractfile(member)
                parts[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        yield Sample(f"{os.path.basename(path)}#{row}", row, error=f"unreadable shard {path}: {err}")
        return
    if current is not None:
        yield finish()


# ------------------------------------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class Decoded:
    """A decoded sample: pixels [3, n, n] float32, the image's original size and its caption."""

    pixels: torch.Tensor
    width: int
    height: int
    caption: str


def load_image_bytes(data: bytes, name: str) -> Image.Image:
    """Decode image bytes fully, EXIF orientation applied; ValueError naming `name` when it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Image.DecompressionBombError as err:
        raise ValueError(f"image too large to decode safely: {name!r}: {err}") from err
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for corrupt data
        raise ValueError(f"cannot decode image {name!r}: {type(err).__name__}: {err}") from err
    return ImageOps.exif_transpose(img)


def read_caption(sample: Sample) -> str:
    """The sample's caption; a folder image without its .txt has an empty caption."""
    if sample.caption_path is None:
        return sample.caption or ""
    try:
        return Path(sample.caption_path).read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return ""


def decode(sample: Sample, preprocess: Callable[[Image.Image], torch.Tensor]) -> Decoded | str:
    """Decode and preprocess one sample; returns the error message instead of raising."""
    from clip.preprocess import load_image

    if sample.error is not None:
        return sample.error
    try:
        if sample.image is not None:  # a video frame, decoded while reading the video
            img = sample.image
        elif sample.data is not None:
            img = load_image_bytes(sample.data, sample.key)
        elif sample.path:
            img = load_image(sample.path, exif=True)
        else:
            return f"row {sample.row}: empty image path"
        return Decoded(preprocess(img), img.width, img.height, read_caption(sample))
    except (ValueError, OSError) as err:
        return str(err) or type(err).__name__
    except Exception as err:  # noqa: BLE001 - a decoder bug on one odd file must not end a long job
        return f"{sample.key}: {type(err).__name__}: {err}"
