"""The demo's example grid: held-out images with the model's top-3 captions."""

from __future__ import annotations

import os

import numpy as np
import torch

from clip.data.emoji import EmojiData
from clip.io import atomic_path
from clip.model import CLIP


def examples_grid(
    model: CLIP, data: EmojiData, path: str | os.PathLike, per_cell: int = 4, seed: int = 0
) -> None:
    """PNG grid: `per_cell` random images from each zero-shot cell, titled with their top-3 captions.

    Each title is the true caption, then the top 3; green: right first, orange: right at rank 2-3, red: missed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clip.demo import CELL_TITLES, cell_logits

    kinds = [k for k in CELL_TITLES if len(data.cell(k).indices)]
    fig, axes = plt.subplots(len(kinds), per_cell, figsize=(3.3 * per_cell, 3.4 * len(kinds)), squeeze=False)
    rng = np.random.default_rng(seed)
    for row, kind in enumerate(kinds):
        cell = data.cell(kind)
        logits, labels = cell_logits(model, data, kind)
        picks = rng.choice(len(labels), size=min(per_cell, len(labels)), replace=False)
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col >= len(picks):
                continue
            i = int(picks[col])
            top = torch.topk(logits[i], k=min(3, logits.shape[1])).indices.tolist()
            rank = top.index(int(labels[i])) if int(labels[i]) in top else None
            colour = "green" if rank == 0 else "darkorange" if rank is not None else "red"
            ax.imshow(data.images[cell.indices[i]], interpolation="nearest")
            names = [cell.captions[j].removeprefix("an emoji of ") for j in top]
            truth = cell.captions[int(labels[i])].removeprefix("an emoji of ")
            lines = [f"true: {_short(truth)}", *(f"{n + 1}. {_short(t)}" for n, t in enumerate(names))]
            ax.set_title("\n".join(lines), fontsize=8, color=colour)
        axes[row][0].text(
            -0.15, 0.5, CELL_TITLES[kind], transform=axes[row][0].transAxes, rotation=90, ha="right", va="center",
            fontsize=9,
        )  # fmt: skip
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _short(text: str, n: int = 34) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
