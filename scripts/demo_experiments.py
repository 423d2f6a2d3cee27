#!/usr/bin/env python3
"""The demo's load experiments (issue 13), for one person to run ALONE on the machine: nothing else may run.

    python3 scripts/demo_experiments.py                # (a) idle, then (b) busy: about 35-45 minutes
    python3 scripts/demo_experiments.py --only idle    # (a): the README's demo command, default settings
    python3 scripts/demo_experiments.py --only busy    # (b): the same beside two CPU-bound processes

(a) runs `clip demo` with its defaults; (b) first starts `--hogs` CPU-bound processes (`while True: pass`),
waits `--warmup-s` seconds so the load average shows them (a laptop that has been busy a while), runs the same
command, then kills exactly those processes. Each run writes to its own folder under `--root` and gets its own
fresh timing cache (`XDG_CACHE_HOME` inside that folder), as on a fresh clone; `--busy-cache from-idle` lets (b)
read the idle timing that (a) remembered instead (a machine where the demo once ran idle).

Prints one JSON line per run (cells, wall time, steps, threads, load averages before / during / after, what the
demo said about the load) and appends it to ROOT/experiments.jsonl, then a markdown row for
docs/demo-experiments.md. Arguments after `--` go to `clip demo` (e.g. `-- --seed 1`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOG = "while True: pass"


def default_clip() -> str:
    """The README's demo venv if it exists, else `clip` on PATH, else this Python's `-m clip`."""
    venv = REPO / ".venv-demo" / "bin" / "clip"
    if venv.is_file():
        return str(venv)
    return shutil.which("clip") or f"{shlex.quote(sys.executable)} -m clip"


class LoadSampler:
    """The 1-minute load average every `every` seconds on a background thread, between start() and stop()."""

    def __init__(self, every: float = 10.0) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(round(os.getloadavg()[0], 2))

    def start(self) -> LoadSampler:
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        s = self.samples
        return {"min": min(s), "mean": round(statistics.fmean(s), 2), "max": max(s)} if s else {}


def start_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for p in hogs:  # only the processes this script started, by their own handles
        p.kill()
    for p in hogs:
        p.wait()


def run_one(
    name: str, clip: str, root: Path, extra: list[str], hogs: int, warmup_s: float, cache: Path
) -> dict:
    out = root / name
    if out.exists():
        raise SystemExit(f"{out} exists: pass another --root (each run needs a fresh folder)")
    out.mkdir(parents=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    cmd = [*shlex.split(clip), "demo", "--output-dir", str(out / "demo-out"), *extra]
    procs: list[subprocess.Popen] = []
    try:
        if hogs:
            procs = start_hogs(hogs)
            print(f"[{name}] {hogs} CPU-bound process(es) started (pids {[p.pid for p in procs]}); waiting "
                  f"{warmup_s:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(warmup_s)
        load_before = round(os.getloadavg()[0], 2)
        print(f"[{name}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
        sampler = LoadSampler().start()
        t0 = time.monotonic()
        with open(out / "output.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # tee: the terminal and output.log
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                log.write(chunk)
            rc = proc.wait()
        wall = time.monotonic() - t0
        during = sampler.stop()
        load_after = round(os.getloadavg()[0], 2)
    finally:
        stop_hogs(procs)
    line = summarise(
        name, rc, wall, hogs, out, {"before": load_before, "during": during, "after": load_after}
    )
    return {**line, "competing_pids": [p.pid for p in procs]}


def summarise(name: str, rc: int, wall: float, hogs: int, out: Path, load: dict) -> dict:
    """The JSON line of one run, from the demo's results.json (or the exit code when it failed)."""
    line = {"run": name, "competing_processes": hogs, "exit_code": rc, "wall_seconds": round(wall, 1),
            "load_sampled_by_script": load, "output_dir": str(out / "demo-out")}  # fmt: skip
    path = out / "demo-out" / "results.json"
    if rc != 0 or not path.is_file():
        return {**line, "error": f"clip demo exited {rc}; see {out / 'output.log'}"}
    r = json.loads(path.read_text())
    pace = r.get("pace", {})
    line.update(
        cells={k: {"top1": v["top1"], "top5": v["top5"]} for k, v in r["cells"].items()},
        steps=r["steps"], planned_steps=r["planned_steps"], stopped_early=r["stopped_early"],
        batch_size=r["batch_size"], demo_wall_seconds=r.get("wall_seconds"),
        threads_used=pace.get("threads_used"), busy=pace.get("busy"), plan_source=pace.get("plan_source"),
        planned_steps_per_s=pace.get("planned_steps_per_s"), achieved_steps_per_s=pace.get("achieved_steps_per_s"),
        load_seen_by_demo=pace.get("load"), demo_said=pace.get("lines"),
        retrieval={k: v for k, v in (r.get("retrieval") or {}).get("metrics", {}).items() if k.startswith("recall")},
    )  # fmt: skip
    return line


def markdown_row(line: dict) -> str:
    if "cells" not in line:
        return f"| {line['run']} | failed: {line.get('error')} |"
    # The table's column order, not the dict's: results.json is written with sorted keys (both, concept, style).
    cells = " | ".join(f"{100 * line['cells'][k]['top1']:.1f} / {100 * line['cells'][k]['top5']:.1f}"
                       for k in ("style", "concept", "both"))  # fmt: skip
    load = line["load_sampled_by_script"]
    during = load["during"].get("mean", "?") if load["during"] else "?"
    threads = ", ".join(f"{n} on {t}" for t, n in (line["threads_used"] or {}).items())
    return (f"| {line['run']} ({line['competing_processes']} competing) | {line['steps']:,} of "
            f"{line['planned_steps']:,} x {line['batch_size']} | {threads} | {line['wall_seconds']:.0f} s | "
            f"{load['before']} / {during} / {load['after']} | {cells} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("idle", "busy"), help="run only (a) idle or (b) busy")
    p.add_argument("--root", type=Path, default=REPO / "demo-experiments" / time.strftime("%Y%m%d-%H%M%S"))
    p.add_argument("--hogs", type=int, default=2, help="competing CPU-bound processes in (b) (default 2)")
    p.add_argument("--warmup-s", type=float, default=60.0, help="seconds the hogs run before (b) starts (60)")
    p.add_argument("--busy-cache", choices=("fresh", "from-idle"), default="fresh",
                   help="(b)'s timing cache: its own fresh one (a first run on a busy laptop), or the one (a) wrote")  # fmt: skip
    p.add_argument("--clip", default=default_clip(), help="the clip command (default: .venv-demo/bin/clip)")
    args = p.parse_args(argv)
    if args.busy_cache == "from-idle" and args.only == "busy":
        p.error("--busy-cache from-idle needs the idle run: drop --only busy")
    args.root.mkdir(parents=True, exist_ok=True)
    runs = [r for r in ("idle", "busy") if args.only in (None, r)]
    lines = []
    for name in runs:
        hogs = args.hogs if name == "busy" else 0
        cache_from = "idle" if name == "busy" and args.busy_cache == "from-idle" else name
        line = run_one(
            name, args.clip, args.root, extra, hogs, args.warmup_s, args.root / cache_from / "cache"
        )
        lines.append(line)
        print(json.dumps(line, sort_keys=True), flush=True)
        with open(args.root / "experiments.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
    print("\n| run | steps (of planned) x batch | steps on threads | wall | load before / during / after | "
          "style | concept | both |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for line in lines:
        print(markdown_row(line))
    return 0 if all("cells" in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
