"""Training checkpoints: atomic step files, `latest.pt`, pruning, resume lookup and RNG state.

A checkpoint is a plain dict that `torch.load(weights_only=True)` reads (containers, tensors, numbers,
strings): "config" (`CLIPConfig.to_dict()`) and "state_dict" (the bare CLIP module, no "module." or
"_orig_mod." prefix) are what `clip.load` needs; the rest ("optimizer", "scaler", "scheduler", "step",
"epoch", "data_position", "rng", "args", "loss_state", "skipped", ...) is what `--resume` needs.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip.io import atomic_torch_save

FORMAT = "clipforge-train-checkpoint"
VERSION = 1
STEP_FILE = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_path(output_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(output_dir) / f"step_{step:06d}.pt"


def step_files(output_dir: str | os.PathLike) -> list[Path]:
    """Step checkpoints in `output_dir`, oldest first."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def _point_latest(target: Path) -> None:
    """Make `latest.pt` (beside `target`) refer to it, atomically: a relative symlink renamed into place, or a
    copy where the file system has no symlinks."""
    latest = target.parent / "latest.pt"
    tmp = target.parent / f".latest.pt.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target.name, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    os.replace(tmp, latest)


def save_checkpoint(state: dict[str, Any], output_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """Write `step_NNNNNN.pt` atomically, point `latest.pt` at it, keep the newest `keep` step files.

    Only files up to `step` are pruned: later-numbered ones belong to an earlier run in the same folder (this
    run replaces them when it gets there), and pruning them would delete this run's own newest files.
    """
    path = step_path(output_dir, step)
    atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)
    _point_latest(path)
    mine = [p for p in step_files(output_dir) if int(STEP_FILE.match(p.name).group(1)) <= step]
    for old in mine[:-keep]:
        old.unlink(missing_ok=True)
    return path


def resolve_resume(spec: str, output_dir: str | os.PathLike) -> Path:
    """ "latest" -> OUT/checkpoints/latest.pt (which must exist); anything else is a path."""
    path = checkpoint_dir(output_dir) / "latest.pt" if spec == "latest" else Path(spec)
    if not path.exists():
        hint = (
            " (no checkpoint was written there yet; drop --resume to start fresh)" if spec == "latest" else ""
        )
        raise FileNotFoundError(f"checkpoint to resume from not found: {str(path)!r}{hint}")
    return path.resolve()


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint on the CPU with `weights_only=True`; check that it is one."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a training checkpoint written by `clip train` (no resumable state)")
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{path} has checkpoint version {ckpt['version']}; this code reads up to {VERSION}")
    return ckpt


def rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), NumPy legacy and Python RNG states as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },  # fmt: skip
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
