"""`clip filter`: clean a collection of image-text pairs the way LAION was built, from `clip embed`'s vectors.

A pair is dropped, for the first of these reasons that applies (in this order):

1. `empty_caption`: its caption is blank.
2. `low_similarity`: the cosine of its image and caption embeddings is below `min_similarity` (LAION-400M
   kept ViT-B/32 cosines >= 0.3, LAION-5B's English part >= 0.28).
3. `excluded`: its image's cosine with any `exclude` query (a text such as "a watermark") is >= `exclude_threshold`.
4. `not_kept`: `keep` queries were given and its image's cosine with every one is below `keep_threshold`.
5. `duplicate`: its image embedding has cosine >= `dedup_threshold` with an earlier pair that survived 1-4 (the
   first of each group of near-duplicates, in input order, is kept).

Every step is an exact computation on the stored float16 vectors (in float32); the near-duplicate pass compares
each candidate with every pair kept before it, in blocks (O(N x kept) work: fine for millions on a GPU,
where an approximate index would be the next step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

REASONS = ("kept", "empty_caption", "low_similarity", "excluded", "not_kept", "duplicate")
KEPT, EMPTY, LOW, EXCLUDED, NOT_KEPT, DUPLICATE = range(len(REASONS))


@dataclass(frozen=True)
class FilterConfig:
    """What `clip filter` drops; None switches a step off."""

    min_similarity: float | None = 0.28
    dedup_threshold: float | None = None
    exclude: tuple[str, ...] = ()
    exclude_threshold: float = 0.25
    keep: tuple[str, ...] = ()
    keep_threshold: float = 0.25

    def __post_init__(self) -> None:
        for name in ("min_similarity", "dedup_threshold", "exclude_threshold", "keep_threshold"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} is a cosine, between -1 and 1; got {value}")


def _unit(x: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    t = (
        x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float32)
    )  # a copy: shards are read-only
    return torch.nn.functional.normalize(t.to(device=device, dtype=torch.float32), dim=-1)


def pair_similarity(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Cosine of each image with its own caption: image [N, D], text [N, D] -> [N] float32."""
    if image.shape != text.shape:
        raise ValueError(f"image and text embeddings differ in shape: {image.shape} vs {text.shape}")
    return (_unit(image) * _unit(text)).sum(-1).numpy()


def query_similarity(image: np.ndarray, queries: np.ndarray, block: int = 65536) -> np.ndarray:
    """Cosine of every image with every query: image [N, D], queries [Q, D] -> [N, Q] float32."""
    q = _unit(queries)
    return np.concatenate(
        [(_unit(image[s : s + block]) @ q.T).numpy() for s in range(0, max(len(image), 1), block)]
    )


def near_duplicates(
    image: np.ndarray, candidates: np.ndarray, threshold: float, block: int = 2048,
    device: str | torch.device = "cpu",
) -> np.ndarray:  # fmt: skip
    """Greedy near-duplicate removal in input order: image [N, D], candidates [N] bool -> duplicate [N] bool.

    Walking the candidates in order, one is a duplicate when its cosine with any candidate kept before it is
    >= threshold; otherwise it is kept. Exact: each block is compared with all kept vectors, then within itself.
    """
    order = np.flatnonzero(candidates)
    dup = np.zeros(len(image), dtype=bool)
    kept: list[torch.Tensor] = []  # unit vectors of kept candidates, one tensor per block
    for s in range(0, len(order), block):
        idx = order[s : s + block]
        x = _unit(image[idx], device)  # [b, D]
        is_dup = torch.zeros(len(idx), dtype=torch.bool, device=x.device)
        for k in kept:
            is_dup |= (x @ k.T >= threshold).any(dim=1)
        within = (x @ x.T >= threshold).cpu().numpy()  # [b, b]
        flags = is_dup.cpu().numpy()
        for j in range(len(idx)):  # sequential inside the block: an earlier keeper shadows later ones
            if not flags[j]:
                flags[j + 1 :] |= within[j, j + 1 :]
        dup[idx] = flags
        kept.append(x[torch.from_numpy(~flags).to(x.device)])
    return dup


def decide(
    image: np.ndarray, text: np.ndarray | None, captions: list[str], cfg: FilterConfig,
    exclude_queries: np.ndarray | None = None, keep_queries: np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """Reasons [N] (indices into REASONS; 0 = kept) and the image-caption cosines [N] (None without text)."""
    n = len(image)
    reason = np.full(n, KEPT, dtype=np.int8)

    def drop(mask: np.ndarray, code: int) -> None:
        reason[(reason == KEPT) & mask] = code

    drop(np.array([not c.strip() for c in captions], dtype=bool), EMPTY)
    sim = None
    if cfg.min_similarity is not None:
        if text is None:
            raise ValueError("--min-similarity needs caption embeddings: run `clip embed` with --text")
        sim = pair_similarity(image, text)
        drop(sim < cfg.min_similarity, LOW)
    if cfg.exclude:
        drop(query_similarity(image, exclude_queries).max(axis=1) >= cfg.exclude_threshold, EXCLUDED)
    if cfg.keep:
        drop(query_similarity(image, keep_queries).max(axis=1) < cfg.keep_threshold, NOT_KEPT)
    if cfg.dedup_threshold is not None:
        drop(near_duplicates(image, reason == KEPT, cfg.dedup_threshold, device=device), DUPLICATE)
    return reason, sim


def counts(reason: np.ndarray) -> dict[str, int]:
    """{'total': N, 'kept': ..., 'empty_caption': ..., ...} from `decide`'s reasons."""
    out = {"total": int(len(reason))}
    out.update({name: int((reason == code).sum()) for code, name in enumerate(REASONS)})
    return out


def histogram(sim: np.ndarray, bins: int = 40) -> dict[str, list]:
    """Counts of image-caption cosines in `bins` equal bins over [-1, 1] (what the report's PNG draws)."""
    hist, edges = np.histogram(sim.astype(np.float64), bins=bins, range=(-1.0, 1.0))
    return {"edges": [round(float(e), 6) for e in edges], "counts": hist.astype(int).tolist()}


def plot_histogram(sim: np.ndarray, reason: np.ndarray, threshold: float | None, path: str) -> bool:
    """Write the similarity histogram (kept vs dropped) as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from clip.io import atomic_path

    lo, hi = float(min(sim.min(initial=0.0), 0.0)), float(max(sim.max(initial=0.5), 0.5))
    bins = np.linspace(lo, hi, 41)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([sim[reason == KEPT], sim[reason != KEPT]], bins=bins, stacked=True, label=["kept", "dropped"],
            color=["tab:green", "tab:gray"])  # fmt: skip
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("cosine(image, caption)")
    ax.set_ylabel("pairs")
    ax.set_title(f"{int((reason == KEPT).sum())} of {len(reason)} pairs kept")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True
