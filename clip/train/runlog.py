"""Run outputs written by rank 0: `config.json`, `metrics.jsonl` (one line per optimizer step), an optional
TensorBoard log and the tqdm progress bar."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from clip.io import atomic_write_json, atomic_write_text

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CURVES_FILE = "curves.png"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (the process was killed mid-write) is ignored."""
    records = []
    if not Path(path).exists():
        return records
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep the lines up to `step` (the resumed checkpoint); later ones belong to the interrupted attempt."""
    if Path(path).exists():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


class RunLog:
    """Writes metrics lines (and TensorBoard scalars, and the progress bar) on the main rank; no-op elsewhere."""

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool, tensorboard: bool, progress: bool,
                 total_steps: int, start_step: int) -> None:  # fmt: skip
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from err
            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write_config(self, config: dict[str, Any]) -> None:
        if self.enabled:
            atomic_write_json(self.path.parent / CONFIG_FILE, config)

    def add(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)

    def set_total(self, total_steps: int) -> None:
        """A new run length (a re-planned run): the progress bar's end moves."""
        if self._bar is not None:
            self._bar.total = total_steps
            self._bar.refresh()

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
