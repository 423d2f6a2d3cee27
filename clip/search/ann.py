"""Approximate nearest-neighbour search through FAISS (optional: `pip install faiss-cpu`).

An inverted-file index with 8-bit scalar quantisation (`IVF{nlist},SQ8`, inner product): k-means splits the
vectors into `nlist` cells, a query scans only the `nprobe` closest cells, and each vector costs D bytes.
FAISS only proposes candidates; `clip.search.index` rescores them exactly from the stored float16 vectors, so
scores and tie order are those of exact search, and the 8-bit codes cost recall only through the candidates.

`nprobe` is chosen at build time: the smallest power of two whose recall@10 against exact search reaches the
target on held-out queries, and that recall is reported (and printed by `clip index`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from clip.io import atomic_path
from clip.search.topk import rank, search_exact

TARGET_RECALL = 0.95
RECALL_K = 10
ADD_CHUNK = 65536
PARALLEL_MIN_QUERIES = 16
# Everyday photo subjects for tuning the approximate index on text queries.
TUNING_SUBJECTS = (
    "a dog", "a cat", "a car", "a beach", "mountains", "a city street at night", "a birthday party",
    "a person smiling", "food on a plate", "a flower", "a bird", "snow", "a boat", "a bicycle", "a building",
    "a forest", "a sunset", "a baby", "a group of people", "a document", "a screenshot", "a horse", "a bridge",
    "a river", "a kitchen", "a bedroom", "a concert", "a painting", "a map", "a cake", "a cup of coffee",
    "a computer", "a phone", "children playing", "a wedding", "an airplane", "a train", "a tree", "a bus",
    "a football match",
)  # fmt: skip


def require_faiss() -> ModuleType:
    """Import faiss, or explain how to install it."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "approximate search needs FAISS, which is not installed: pip install faiss-cpu "
            "(or pip install 'clipforge[search]'); exact search works without it"
        ) from err
    return faiss


def faiss_available() -> bool:
    try:
        require_faiss()
    except ImportError:
        return False
    return True


def candidates_for(k: int) -> int:
    """How many candidates to ask FAISS for, so that rescoring recovers the exact order of the top k."""
    return max(2 * k, k + 32)


