"""FAISS IVF indexes over memory-mapped vectors, their codes chosen to fit a memory budget.

For 10^7-10^8 vectors the float16 vectors stay on disk (`clip.search.vectors`); only the IVF index lives in
memory: per vector its code and its 8-byte id, plus the centroids.  The code is the best that fits the budget,
in this order: 8-bit scalar quantisation (D bytes), 4-bit (D/2 bytes), then product quantisation with
D/4, D/8, ... one-byte sub-quantisers (`choose_codes`).  The coarse quantiser and the codes are trained on a
sample, vectors are added chunk by chunk, and, as for `clip.search.ann`, FAISS only proposes candidates that
are rescored exactly from the float16 vectors.  Coarser codes need more candidates: the number rescored per
query (`candidates_factor` times `ann.candidates_for(k)`) is tuned together with nprobe, so that recall@10
against exact search reaches the target on held-out queries.

With many lists (`HNSW_MIN_LISTS` and up, i.e. from ~10^6 vectors) the coarse quantiser is an HNSW graph over the
centroids instead of a flat scan: assigning each added vector to its list then costs a graph walk instead of
`nlist` dot products, which at 10^7 vectors and 12,649 lists is most of the build time (k-means itself still
runs on a flat index: an approximate quantiser would blur the centroids).  The graph is searched with
`efSearch = max(HNSW_MIN_EF, 2 x nprobe)` so that it finds the nprobe nearest lists.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clip.io import atomic_path
from clip.search.ann import (
    RECALL_K,
    TARGET_RECALL,
    candidates_for,
    default_nlist,
    probe_queries,
    require_faiss,
    tune_nprobe,
)
from clip.search.vectors import CHUNK_ROWS, ShardedVectors, rescore, search_exact_sharded

MAX_TRAIN = 1 << 18  # training vectors: k-means cost grows with the sample, centres settle well before
PQ_TRAIN_MIN = 256 * 40  # 40 points per PQ centroid (256 per sub-quantiser)
CANDIDATE_FACTORS = (1, 4, 16)
PARALLEL_MIN_QUERIES = 16
HNSW_MIN_LISTS = 4096  # from here on an HNSW coarse quantiser (see the module docstring)
HNSW_NEIGHBOURS = 32
HNSW_MIN_EF = 64
# Adding looks up one list per vector: efSearch 32 finds the nearest centroid for 99.86% of vectors at half the
# cost of 64 (99.99%) on 12,649 lists of clustered 512-d vectors; a miss lands in a neighbouring list.
HNSW_ADD_EF = 32
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'16G' / '512M' / '1.5GiB' / '1000000' -> bytes (powers of 1024); ValueError naming the input."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"memory size {text!r} not understood; write e.g. 16G, 512M or a number of bytes")
    unit = m.group(2).upper()
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(float(m.group(1)) * 1024**power)


@dataclass(frozen=True)
class CodeSpec:
    """How each vector is stored in the IVF lists: `kind` "SQ8", "SQ4" or "PQ"; `m` sub-quantisers (PQ)."""

    kind: str
    code_bytes: int
    m: int = 0

    @property
    def name(self) -> str:
        return f"PQ{self.m}" if self.kind == "PQ" else self.kind


def code_options(dim: int) -> list[CodeSpec]:
    """Codes from the most to the least precise (and memory-hungry) for dimension `dim`."""
    options = [CodeSpec("SQ8", dim), CodeSpec("SQ4", (dim + 1) // 2)]
    m = dim // 4
    while m >= 4:
        if dim % m == 0:
            options.append(CodeSpec("PQ", m, m))
        m //= 2
    return options


def index_bytes(n: int, dim: int, nlist: int, code: CodeSpec) -> int:
    """Memory of an IVF index: codes and ids per vector, the centroids, the PQ codebooks."""
    codebooks = 256 * dim * 4 if code.kind == "PQ" else 2 * dim * 4
    return n * (code.code_bytes + 8) + nlist * dim * 4 + codebooks


def choose_codes(counts: list[int], dim: int, budget: int) -> CodeSpec:
    """The most precise code with which IVF indexes over `counts` vectors (images, captions) fit `budget`."""
    total = lambda code: sum(index_bytes(n, dim, default_nlist(n), code) for n in counts)  # noqa: E731
    for code in code_options(dim):
        if total(code) <= budget:
            return code
    smallest = code_options(dim)[-1]
    raise ValueError(
        f"{sum(counts):,} vectors of dimension {dim} do not fit --max-index-memory {format_bytes(budget)} "
        f"even as {smallest.name} ({format_bytes(total(smallest))}); raise --max-index-memory to at least "
        f"{format_bytes(total(smallest))}"
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


class IvfIndex:
    """A trained FAISS IVF index whose ids are global rows of a `ShardedVectors`."""

    def __init__(self, index: object, nprobe: int, candidates_factor: int = 1) -> None:
        self.index = index
        self.candidates_factor = int(candidates_factor)
        self.set_nprobe(nprobe)

    def set_nprobe(self, nprobe: int) -> None:
        faiss = require_faiss()
        self.nprobe = int(nprobe)
        ivf = faiss.extract_index_ivf(self.index)
        ivf.nprobe = self.nprobe
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):  # the graph must return at least nprobe lists
            quantizer.hnsw.efSearch = max(HNSW_MIN_EF, 2 * self.nprobe)

    def candidates(self, k: int) -> int:
        return self.candidates_factor * candidates_for(k)

    @classmethod
    def train(cls, vectors: ShardedVectors, code: CodeSpec, nlist: int, seed: int = 0) -> IvfIndex:
        faiss = require_faiss()
        dim = vectors.dim
        hnsw = nlist >= HNSW_MIN_LISTS
        coarse = f"IVF{nlist}_HNSW{HNSW_NEIGHBOURS}" if hnsw else f"IVF{nlist}"
        codes = f"PQ{code.m}x8" if code.kind == "PQ" else code.kind
        index = faiss.index_factory(dim, f"{coarse},{codes}", faiss.METRIC_INNER_PRODUCT)
        flat = faiss.IndexFlatIP(dim)  # k-means on exact distances; referenced here while training runs
        if hnsw:
            index.clustering_index = flat
        index.cp.niter = 10  # as clip.search.ann: enough rounds for search
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 8
        want = 40 * nlist if code.kind != "PQ" else max(40 * nlist, PQ_TRAIN_MIN)
        _, sample = vectors.sample(min(MAX_TRAIN, want), seed)
        index.train(sample)
        index.clustering_index = None  # only training needs it (and it would not be saved)
        del flat
        return cls(index, 1)

    def add(self, vectors: ShardedVectors, chunk_rows: int = CHUNK_ROWS) -> None:
        faiss = require_faiss()
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(self.index).quantizer)
        graph = quantizer.hnsw if isinstance(quantizer, faiss.IndexHNSW) else None
        search_ef = graph.efSearch if graph is not None else 0
        if graph is not None:
            graph.efSearch = HNSW_ADD_EF
        try:
            for start, block in vectors.chunks(chunk_rows):
                ids = np.arange(start, start + len(block), dtype=np.int64)
                self.index.add_with_ids(np.ascontiguousarray(block, dtype=np.float32), ids)
        finally:
            if graph is not None:
                graph.efSearch = search_ef

    def search(self, queries: np.ndarray, n: int) -> np.ndarray:
        """float32 [Q, D] -> candidate rows int64 [Q, n] (-1 where fewer were found)."""
        faiss = require_faiss()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(queries) >= PARALLEL_MIN_QUERIES:
            return self.index.search(queries, n)[1]
        threads = faiss.omp_get_max_threads()  # one thread for a few queries: see clip.search.ann
        faiss.omp_set_num_threads(1)
        try:
            return self.index.search(queries, n)[1]
        finally:
            faiss.omp_set_num_threads(threads)

    def topk(
        self, vectors: ShardedVectors, queries: torch.Tensor, k: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k rows per unit query float32 [Q, D]: FAISS candidates rescored exactly, ties by row."""
        labels = self.search(queries.numpy(), self.candidates(k))
        return [rescore(vectors, queries[q], labels[q][labels[q] >= 0], k) for q in range(queries.shape[0])]

    @property
    def nbytes(self) -> int:
        faiss = require_faiss()
        ivf = faiss.extract_index_ivf(self.index)
        graph = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
        links = ivf.nlist * 2 * HNSW_NEIGHBOURS * 4 if graph else 0  # level-0 neighbour ids, int32
        return int(ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4 + links)

    def save(self, path: str | Path) -> None:
        faiss = require_faiss()
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path: str | Path, nprobe: int, candidates_factor: int) -> IvfIndex:
        return cls(require_faiss().read_index(str(path)), nprobe, candidates_factor)


