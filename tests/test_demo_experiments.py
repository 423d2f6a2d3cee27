"""scripts/demo_experiments.py with a stand-in for `clip demo` (the real runs are the lead's, alone on the
machine): JSON lines, its own folder and timing cache per run, and the competing processes killed after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo_experiments.py"

FAKE_CLIP = r"""
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
assert args[0] == "demo", args
out = Path(args[args.index("--output-dir") + 1])
out.mkdir(parents=True)
cells = {k: {"top1": 0.2, "top5": 0.4} for k in ("style", "concept", "both")}
(out / "results.json").write_text(json.dumps({
    "cells": cells, "steps": 50, "planned_steps": 50, "stopped_early": False, "batch_size": 128,
    "wall_seconds": 1.0, "argv": args, "cache": os.environ["XDG_CACHE_HOME"],
    "pace": {"threads_used": {"1": 50}, "busy": False, "lines": ["The machine was not busy."]},
}))
print("fake demo done")
"""


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "fake_clip.py"
    fake.write_text(FAKE_CLIP)
    cmd = [sys.executable, str(SCRIPT), "--root", str(tmp_path / "root"), "--warmup-s", "0",
           "--clip", f"{sys.executable} {fake}", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_busy_only_starts_and_kills_its_competing_processes(tmp_path):
    r = _run(tmp_path, "--only", "busy", "--hogs", "1", "--", "--seed", "3")
    assert r.returncode == 0, r.stderr
    (line,) = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert line["run"] == "busy" and line["competing_processes"] == 1 and line["exit_code"] == 0
    assert line["cells"]["style"] == {"top1": 0.2, "top5": 0.4} and line["steps"] == 50
    assert set(line["load_sampled_by_script"]) == {"before", "during", "after"}
    (pid,) = line["competing_pids"]
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    results = json.loads((tmp_path / "root" / "busy" / "demo-out" / "results.json").read_text())
    assert results["argv"][-2:] == ["--seed", "3"]  # arguments after -- reach clip demo
    assert results["cache"] == str(tmp_path / "root" / "busy" / "cache")  # a fresh timing cache of its own
    assert "| busy (1 competing) | 50 of 50 x 128 |" in r.stdout
    saved = (tmp_path / "root" / "experiments.jsonl").read_text().splitlines()
    assert [json.loads(x)["run"] for x in saved] == ["busy"]


def test_both_runs_and_the_idle_cache_option(tmp_path):
    r = _run(tmp_path, "--hogs", "0", "--busy-cache", "from-idle")
    assert r.returncode == 0, r.stderr
    runs = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["run"] for x in runs] == ["idle", "busy"]
    busy = json.loads((tmp_path / "root" / "busy" / "demo-out" / "results.json").read_text())
    assert busy["cache"] == str(tmp_path / "root" / "idle" / "cache")
    again = _run(tmp_path, "--only", "idle")  # an existing run folder is never overwritten
    assert again.returncode != 0 and "exists" in again.stderr
    assert os.path.isfile(tmp_path / "root" / "idle" / "output.log")


def test_markdown_row_puts_cells_in_the_tables_order():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_experiments", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cell = lambda t: {"top1": t, "top5": t + 0.1}  # noqa: E731
    line = {
        "run": "busy",
        "competing_processes": 1,
        "steps": 10,
        "planned_steps": 10,
        "batch_size": 128,
        "threads_used": {"1": 10},
        "wall_seconds": 5.0,
        "load_sampled_by_script": {"before": 0.5, "during": {"mean": 1.9}, "after": 2.0},
        "cells": {"both": cell(0.15), "concept": cell(0.22), "style": cell(0.23)},
    }  # sorted, as in results.json
    assert module.markdown_row(line).endswith("| 23.0 / 33.0 | 22.0 / 32.0 | 15.0 / 25.0 |")
