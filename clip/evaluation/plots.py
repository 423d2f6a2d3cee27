"""Confusion-matrix picture (matplotlib, headless), written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from clip.io import atomic_path

MAX_PLOT_CLASSES = 100


def save_confusion_matrix_png(
    confusion: torch.Tensor,
    classnames: Sequence[str],
    path: str | os.PathLike,
    title: str = "Confusion matrix",
) -> None:
    """Row-normalised confusion matrix [C, C] (rows: true class, columns: predicted) as a PNG, C <= 100.

    Each row is divided by its class's sample count, so the diagonal shows per-class recall.
    """
    n = confusion.shape[0]
    if confusion.ndim != 2 or confusion.shape[1] != n or len(classnames) != n:
        raise ValueError(
            f"need a square confusion matrix and one name per class, got {tuple(confusion.shape)}"
        )
    if n > MAX_PLOT_CLASSES:
        raise ValueError(f"a confusion-matrix picture is limited to {MAX_PLOT_CLASSES} classes, got {n}")
    import matplotlib

    matplotlib.use("Agg")  # no display: never open a window
    import matplotlib.pyplot as plt

    support = confusion.sum(dim=1, keepdim=True).clamp(min=1).double()
    rates = (confusion.double() / support).numpy()
    size = min(4.0 + 0.16 * n, 20.0)
    font = max(3.0, min(9.0, 300.0 / max(n, 1)))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    try:
        im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(classnames, rotation=90, fontsize=font)
        ax.set_yticklabels(classnames, fontsize=font)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
