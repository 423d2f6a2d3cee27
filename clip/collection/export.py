"""Writing kept pairs: a CSV or Parquet table (`filepath,caption`, what `clip train` reads), or WebDataset tar
shards (`KEY.jpg|png|webp` + `KEY.txt` + `KEY.json`, img2dataset's layout, also read by `clip train`).

Image bytes are copied as they are (from the file, or from the source tar) when `clip train` can read their
format; other formats (GIF, BMP, TIFF) are re-encoded as PNG. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

FORMATS = ("csv", "parquet", "wds")


@dataclass(frozen=True)
class Pair:
    """A kept pair: where its image is (file path, or key inside a tar shard) and its caption."""

    key: str
    path: str | None
    tar: str | None
    caption: str
    width: int
    height: int
    similarity: float | None


def write_table(pairs: list[Pair], path: str, fmt: str) -> None:
    """`filepath,caption,key,similarity` as CSV, or with width/height/tar as Parquet (absolute image paths)."""
    from clip.io import atomic_path

    if fmt == "csv":
        inside = [p.key for p in pairs if p.path is None]
        if inside:
            raise ValueError(
                f"images such as {inside[0]!r} live inside tar shards: write --format wds (or parquet)"
            )
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["filepath", "caption", "key", "similarity"])
            for p in pairs:
                writer.writerow(
                    [p.path, p.caption, p.key, "" if p.similarity is None else f"{p.similarity:.6f}"]
                )
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "filepath": pa.array([p.path for p in pairs], pa.string()),
        "caption": pa.array([p.caption for p in pairs], pa.string()),
        "key": pa.array([p.key for p in pairs], pa.string()),
        "tar": pa.array([p.tar for p in pairs], pa.string()),
        "width": pa.array([p.width for p in pairs], pa.int32()),
        "height": pa.array([p.height for p in pairs], pa.int32()),
        "similarity": pa.array([p.similarity for p in pairs], pa.float32()),
    })  # fmt: skip
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _image_bytes(pairs: list[Pair]) -> Iterator[tuple[Pair, bytes | None, str]]:
    """(pair, image bytes or None, extension or error), in the order of `pairs`; tar shards are streamed once."""
    from clip.collection.sources import tar_samples

    by_tar: dict[str, set[str]] = defaultdict(set)
    for p in pairs:
        if p.tar is not None:
            by_tar[p.tar].add(p.key)
    found: dict[tuple[str, str], bytes] = {}
    current_tar = None
    for p in pairs:
        if p.path is not None:
            try:
                with open(p.path, "rb") as f:
                    yield p, f.read(), os.path.splitext(p.path)[1].lstrip(".").lower()
            except OSError as err:
                yield p, None, f"cannot read {p.path!r}: {err.strerror or err}"
            continue
        if p.tar != current_tar:  # pairs come in input order, so one tar's pairs are consecutive
            found = {(p.tar, s.key): s.data for s in tar_samples(p.tar) if s.key in by_tar[p.tar] and s.data}
            current_tar = p.tar
        data = found.pop((p.tar, p.key), None)
        yield p, data, "" if data is not None else f"sample {p.key!r} no longer readable in {p.tar}"


def _sniff_extension(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(img.format or "", "")


def _trainable(data: bytes, ext: str) -> tuple[bytes, str]:
    """The bytes and a WebDataset image extension `clip train` reads; others re-encoded as PNG."""
    from PIL import Image

    from clip.train.wds import IMAGE_KEYS

    ext = ext if ext in IMAGE_KEYS else _sniff_extension(data)
    if ext in IMAGE_KEYS:
        return data, ext
    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        img.convert("RGBA" if "A" in img.getbands() else "RGB").save(buf, format="PNG")
    return buf.getvalue(), "png"


def _add(tar, name: str, data: bytes) -> None:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(pairs: list[Pair], folder: str, samples_per_shard: int) -> tuple[list[str], list[dict]]:
    """Tar shards 00000.tar, 00001.tar ... of `samples_per_shard` pairs; returns (shard paths, errors)."""
    import tarfile

    from clip.io import atomic_path

    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    os.makedirs(folder, exist_ok=True)
    shards: list[str] = []
    errors: list[dict] = []
    stream = _image_bytes(pairs)
    n = 0
    while True:
        path = os.path.join(folder, f"{len(shards):05d}.tar")
        written = 0
        with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
            for p, data, ext in stream:
                try:
                    if data is None:
                        raise ValueError(ext)
                    data, ext = _trainable(data, ext)
                except Exception as err:  # noqa: BLE001 - one unreadable image must not stop the export
                    errors.append({"key": p.key, "error": str(err)})
                    continue
                key = f"{n:09d}"
                meta = {"key": p.key, "caption": p.caption, "width": p.width, "height": p.height,
                        "similarity": p.similarity, "source": p.path or p.tar}  # fmt: skip
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.txt", p.caption.encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                n += 1
                written += 1
                if written == samples_per_shard:
                    break
        if written == 0:
            os.unlink(path)
            break
        shards.append(path)
        if written < samples_per_shard:
            break
    return shards, errors


def shard_pattern(shards: list[str]) -> str:
    """'folder/{00000..00012}.tar' for `clip train --train-data` (the single path for one shard)."""
    if len(shards) <= 1:
        return shards[0] if shards else ""
    folder = os.path.dirname(shards[0])
    return os.path.join(folder, f"{{00000..{len(shards) - 1:05d}}}.tar")
