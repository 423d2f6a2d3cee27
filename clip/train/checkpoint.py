"""Training checkpoints: atomic step files, `latest.pt`, pruning, resume lookup and RNG state.

A checkpoint is a plain dict that `torch.load(weights_only=True)` reads (containers, tensors, numbers,
strings): "config" (`CLIPConfig.to_dict()`) and "state_dict" (the bare CLIP module, no "module." or
"_orig_mod." prefix) are what `clip.load` needs; the rest ("optimizer", "scaler", "scheduler", "step",
"epoch", "data_position", "rng", "args", "loss_state", "skipped", ...) is what `--resume` needs.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import warnings
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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); nothing partial was left behind."""


def save_checkpoint(state: dict[str, Any], output_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """Write `step_NNNNNN.pt` atomically, point `latest.pt` at it, keep the newest `keep` step files.

    Only files up to `step` are pruned: later-numbered ones belong to an earlier run in the same folder (this
    run replaces them when it gets there), and pruning them would delete this run's own newest files.
    A failed write raises `CheckpointWriteError` with one line saying what to do; the temporary file is gone,
    and `latest.pt` and every earlier step file are untouched.
    """
    path = step_path(output_dir, step)
    previous = _latest_target(output_dir)
    try:
        atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)
        _point_latest(path)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a failed write as a RuntimeError
        raise CheckpointWriteError(_write_failure(path, previous, err)) from err
    mine = [p for p in step_files(output_dir) if int(STEP_FILE.match(p.name).group(1)) <= step]
    for old in mine[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _latest_target(output_dir: str | os.PathLike) -> Path | None:
    latest = checkpoint_dir(output_dir) / "latest.pt"
    return latest.resolve() if latest.exists() else None


def _write_failure(path: Path, previous: Path | None, err: BaseException) -> str:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0][:160]
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    kept = (
        f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    )
    return (
        f"could not write checkpoint {path} ({reason}; {free}; is the disk full?): no partial file was left and "
        f"{kept}; free some space, then continue with --resume latest"
    )


def resolve_resume(spec: str, output_dir: str | os.PathLike) -> Path:
    """ "latest" -> OUT/checkpoints/latest.pt, or the newest step file when latest.pt is missing or dangling
    (a warning names it); anything else is a path that must exist."""
    if spec != "latest":
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint to resume from not found: {str(path)!r}")
        return path.resolve()
    latest = checkpoint_dir(output_dir) / "latest.pt"
    if latest.exists():
        return latest.resolve()
    steps = step_files(output_dir)
    if not steps:
        raise FileNotFoundError(
            f"checkpoint to resume from not found: {str(latest)!r} (no checkpoint was written there yet; "
            "drop --resume to start fresh)"
        )
    # The most recently written step file is the one latest.pt last named (an earlier run's later-numbered
    # files are older); the step number breaks ties.
    newest = max(steps, key=lambda p: (p.stat().st_mtime_ns, p.name))
    what = f"points to {os.readlink(latest)!r}, which is gone" if latest.is_symlink() else "is missing"
    warnings.warn(f"{latest} {what}; resuming from the newest step file, {newest.name}", stacklevel=2)
    return newest.resolve()


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint on the CPU with `weights_only=True`; check that it is one.

    Every way a file can fail (not ours, pickled objects, truncated, unreadable) is a ValueError of one line
    that says what the file is and what to do.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(_refused(path, str(err))) from None
    except IsADirectoryError:
        raise ValueError(
            f"--resume {str(path)!r} is a folder; give a checkpoint file (OUT/checkpoints/step_NNNNNN.pt) or "
            "--resume latest with --output-dir OUT"
        ) from None
    except OSError as err:
        raise ValueError(
            f"cannot read checkpoint {path}: {err.strerror or err}; check its permissions"
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({first}){_other_steps(path)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        kind = "a model's weights" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise ValueError(
            f"{path} is not a training checkpoint written by `clip train` (it holds {kind}, no optimizer or data "
            "position to resume); to start from its weights use --pretrained instead of --resume"
        )
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{path} has checkpoint version {ckpt['version']}; this code reads up to {VERSION}")
    return ckpt


def _refused(path: Path, message: str) -> str:
    """What a file torch's safe loader refused is, and what to do (instead of torch's advice to unpickle it)."""
    if "weights_only" not in message.lower() and "weights only" not in message.lower():
        return f"{path} is not a PyTorch checkpoint (or it is corrupt): {message.splitlines()[0][:120]}"
    found = re.search(r"GLOBAL ([\w.]+)", message)
    what = f"pickled Python objects ({found.group(1)})" if found else "pickled Python objects"
    return (
        f"{path} holds {what}, not only tensors and plain values, so it is not a checkpoint written by `clip "
        "train`; it was not loaded, since unpickling it could run code. Resume from a `clip train` run's "
        "OUT/checkpoints/*.pt, or fine-tune its weights with --pretrained if `clip.load` reads it"
    )


def _other_steps(path: Path) -> str:
    others = [p.name for p in sorted(path.parent.glob("step_*.pt")) if p.resolve() != path.resolve()]
    if not others:
        return ""
    return f"; resume from an earlier one instead, e.g. --resume {path.parent / others[-1]}"


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
