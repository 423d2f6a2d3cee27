"""Exact top-k search over float16 unit vectors with deterministic order.

Scores are cosine similarities (vectors and queries are unit length).  The scan runs in chunks of rows, so
memory beyond the stored vectors is bounded (a [Q, chunk] score block), with a float16 matrix product (half
the memory traffic of float32).  Those fast scores carry rounding error below `APPROX_TOL`; they only pick candidates.  The final
scores are recomputed in float64 from the stored float16 values, where identical vectors get bit-identical
scores, and results are ordered by (score descending, row ascending).  Rows are sorted by path, so ties are
ordered by path and every result list is reproducible, whatever the chunking or thread count.

All candidates within the tolerance of the k-th score are kept (a second pass collects them when a chunk holds
more than its share), so duplicates that tie at the cut-off are resolved by path too, not by the kernel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Bound on |fast score - float64 score| for unit vectors: float16 query rounding (<= 2^-12) plus
# float16 output rounding (<= 2^-12), with float32 accumulation.  Doubled for safety.
APPROX_TOL = 1e-3
SCORE_BLOCK_ELEMENTS = 1 << 23  # 32 MiB of float32 scores per chunk
MAX_CHUNK_ROWS = 1 << 20


def _chunk_rows(n_queries: int) -> int:
    # Few, large chunks: each float16 product call has a fixed cost (~1 ms on a 2-core CPU), so chunks of 16k
    # rows made a 10^6-row scan 7x slower than chunks of 1M.  Scores bound the chunk for many queries.
    return max(4096, min(MAX_CHUNK_ROWS, SCORE_BLOCK_ELEMENTS // max(1, n_queries)))


def fast_scores(queries: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """queries float32 [Q, D], block float16 [C, D] -> approximate scores float32 [Q, C].

    Always the float16 product (accumulated in float32 by PyTorch's CPU kernels): it reads half the bytes of
    float32, and converting float16 blocks to float32 first measured slower at every batch size up to 64.
    """
    return F.linear(queries.to(torch.float16), block).float()


def exact_scores(vectors: torch.Tensor, query: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    """float64 scores of `vectors[rows]` (float16 [N, D]) against one query float32 [D]."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.float64)
    picked = vectors.index_select(0, torch.from_numpy(rows)).double()  # (fancy indexing is 1000x slower)
    return (picked @ query.double()).numpy()


def rank(
    vectors: torch.Tensor, query: torch.Tensor, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rescore candidate `rows` in float64; return the best k as (rows int64, scores float64), ties by row."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    scores = exact_scores(vectors, query, rows)
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def search_exact(vectors: torch.Tensor, queries: torch.Tensor, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k rows of float16 `vectors` [N, D] for each float32 unit query [Q, D].

    Returns one (rows int64 [min(k, N)], scores float64) pair per query, best first, ties by row.
    """
    n = vectors.shape[0]
    queries = queries.to(torch.float32)
    n_queries = queries.shape[0]
    if n == 0 or k <= 0:
        return [(np.zeros(0, np.int64), np.zeros(0, np.float64)) for _ in range(n_queries)]
    chunk = _chunk_rows(n_queries)
    keep = min(n, k + 16)  # per chunk; a few spare rows absorb rounding near the cut-off
    values, indices, starts = [], [], []
    for start in range(0, n, chunk):
        scores = fast_scores(queries, vectors[start : start + chunk])  # [Q, C]
        v, i = scores.topk(min(keep, scores.shape[1]), dim=1)
        values.append(v)
        indices.append(i + start)
        starts.append(start)
    all_values = torch.cat(values, dim=1)  # [Q, chunks * keep]
    all_indices = torch.cat(indices, dim=1)
    kth = all_values.topk(min(k, all_values.shape[1]), dim=1).values[:, -1]  # [Q]
    # Every row whose exact score reaches the exact k-th score has a fast score >= kth - 2 * tol.
    threshold = kth - 2 * APPROX_TOL
    results = []
    for q in range(n_queries):
        cand = [all_indices[q][all_values[q] >= threshold[q]].numpy()]
        for c, start in enumerate(starts):
            chunk_min = values[c][q, -1]
            size = min(chunk, n - start)
            if size > keep and chunk_min >= threshold[q]:
                # This chunk may hold more near-ties than it kept: collect them all (rare: many duplicates).
                s = fast_scores(queries[q : q + 1], vectors[start : start + size])[0]
                cand.append(torch.nonzero(s >= threshold[q]).flatten().numpy() + start)
        results.append(rank(vectors, queries[q], np.concatenate(cand), k))
    return results
