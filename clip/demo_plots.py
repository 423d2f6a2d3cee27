"""The demo's pictures: held-out images with the model's top-3 captions, and captions with their top-5 images.

Drawing only: the scores come from `clip.demo_report` (this module imports it; it never imports this one).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np
import torch

from clip.data.emoji import EmojiData
from clip.demo_report import CELL_TITLES, CellScores, RetrievalExample
from clip.io import atomic_path


def _pyplot():  # noqa: ANN202 (matplotlib is optional: imported when a picture is drawn)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def examples_grid(
    scores: dict[str, CellScores], data: EmojiData, path: str | os.PathLike, per_cell: int = 4, seed: int = 0
) -> None:
    """PNG grid: `per_cell` random images from each scored cell, titled with their top-3 captions.

    Each title is the true caption, then the top 3; green: right first, orange: right at rank 2-3, red: missed.
    """
    plt = _pyplot()
    kinds = [k for k in CELL_TITLES if k in scores]
    fig, axes = plt.subplots(len(kinds), per_cell, figsize=(3.3 * per_cell, 3.4 * len(kinds)), squeeze=False)
    rng = np.random.default_rng(seed)
    for row, kind in enumerate(kinds):
        s = scores[kind]
        picks = rng.choice(len(s.labels), size=min(per_cell, len(s.labels)), replace=False)
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col >= len(picks):
                continue
            i = int(picks[col])
            top = torch.topk(s.logits[i], k=min(3, s.logits.shape[1])).indices.tolist()
            rank = top.index(int(s.labels[i])) if int(s.labels[i]) in top else None
            colour = "green" if rank == 0 else "darkorange" if rank is not None else "red"
            ax.imshow(data.images[s.cell.indices[i]], interpolation="nearest")
            names = [_name(s.cell.captions[j]) for j in top]
            truth = _name(s.cell.captions[int(s.labels[i])])
            lines = [f"true: {_short(truth)}", *(f"{n + 1}. {_short(t)}" for n, t in enumerate(names))]
            ax.set_title("\n".join(lines), fontsize=8, color=colour)
        axes[row][0].text(
            -0.15, 0.5, CELL_TITLES[kind], transform=axes[row][0].transAxes, rotation=90, ha="right", va="center",
            fontsize=9,
        )  # fmt: skip
    _save(plt, fig, path)


def retrieval_grid(examples: Sequence[RetrievalExample], data: EmojiData, path: str | os.PathLike) -> None:
    """PNG grid: one row per caption (left), its top-k images from the held-out pool, and (right, apart) the
    best-ranked true image with its rank. True images are framed green; each image is titled with its rank and
    style, wrong ones also with their concept's name."""
    plt = _pyplot()
    k = max(len(ex.rows) for ex in examples)
    fig, axes = plt.subplots(len(examples), k + 2, figsize=(2.0 * k + 5.4, 2.3 * len(examples)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6] + [1] * k + [1.1]})  # fmt: skip
    for row, ex in enumerate(examples):
        label = axes[row][0]
        label.axis("off")
        caption = "\n".join(textwrap.wrap(f"“{_name(ex.caption)}”", 24))
        label.text(1.0, 0.5, f"{caption}\n[{ex.category}]", ha="right", va="center", fontsize=9,
                   transform=label.transAxes)  # fmt: skip
        for col in range(k):
            if col >= len(ex.rows):
                axes[row][col + 1].axis("off")
                continue
            r, true = ex.rows[col], ex.true[col]
            name = "" if true else "\n" + _short(str(data.names[data.image_concept[r]]), 22)
            _tile(
                axes[row][col + 1],
                data,
                r,
                f"{col + 1}. {data.style_names[int(data.image_style[r])]}{name}",
                true,
            )
        r = ex.best_true_row
        _tile(axes[row][k + 1], data, r, f"true image: rank {ex.first_true_rank}\n"
              f"({data.style_names[int(data.image_style[r])]})", True, dashed=ex.first_true_rank > k)  # fmt: skip
    _save(plt, fig, path)


def _tile(ax, data: EmojiData, row: int, title: str, true: bool, dashed: bool = False) -> None:  # noqa: ANN001
    ax.set_xticks([])
    ax.set_yticks([])
    ax.imshow(data.images[row], interpolation="nearest")
    ax.set_title(title, fontsize=7, color="green" if true else "dimgray")
    for spine in ax.spines.values():
        spine.set_edgecolor("green" if true else "lightgray")
        spine.set_linewidth(4 if true else 1)
        spine.set_linestyle("--" if dashed else "-")


def _save(plt, fig, path: str | os.PathLike) -> None:  # noqa: ANN001
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _name(caption: str) -> str:
    return caption.removeprefix("an emoji of ")


def _short(text: str, n: int = 34) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
