"""The output of `clip embed`: shards of float16 embeddings with Parquet metadata, each written atomically.

    OUT/embed.json                       the job (model, input, shard size, ...); a resumed job must match it
    OUT/img_emb/part-UUUUUU-CCC.npy      [n, D] float16 unit-norm image embeddings of chunk CCC of unit UUUUUU
    OUT/metadata/part-UUUUUU-CCC.parquet n rows: key, path, tar, caption, width, height, row, frame_time and
                                         video (a video frame's time in seconds and file; null for images)
                                         (+ text_emb [D])
    OUT/status/part-UUUUUU-CCC.json      the chunk is complete: input rows read, rows embedded, skipped errors
    OUT/status/part-UUUUUU.json          the unit is complete: how many chunks it has
    OUT/report.json                      totals and every skipped input (rewritten at the end of each run)

A chunk's three files are written in that order (each to a temporary file, then moved into place), so its
status file existing means the other two are whole; a killed job leaves at most temporary files, which the next
run deletes. Chunk names sort in input order, so concatenating the shards gives the input order whatever the
number of ranks and workers that wrote them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EMB_DIR, META_DIR, STATUS_DIR = "img_emb", "metadata", "status"
JOB_FILE, REPORT_FILE = "embed.json", "report.json"
_CHUNK_RE = re.compile(r"^part-(\d{6})-(\d{3})\.json$")
_UNIT_RE = re.compile(r"^part-(\d{6})\.json$")


def chunk_name(unit: int, chunk: int) -> str:
    if chunk > 999:
        raise ValueError(f"unit {unit} has more than 1000 chunks: raise --shard-size")
    return f"part-{unit:06d}-{chunk:03d}"


def unit_name(unit: int) -> str:
    return f"part-{unit:06d}"


@dataclass
class ChunkData:
    """What one chunk holds: embeddings [n, D] float16 and n metadata rows (text_emb [n, D] or None)."""

    embeddings: np.ndarray
    keys: list[str] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)
    tars: list[str | None] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    frame_times: list[float | None] = field(default_factory=list)
    videos: list[str | None] = field(default_factory=list)
    text_embeddings: np.ndarray | None = None


def _metadata_table(data: ChunkData):
    import pyarrow as pa

    columns = {
        "key": pa.array(data.keys, pa.string()),
        "path": pa.array(data.paths, pa.string()),
        "tar": pa.array(data.tars, pa.string()),
        "caption": pa.array(data.captions, pa.string()),
        "width": pa.array(data.widths, pa.int32()),
        "height": pa.array(data.heights, pa.int32()),
        "row": pa.array(data.rows, pa.int64()),
        "frame_time": pa.array(data.frame_times or [None] * len(data.keys), pa.float64()),
        "video": pa.array(data.videos or [None] * len(data.keys), pa.string()),
    }
    if data.text_embeddings is not None:
        t = np.ascontiguousarray(data.text_embeddings, dtype=np.float16)
        columns["text_emb"] = pa.FixedSizeListArray.from_arrays(pa.array(t.reshape(-1)), t.shape[1])
    return pa.table(columns)


def write_chunk(out: str | os.PathLike, unit: int, chunk: int, data: ChunkData, rows_read: int,
                errors: list[dict]) -> None:  # fmt: skip
    """Write one chunk's embeddings, metadata and status (in that order, each atomically)."""
    import pyarrow.parquet as pq

    from clip.io import atomic_path, atomic_write_json

    out = Path(out)
    name = chunk_name(unit, chunk)
    if len(data.embeddings) != len(data.keys):
        raise ValueError(
            f"chunk {name}: {len(data.embeddings)} embeddings but {len(data.keys)} metadata rows"
        )
    with atomic_path(out / EMB_DIR / f"{name}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(data.embeddings, dtype=np.float16))
    with atomic_path(out / META_DIR / f"{name}.parquet") as tmp:
        pq.write_table(_metadata_table(data), tmp)
    status = {"unit": unit, "chunk": chunk, "rows": rows_read, "embedded": len(data.keys), "errors": errors}
    atomic_write_json(out / STATUS_DIR / f"{name}.json", status)


def write_unit_done(out: str | os.PathLike, unit: int, chunks: int) -> None:
    from clip.io import atomic_write_json

    atomic_write_json(Path(out) / STATUS_DIR / f"{unit_name(unit)}.json", {"unit": unit, "chunks": chunks})


@dataclass(frozen=True)
class Progress:
    """What earlier runs finished: complete units, complete chunks (unit, chunk) and their rows read."""

    units: frozenset[int]
    chunks: frozenset[tuple[int, int]]
    rows: int


def scan_status(out: str | os.PathLike) -> Progress:
    """The units and chunks already complete in `out` (from their status files)."""
    folder = Path(out) / STATUS_DIR
    units, chunks, rows = set(), set(), 0
    if folder.is_dir():
        for entry in os.scandir(folder):
            if m := _CHUNK_RE.match(entry.name):
                chunks.add((int(m.group(1)), int(m.group(2))))
                rows += int(json.loads(Path(entry.path).read_text())["rows"])
            elif m := _UNIT_RE.match(entry.name):
                units.add(int(m.group(1)))
    return Progress(frozenset(units), frozenset(chunks), rows)


def remove_partial_files(out: str | os.PathLike) -> int:
    """Delete temporary files a killed run left behind (never a finished file); returns how many."""
    removed = 0
    for sub in (EMB_DIR, META_DIR, STATUS_DIR):
        folder = Path(out) / sub
        if folder.is_dir():
            for p in folder.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def complete_chunks(out: str | os.PathLike) -> list[str]:
    """Names of the complete chunks in `out`, in input order."""
    progress = scan_status(out)
    return [chunk_name(u, c) for u, c in sorted(progress.chunks)]


def chunk_statuses(out: str | os.PathLike) -> list[dict]:
    """The status records of the complete chunks, in input order."""
    folder = Path(out) / STATUS_DIR
    return [json.loads((folder / f"{name}.json").read_text()) for name in complete_chunks(out)]


def read_job(out: str | os.PathLike) -> dict | None:
    path = Path(out) / JOB_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_embeddings(out: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """All image embeddings [N, D] float16 of the complete chunks, in input order."""
    parts = [
        np.load(Path(out) / EMB_DIR / f"{n}.npy", mmap_mode="r" if mmap else None)
        for n in complete_chunks(out)
    ]
    if not parts:
        raise ValueError(f"{out} holds no finished embedding shards; run `clip embed` into it first")
    return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])


def load_metadata(out: str | os.PathLike, columns: list[str] | None = None):
    """The metadata of the complete chunks as one pyarrow Table (N rows, the order of `load_embeddings`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [
        pq.read_table(Path(out) / META_DIR / f"{n}.parquet", columns=columns) for n in complete_chunks(out)
    ]
    if not tables:
        raise ValueError(f"{out} holds no finished metadata shards; run `clip embed` into it first")
    # promote: shards written before the frame_time / video columns existed read as nulls there
    return pa.concat_tables(tables, promote_options="default")


def text_embeddings(table) -> np.ndarray:
    """The `text_emb` column of a metadata table as [N, D] float16 (embed with --text to have it)."""
    if "text_emb" not in table.column_names:
        raise ValueError("the shards hold no text embeddings: run `clip embed` with --text")
    col = table.column("text_emb").combine_chunks()
    # flatten() honours slice offsets (`.values` would not)
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