def recall(found: list[tuple[np.ndarray, np.ndarray]], truth: list[np.ndarray]) -> float:
    """Mean |found top-k ∩ true top-k| / k."""
    hits = [len(np.intersect1d(f[0], t)) / max(1, len(t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))


def build_ivf(
    vectors: ShardedVectors,
    code: CodeSpec,
    *,
    queries: np.ndarray | None = None,
    nlist: int | None = None,
    target_recall: float = TARGET_RECALL,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[IvfIndex, dict]:
    """Train, fill and tune an IVF index over `vectors`; returns it and its info (nprobe, recall@10, ...).

    queries: float32 [Q, D] unit vectors to tune on (default: 100 perturbed stored vectors). Ground truth
    is one exact chunked scan over all vectors.
    """
    t0 = time.perf_counter()
    n = len(vectors)
    nlist = nlist or default_nlist(n)
    log(f"training {code.name} IVF ({nlist} lists) on a sample of {min(n, MAX_TRAIN):,} vectors")
    ivf = IvfIndex.train(vectors, code, nlist, seed)
    log(f"adding {n:,} vectors")
    ivf.add(vectors)
    if queries is None:
        rows, sample = vectors.sample(100, seed + 1)
        queries = probe_queries(sample, len(rows), seed)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    log(f"exact top-{RECALL_K} of {len(q)} tuning queries")
    truth = [r for r, _ in search_exact_sharded(vectors, q, RECALL_K)]

    def recall_for(nprobe: int) -> float:
        ivf.set_nprobe(nprobe)
        return recall(ivf.topk(vectors, q, RECALL_K), truth)

    for factor in CANDIDATE_FACTORS:  # coarser codes: rescore more candidates
        ivf.candidates_factor = factor
        nprobe, _ = tune_nprobe(recall_for, nlist, target_recall)
        got = recall_for(nprobe)
        if got >= target_recall:
            break
    info = {
        "codes": code.name,
        "code_bytes": code.code_bytes,
        "nlist": nlist,
        "nprobe": nprobe,
        "candidates_factor": ivf.candidates_factor,
        "recall": round(got, 4),
        "count": n,
        "bytes": ivf.nbytes,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    return ivf, info
