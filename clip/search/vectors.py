"""Vectors that stay on disk: float16 `.npy` shards memory-mapped as one [N, D] matrix, searched in chunks.

`clip embed` writes its embeddings as many `.npy` shards; an index built from them (`clip.search.embindex`)
reads them in place.  Nothing here loads all vectors: exact search streams chunks of at most `CHUNK_ROWS`
rows, and rescoring gathers only the candidate rows, so only the pages of those rows are read.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from clip.search.topk import search_exact

CHUNK_ROWS = 1 << 18  # 256k rows: 256 MiB of float16 at D = 512, copied once per chunk to a tensor


HAS_MADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_RANDOM")


def map_npy(path: Path, dim: int, advice: int | None) -> np.ndarray:
    """A read-only float16 [rows, dim] view of the `.npy` file `path`, memory-mapped with madvise `advice`."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{path}: unsupported .npy version {version}")
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(f)
        offset = f.tell()
        if dtype != np.float16 or len(shape) != 2 or shape[1] != dim or fortran:
            raise ValueError(f"{path}: expected float16 [rows, {dim}], found {dtype} {list(shape)}")
        if shape[0] == 0:
            return np.zeros((0, dim), np.float16)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if advice is not None:
        mm.madvise(advice)
    return np.frombuffer(mm, dtype=np.float16, count=shape[0] * dim, offset=offset).reshape(shape)


class ShardedVectors:
    """Row-concatenation of float16 [n_i, D] `.npy` files, memory-mapped (read-only).

    Global row r lives in file `searchsorted(offsets, r, "right") - 1` at row `r - offsets[file]`.
    """

    def __init__(self, paths: Sequence[str | Path], dim: int) -> None:
        self.paths = [Path(p) for p in paths]
        self.dim = int(dim)
        # Two maps per file: rescoring reads scattered rows, so readahead is turned off for it (the kernel
        # would otherwise read up to read_ahead_kb, 8 MiB on some machines, around every candidate row);
        # chunked scans read in order and keep it.
        self._maps = [map_npy(p, self.dim, mmap.MADV_RANDOM if HAS_MADVISE else None) for p in self.paths]
        self._scan_maps = [
            map_npy(p, self.dim, mmap.MADV_SEQUENTIAL if HAS_MADVISE else None) for p in self.paths
        ]
        sizes = np.array([len(m) for m in self._maps], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        return len(self) * self.dim * 2

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """float16 [len(rows), D] copy of the given global rows (any order; reads only their pages)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float16)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"row out of range [0, {len(self)})")
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for f in np.unique(which):
            where = np.flatnonzero(which == f)
            local = rows[where] - self.offsets[f]
            order = np.argsort(local, kind="stable")  # ascending reads: sequential within a file
            out[where[order]] = self._maps[int(f)][local[order]]
        return out

    def chunks(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(first global row, float16 [<= chunk_rows, D] in-memory copy) over all rows, in order."""
        pending: list[np.ndarray] = []
        start = held = 0
        for m in self._scan_maps:
            pos = 0
            while pos < len(m):
                take = min(len(m) - pos, chunk_rows - held)
                pending.append(m[pos : pos + take])
                pos += take
                held += take
                if held == chunk_rows:
                    yield start, np.concatenate(pending) if len(pending) > 1 else np.array(pending[0])
                    start += held
                    pending, held = [], 0
        if held:
            yield start, np.concatenate(pending) if len(pending) > 1 else np.array(pending[0])

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(sorted random rows [min(n, N)], their vectors as float32) for training quantisers."""
        rows = np.sort(np.random.default_rng(seed).choice(len(self), size=min(n, len(self)), replace=False))
        return rows, self.rows(rows).astype(np.float32)


def rescore(
    vectors: ShardedVectors, query: torch.Tensor, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of candidate `rows` for one unit query float32 [D], scored in float64; ties by row."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if len(rows) == 0:
        return rows, np.zeros(0, dtype=np.float64)
    scores = vectors.rows(rows).astype(np.float64) @ query.double().numpy()
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def search_exact_sharded(
    vectors: ShardedVectors, queries: torch.Tensor, k: int, chunk_rows: int = CHUNK_ROWS
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact top-k global rows for each unit query float32 [Q, D], chunk by chunk (memory: one chunk).

    Each chunk's exact top k (`search_exact`, ties by row) is merged and rescored, so the result equals a
    scan of the whole matrix: (rows int64, scores float64) per query, best first, ties by row.
    """
    queries = queries.to(torch.float32)
    found: list[list[np.ndarray]] = [[] for _ in range(queries.shape[0])]
    for start, block in vectors.chunks(chunk_rows):
        for q, (rows, _) in enumerate(search_exact(torch.from_numpy(block), queries, k)):
            found[q].append(rows + start)
    return [rescore(vectors, queries[q], np.concatenate(f) if f else f, k) for q, f in enumerate(found)]