def default_nlist(n: int) -> int:
    """About 4 sqrt(N) cells (at least 16 vectors each).

    Finer cells cut the share of vectors a query must scan: on 10^6 clustered 512-d vectors, recall@10 0.96
    needed 38% of 1,000 cells but 0.98 only 13% of 4,000 (k-means then costs minutes, once).
    """
    return int(min(65536, max(1, min(round(4 * math.sqrt(n)), n // 16))))


@dataclass(frozen=True)
class AnnInfo:
    """What was built, and how well it does: stored in the index's meta table."""

    file: str
    max_vec_id: int
    count: int
    nlist: int
    nprobe: int
    recall: float
    build_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


class AnnIndex:
    """A FAISS IVF index over unit vectors, labelled by vec_id."""

    def __init__(self, index: object, nprobe: int) -> None:
        self.index = index
        self.set_nprobe(nprobe)

    def set_nprobe(self, nprobe: int) -> None:
        self.nprobe = int(nprobe)
        self.index.nprobe = self.nprobe

    @classmethod
    def train(cls, vectors: np.ndarray, nlist: int, seed: int = 0) -> AnnIndex:
        """Train the coarse quantiser and scalar quantiser on a sample of float16 `vectors` [N, D]."""
        faiss = require_faiss()
        n, dim = vectors.shape
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.niter = 10  # enough rounds for search; the default 25 multiplies the build time by 2.5
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 8  # small indexes have fewer than FAISS's 39: no warning for them
        # 40 points per centre is FAISS's minimum for stable centres, and training cost grows with the sample.
        sample = np.random.default_rng(seed).choice(n, size=min(n, 40 * nlist), replace=False)
        index.train(np.ascontiguousarray(vectors[np.sort(sample)], dtype=np.float32))
        return cls(index, 1)

    def add(self, vectors: np.ndarray, vec_ids: np.ndarray) -> None:
        for start in range(0, len(vectors), ADD_CHUNK):
            block = np.ascontiguousarray(vectors[start : start + ADD_CHUNK], dtype=np.float32)
            self.index.add_with_ids(
                block, np.ascontiguousarray(vec_ids[start : start + ADD_CHUNK], dtype=np.int64)
            )

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """float32 [Q, D] -> vec_ids int64 [Q, k] (-1 where fewer than k were found)."""
        faiss = require_faiss()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(queries) >= PARALLEL_MIN_QUERIES:
            return self.index.search(queries, k)[1]
        # A few queries run on one thread.  FAISS's OpenMP workers spin after a parallel region and starve
        # PyTorch's threads (and the reverse) when the two alternate, as they do here (encode, search, rescore):
        # measured 0.8 ms per query single-threaded against 11-44 ms with two threads, at 10^5 vectors.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self.index.search(queries, k)[1]
        finally:
            faiss.omp_set_num_threads(threads)

    def save(self, path: str | Path) -> None:
        faiss = require_faiss()
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path: str | Path, nprobe: int) -> AnnIndex:
        faiss = require_faiss()
        return cls(faiss.read_index(str(path)), nprobe)

    @property
    def nbytes(self) -> int:
        """Approximate memory: the codes (D bytes per vector), ids, and the centroids."""
        idx = self.index
        return int(idx.ntotal * (idx.d + 8) + idx.nlist * idx.d * 4)


def probe_queries(vectors: np.ndarray, n: int, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    """Query-like vectors: stored vectors plus Gaussian noise of norm `noise` (cosine ~0.9), renormalised."""
    rng = np.random.default_rng(seed + 1)
    picked = vectors[np.sort(rng.choice(len(vectors), size=min(n, len(vectors)), replace=False))].astype(
        np.float32
    )
    jitter = rng.standard_normal(picked.shape).astype(np.float32)
    jitter *= noise / np.linalg.norm(jitter, axis=1, keepdims=True)
    q = picked + jitter
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def ann_topk(
    ann: AnnIndex,
    vectors: torch.Tensor,
    row_of: Callable[[np.ndarray], np.ndarray],
    queries: torch.Tensor,
    k: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k rows via FAISS candidates rescored exactly.  `row_of` maps vec_ids to rows (-1: not live)."""
    labels = ann.search(queries.numpy(), candidates_for(k))
    out = []
    for q in range(queries.shape[0]):
        rows = row_of(labels[q][labels[q] >= 0])
        out.append(rank(vectors, queries[q], rows[rows >= 0], k))
    return out


def row_lookup(vec_ids: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping vec_ids to their row in `vec_ids` (-1 for ids not there)."""
    table = np.full(int(vec_ids.max()) + 1 if len(vec_ids) else 0, -1, dtype=np.int64)
    table[vec_ids] = np.arange(len(vec_ids), dtype=np.int64)

    def row_of(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(len(ids), -1, dtype=np.int64)
        known = (ids >= 0) & (ids < len(table))
        out[known] = table[ids[known]]
        return out

    return row_of


def recall_at_k(
    ann: AnnIndex,
    vectors: torch.Tensor,
    row_of: Callable[[np.ndarray], np.ndarray],
    queries: torch.Tensor,
    truth: list[np.ndarray],
    k: int = RECALL_K,
) -> float:
    """Mean |ANN top-k ∩ exact top-k| / k over the queries."""
    found = ann_topk(ann, vectors, row_of, queries, k)
    hits = [len(np.intersect1d(f[0], t)) / max(1, len(t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))


def tune_nprobe(recall_for: Callable[[int], float], nlist: int, target: float) -> tuple[int, int]:
    """The smallest nprobe (to within 1/8 of it) with recall_for(nprobe) >= target: doubling, then bisection.

    Returns (nprobe, largest nprobe tried that missed the target, 0 if none).
    """
    lo, hi = 0, 1
    while recall_for(hi) < target and hi < nlist:
        lo, hi = hi, min(nlist, hi * 2)
    while hi - lo > max(1, hi // 8):
        mid = (lo + hi) // 2
        if recall_for(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi, lo


def build(
    vectors: np.ndarray,
    vec_ids: np.ndarray,
    *,
    nlist: int | None = None,
    target_recall: float = TARGET_RECALL,
    queries: np.ndarray | None = None,
    n_queries: int = 100,
    seed: int = 0,
) -> tuple[AnnIndex, dict]:
    """An IVF-SQ8 index over float16 unit `vectors` [N, D] labelled `vec_ids`, nprobe tuned for recall@10.

    queries: float32 [Q, D] unit vectors to measure recall on (default: `probe_queries`).
    Returns the index and {"nlist", "nprobe", "recall", "build_seconds", "count"}.
    """
    t0 = time.perf_counter()
    n = len(vectors)
    nlist = nlist or default_nlist(n)
    ann = AnnIndex.train(vectors, nlist, seed)
    ann.add(vectors, vec_ids)
    q = queries if queries is not None else probe_queries(vectors, n_queries, seed)
    q = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    mat = torch.from_numpy(vectors)
    truth = [rows for rows, _ in search_exact(mat, q, RECALL_K)]
    row_of = row_lookup(vec_ids)

    def recall_for(nprobe: int) -> float:
        ann.set_nprobe(nprobe)
        return recall_at_k(ann, mat, row_of, q, truth)

    nprobe, _ = tune_nprobe(recall_for, nlist, target_recall)
    recall = recall_for(nprobe)
    info = {
        "nlist": nlist,
        "nprobe": nprobe,
        "recall": recall,
        "count": n,
        "build_seconds": time.perf_counter() - t0,
    }
    return ann, info
