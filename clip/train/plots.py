"""`curves.png`: loss, learning rate and temperature over optimizer steps, drawn from metrics.jsonl."""

from __future__ import annotations

import math
import os
from typing import Any

from clip.io import atomic_path


def plotting_available() -> bool:
    """True when matplotlib can be imported (it comes with the `train`, `eval` and `demo` extras)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Three panels (loss, lr, logit scale = 1 / temperature) written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display in training jobs
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    panels = (
        ("loss", "training loss", False),
        ("lr", "learning rate", False),
        ("logit_scale", "logit scale (1 / temperature)", False),
    )
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        ys = [r.get(key, math.nan) for r in records]
        ax.plot(steps, ys, lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
    val = [(r["step"], r["val_image_to_text_R@1"]) for r in records if "val_image_to_text_R@1" in r]
    if val:
        twin = axes[0].twinx()
        twin.plot(*zip(*val), "o-", color="tab:green", ms=3, lw=1, label="val image->text R@1")
        twin.set_ylabel("val R@1")
        twin.legend(loc="upper right", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
