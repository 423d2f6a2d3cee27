"""Pacing the demo on a shared machine: plan its length from idle-like timing, adapt threads, report the load.

A wall-clock-bounded run on a busy machine trains a fraction of the steps and scores far lower (issue 13: 511
steps instead of 2,212, four fifths of the accuracy gone). So the demo plans its number of steps from what THIS
machine does when idle, keeps that number whatever the load (it then finishes later and says so), and re-checks
its thread count while it trains: with PyTorch's OpenMP workers spin-waiting for cores that other processes
hold, one thread can be many times faster than two.

Everything here is a pure function of timings, or takes its clocks and probes as arguments, so the tests drive
it with a fake machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A one-thread step that takes this much more wall time than CPU time waited for a core.
WAIT_RATIO = 1.15
# The training loop's steps run slower than the calibration's bare steps (logging, the schedule, allocation):
# the 2026-11-28 README run planned 2,018 steps and reached 1,902 in its budget, 12% slower; timing with the
# median of five repetitions (not the minimum of three) closes part of that gap.
DEFAULT_LOOP_RATIO = 1.08


@dataclass(frozen=True)
class StepTiming:
    """One thread count's calibration: median wall and process-CPU seconds of a training step (data excluded)."""

    threads: int
    wall_s: float
    cpu_s: float


@dataclass(frozen=True)
class Calibration:
    """What the demo measured before training. `competing`: other runnable tasks seen during calibration
    (mean of /proc/loadavg samples; None where unknown)."""

    timings: tuple[StepTiming, ...]
    data_wall_s: float
    data_cpu_s: float
    competing: float | None
    cpu_count: int


@dataclass(frozen=True)
class Plan:
    """The run's length and threads. `step_s`: idle-like seconds per loop step the plan assumes; `source`:
    where that figure came from ("measured" idle now, "remembered" from an earlier idle run here, or "cpu-time"
    of a one-thread step); `busy`: why calibration looked contended, or None."""

    steps: int
    run_threads: int
    plan_threads: int
    step_s: float
    source: str
    busy: str | None

    @property
    def steps_per_s(self) -> float:
        return 1.0 / self.step_s


def time_choices(
    step: Callable[[], object],
    data: Callable[[], object],
    choices: Sequence[int],
    set_threads: Callable[[int], None],
    reps: int = 5,
    wall: Callable[[], float] = time.perf_counter,
    cpu: Callable[[], float] = time.process_time,
) -> tuple[tuple[StepTiming, ...], float, float]:
    """(per-thread-count timings, data wall seconds, data CPU seconds): medians of `reps` steps after a warm-up.

    One thread is timed first. A count whose warm-up step takes over 4x, or whose step takes over 2x, the best
    median so far is cut short (its slowest evidence is its timing): on a busy machine two spin-waiting threads
    can take seconds a step, and calibration must not spend half a minute proving it.
    """

    def measure(fn: Callable[[], object]) -> tuple[float, float]:
        w0, c0 = wall(), cpu()
        fn()
        return wall() - w0, cpu() - c0

    timings: list[StepTiming] = []
    for threads in sorted(choices):
        set_threads(threads)
        warm = measure(step)  # the first step pays one-off allocation costs
        best = min((t.wall_s for t in timings), default=math.inf)
        runs = [warm] if warm[0] > 4 * best else []
        while not runs or (len(runs) < reps and runs[-1][0] <= 2 * best):
            runs.append(measure(step))
        timings.append(
            StepTiming(threads, statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
        )
    set_threads(1)
    data_runs = [measure(data) for _ in range(max(1, reps // 2))]
    ordered = tuple(sorted(timings, key=lambda t: -t.threads))
    return ordered, statistics.median(w for w, _ in data_runs), statistics.median(c for _, c in data_runs)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's share), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_choices(cpu_count: int | None) -> tuple[int, ...]:
    """All cores and one thread (largest first); just (1,) on a one-core machine."""
    return tuple(sorted({max(1, cpu_count or 1), 1}, reverse=True))


def runnable_others(
    samples: int = 8, interval: float = 0.03, read: Callable[[], str] | None = None
) -> float | None:
    """Mean number of other runnable tasks, from the R field of /proc/loadavg (`R/T`, which counts the reader);
    None where the file does not exist (not Linux)."""
    read = read or (lambda: Path("/proc/loadavg").read_text())
    counts = []
    for _ in range(samples):
        time.sleep(interval)
        try:
            counts.append(int(read().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            return None
    return statistics.fmean(counts)


def contention(cal: Calibration) -> str | None:
    """Why the calibration looks contended (one sentence), or None when the machine looked idle."""
    one = next(t for t in cal.timings if t.threads == 1)
    ratio = one.wall_s / max(one.cpu_s, 1e-9)
    if ratio > WAIT_RATIO:
        return f"a one-thread step took {ratio:.1f}x its CPU time, so it waited for a core"
    if cal.competing is not None and cal.competing >= max(0.5, cal.cpu_count / 4):
        return f"{cal.competing:.1f} other tasks were runnable on {cal.cpu_count} cores"
    return None


def plan_steps(
    cal: Calibration,
    budget_s: float,
    remembered: dict[int, float] | None = None,
    loop_ratio: float = DEFAULT_LOOP_RATIO,
    min_steps: int = 10,
) -> Plan:
    """Steps that fill `budget_s` on this machine idle, and the thread count that is fastest now.

    Idle, the measured times are the plan. Busy, measured times only bound the idle ones from above, so the
    plan takes the fastest of: what was measured, a one-thread step's CPU time (its wall time on a free core),
    and `remembered` idle seconds per step (data included) by thread count, from an earlier idle run on this
    machine. Every figure is a bare calibration step; `loop_ratio` turns it into a training-loop step.
    """
    busy = contention(cal)
    now = {t.threads: t.wall_s + cal.data_wall_s for t in cal.timings}
    run_threads = min(now, key=lambda t: (now[t], t))
    idle, source = dict(now), "measured"
    if busy is not None:
        one = next(t for t in cal.timings if t.threads == 1)
        idle[1] = min(idle[1], one.cpu_s + cal.data_cpu_s)
        source = "cpu-time"
        known = {t: s for t, s in (remembered or {}).items() if t in idle}
        if known and min(known.values()) < min(idle.values()):
            source = "remembered"
        for t, s in known.items():
            idle[t] = min(idle[t], s)
    plan_threads = min(idle, key=lambda t: (idle[t], t))
    step_s = idle[plan_threads] * loop_ratio
    return Plan(max(min_steps, int(budget_s / step_s)), run_threads, plan_threads, step_s, source, busy)


def idle_step_seconds(cal: Calibration) -> dict[int, float]:
    """Bare seconds per step (data included) by thread count: what `remember` stores after an idle calibration."""
    return {t.threads: t.wall_s + cal.data_wall_s for t in cal.timings}


# --------------------------------------------------------------------------------------------- remembering


def timing_key(parts: dict[str, Any]) -> str:
    """A cache key for what sets a step's cost: the machine, torch, the model, the batch and the augmentation."""
    import platform

    import torch

    blob = json.dumps({"machine": platform.machine(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
                       "torch": torch.__version__, **parts}, sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def default_timing_cache() -> Path:
    """`$XDG_CACHE_HOME/clipforge/demo-timing.json` (default `~/.cache/clipforge/demo-timing.json`)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "clipforge" / "demo-timing.json"


def read_remembered(path: Path, key: str) -> tuple[dict[int, float] | None, float | None]:
    """(idle seconds per loop step by thread count, loop ratio) remembered for `key`; (None, None) if none.
    A damaged cache file counts as empty: it is only an optimisation."""
    try:
        entry = json.loads(path.read_text()).get(key) or {}
        steps = {int(t): float(s) for t, s in entry.get("idle_step_s", {}).items() if float(s) > 0}
        ratio = entry.get("loop_ratio")
        return steps or None, float(ratio) if ratio else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None, None


def remember(
    path: Path, key: str, idle_step_s: dict[int, float] | None = None, loop_ratio: float | None = None
) -> None:
    """Store idle timings for `key` (other keys and fields kept); a cache that cannot be written is skipped."""
    from clip.io import atomic_write_json

    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    entry = dict(cache.get(key) or {})
    if idle_step_s:
        entry["idle_step_s"] = {str(t): round(s, 5) for t, s in idle_step_s.items()}
    if loop_ratio:
        entry["loop_ratio"] = round(loop_ratio, 4)
    entry["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    cache[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cache)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------ during the run


class ThreadGovernor:
    """An `on_step` hook (call it with every step's record, right after the step) that keeps the fastest thread
    count while training. Records need "step" and "samples_per_s".

    Steady, it judges windows of `window` steps by their median samples/s. It starts a trial when a window falls
    below `drop` x the best one since the count was chosen, or, while not on `preferred` (this machine's
    idle-fastest count), every `recheck_every` steps once the other processes' load looks gone (the interval
    doubles after each re-check that changes nothing). A trial runs each other count for up to `trial_window`
    steps, stopping at the first step under half the current rate (two spin-waiting threads can be 25x slower
    than one: a bad trial must cost one step, not ten), and keeps the fastest; a rival must win by `margin`.
    `expected`: the samples/s the calibration measured at `start` (None: no calibration, so the other counts are
    tried once after the first window). `events` records every trial and its outcome (trigger "start", "drop"
    or "recheck"); `loads` the 1-minute load average sampled once per window.
    """

    def __init__(
        self,
        choices: Sequence[int],
        start: int,
        preferred: int | None = None,
        set_threads: Callable[[int], None] | None = None,
        load_probe: Callable[[], tuple[float, float, float] | None] | None = None,
        window: int = 10,
        trial_window: int = 5,
        drop: float = 0.7,
        margin: float = 1.05,
        recheck_every: int = 300,
        expected: float | None = None,
    ) -> None:
        import torch

        self.choices = tuple(choices)
        self.current = start
        self.preferred = start if preferred is None else preferred
        self._set = set_threads or torch.set_num_threads
        self._loadavg = load_probe or loadavg
        self.window, self.trial_window, self.drop, self.margin = window, trial_window, drop, margin
        self.recheck_every = self._interval = recheck_every
        self.events: list[dict[str, Any]] = []
        self.loads: list[tuple[int, float]] = []
        self.thread_steps: Counter[int] = Counter()
        self._rates: list[float] = []
        # Best window median at the current count since it was chosen; seeded with the calibration's rate so a
        # run that is slow from its first step is caught too.
        self._best: float | None = expected
        self._checked_start = expected is not None
        self._trial: list[tuple[int, float]] | None = None  # (threads, median): the count before, then rivals
        self._trial_rates: list[float] = []
        self._pending: list[int] = []  # rivals still to try in this trial
        self._why, self._trigger = "", ""
        self._low = 0  # consecutive steps far below the best window
        self._last_check = 0

    def __call__(self, record: dict[str, Any]) -> None:
        self.thread_steps[self.current] += 1
        step, rate = int(record["step"]), float(record["samples_per_s"])
        if self._trial is not None:
            self._trial_step(step, rate)
            return
        self._rates.append(rate)
        # Two spin-waiting threads on taken cores can be 25x slower: two such steps in a row start a trial at
        # once instead of a whole slow window later.
        self._low = self._low + 1 if self._best is not None and rate < 0.25 * self._best else 0
        if self._low >= 2 and len(self.choices) > 1:
            self._start_trial(rate, "drop", f"throughput fell to {rate:.0f} samples/s from {self._best:.0f}")
            return
        if len(self._rates) < self.window:
            return
        median = statistics.median(self._rates)
        self._rates.clear()
        load = self._loadavg()
        if load is not None:
            self.loads.append((step, round(load[0], 2)))
        if len(self.choices) < 2:
            return
        if not self._checked_start:  # no calibration: compare the other count(s) once, after the first window
            self._checked_start = True
            self._start_trial(median, "start", "first check of the thread count, as no calibration ran")
        elif self._best is not None and median < self.drop * self._best:
            self._start_trial(
                median, "drop", f"throughput fell to {median:.0f} samples/s from {self._best:.0f}"
            )
        elif (
            self.current != self.preferred and step - self._last_check >= self._interval and self._quiet(load)
        ):
            gone = (
                "load average unknown"
                if load is None
                else f"load average {load[0]:.1f}, the other load looks gone"
            )
            self._start_trial(median, "recheck", f"re-check ({gone}; {self.preferred} thread(s) is this machine's "
                                                 "idle-fastest count)")  # fmt: skip
        else:
            self._best = median if self._best is None else max(self._best, median)

    def _quiet(self, load: tuple[float, float, float] | None) -> bool:
        """Whether other processes' load looks gone (unknown load: assume it may be)."""
        return load is None or load[0] - self.current < 0.5

    def _start_trial(self, median: float, trigger: str, why: str) -> None:
        self._trial = [(self.current, median)]
        self._pending = [c for c in self.choices if c != self.current]
        self._why, self._trigger = why, trigger
        self._switch(self._pending.pop(0))

    def _trial_step(self, step: int, rate: float) -> None:
        self._trial_rates.append(rate)
        before_rate = self._trial[0][1] if self._trial else rate
        if rate >= 0.5 * before_rate and len(self._trial_rates) < self.trial_window:
            return
        self._trial.append((self.current, statistics.median(self._trial_rates)))  # type: ignore[union-attr]
        self._trial_rates = []
        if self._pending:
            self._switch(self._pending.pop(0))
            return
        trial, self._trial = self._trial or [], None
        before, before_rate = trial[0]
        best_t, best_rate = max(trial[1:], key=lambda tr: tr[1])
        if best_rate <= before_rate * self.margin:
            best_t, best_rate = before, before_rate
        self.events.append({"step": step, "from": before, "to": best_t, "trigger": self._trigger,
                            "reason": self._why,
                            "samples_per_s": ", ".join(f"{t} thread(s) {r:.0f}" for t, r in trial)})  # fmt: skip
        if best_t != self.current:
            self._switch(best_t)
        self._last_check = step
        self._interval = self.recheck_every if best_t != before else self._interval * 2
        self._best = best_rate

    def _switch(self, threads: int) -> None:
        self._set(threads)
        self.current = threads
        self._rates.clear()
        self._low = 0

    def switches(self) -> list[dict[str, Any]]:
        """The trials that changed the thread count."""
        return [e for e in self.events if e["from"] != e["to"]]

    def saw_drop(self) -> bool:
        """Whether throughput ever fell enough to start a trial (a sign the machine got busy)."""
        return any(e["trigger"] == "drop" for e in self.events)


def loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def load_summary(
    before: tuple | None, during: Sequence[tuple[int, float]], after: tuple | None
) -> dict[str, Any]:
    """1-minute load averages before, during (min / mean / max of the samples) and after training."""
    values = [v for _, v in during]
    return {
        "before": round(before[0], 2) if before else None,
        "during": {"min": min(values), "mean": round(statistics.fmean(values), 2), "max": max(values)}
        if values
        else None,
        "after": round(after[0], 2) if after else None,
    }


_SOURCES = {
    "measured": "measured now, on an idle-looking machine, with {t} thread(s)",
    "remembered": "what this machine did idle with {t} thread(s) in an earlier run (remembered in {cache})",
    "cpu-time": "a one-thread step's CPU time, which is its wall time on a free core; no idle run of this "
    "machine is remembered, so a faster idle thread count could not be measured and the plan is conservative",
}


def pace_verdict(
    *,
    plan: Plan | None,
    planned_steps: int,
    steps_done: int,
    loop_s: float,
    elapsed_s: float,
    budget_s: float,
    strict: bool,
    stopped_early: bool,
    loads: dict[str, Any],
    events: Sequence[dict[str, Any]],
    thread_steps: dict[int, int],
    cpu_count: int,
    cache: str | None = None,
) -> dict[str, Any]:
    """What the run did about the machine's load, as numbers and as sentences for the terminal and report.md.

    loop_s: the training loop's seconds; elapsed_s: command start to the end of evaluation; budget_s: the
    whole run's wall-clock budget (`--minutes`).
    """
    achieved = steps_done / loop_s if loop_s > 0 else 0.0
    planned = plan.steps_per_s if plan else None
    planned_loop = planned_steps / planned if planned else None
    own = max(thread_steps, key=thread_steps.get) if thread_steps else 1
    evidence = _busy_evidence(plan, loads, own, events, achieved, planned, cpu_count)
    busy = bool(evidence)
    lines = [("**The machine was busy**: " if busy else "The machine was not busy: ")
             + _load_text(loads, own, cpu_count) + ".", *evidence]  # fmt: skip
    if plan is not None:
        src = _SOURCES[plan.source].format(t=plan.plan_threads, cache=cache or "the timing cache")
        lines.append(
            f"Planned {planned_steps:,} steps at {planned:.2f} steps/s ({src}); achieved {achieved:.2f} steps/s."
        )
    else:
        lines.append(f"Fixed length: {planned_steps:,} steps (`--steps`); achieved {achieved:.2f} steps/s.")
    if stopped_early:
        lines.append(
            f"With `--strict-time` it stopped at the budget after {steps_done:,} of {planned_steps:,} planned steps: "
            "the scores are lower than this machine gives idle (a shorter run of the same schedule learns less)."
        )
    elif plan is not None and busy:
        lines.append(_kept_steps_line(plan, planned_steps, loop_s, elapsed_s, budget_s))
    elif plan is not None and elapsed_s > budget_s:
        lines.append(
            f"It took {elapsed_s:.0f} s against the {budget_s:.0f} s budget on a machine that stayed idle: the plan "
            f"expected {planned_loop:.0f} s of training and it took {loop_s:.0f} s (it remembers this machine's "
            "loop speed, so the next plan here fits, unless `--timing-cache none`)."
        )
    for e in events:
        did = (
            f"went from {e['from']} to {e['to']} thread(s)"
            if e["from"] != e["to"]
            else f"stayed on {e['from']}"
        )
        lines.append(f"Threads: at step {e['step']} {did} ({e['reason']}; samples/s: {e['samples_per_s']}).")
    return {
        "busy": busy,
        "planned_steps": planned_steps,
        "steps": steps_done,
        "planned_steps_per_s": round(planned, 3) if planned else None,
        "achieved_steps_per_s": round(achieved, 3),
        "planned_train_seconds": round(planned_loop, 1) if planned_loop else None,
        "train_loop_seconds": round(loop_s, 1),
        "plan_source": plan.source if plan else None,
        "calibration_busy": plan.busy if plan else None,
        "strict_time": strict,
        "load": loads,
        "threads_used": {str(t): n for t, n in sorted(thread_steps.items())},
        "thread_trials": list(events),
        "lines": lines,
    }


def _kept_steps_line(plan: Plan, planned_steps: int, loop_s: float, elapsed_s: float, budget_s: float) -> str:
    """What a busy run that kept its planned steps did, and what its scores therefore are."""
    scores = (
        "so the scores are what this machine gives idle"
        if plan.source != "cpu-time"  # the conservative plan has fewer steps than an idle run's
        else "fewer than an idle run of this machine plans (the plan is conservative), so the scores are "
        "those of a shorter run"
    )
    return (
        f"It kept the {planned_steps:,} planned steps, {scores}, and took {loop_s:.0f} s to train instead of the "
        f"{planned_steps / plan.steps_per_s:.0f} s planned ({elapsed_s:.0f} s in all against the {budget_s:.0f} s "
        "budget). Why: a run cut at the budget on a busy machine trains a fraction of the steps and scores far "
        "lower; `--strict-time` stops at the budget instead."
    )


def _busy_evidence(
    plan: Plan | None,
    loads: dict[str, Any],
    own: int,
    events: Sequence[dict[str, Any]],
    achieved: float,
    planned: float | None,
    cpu_count: int,
) -> list[str]:
    """The sentences that show the machine was busy (none: it was not)."""
    during = loads.get("during")
    # The load average counts this run's own runnable threads; what is left is other processes.
    others = during["mean"] - own if during else None
    evidence = [
        f"Before training, {plan.busy}." if plan is not None and plan.busy else "",
        f"During training, other processes added about {others:.1f} to the load average ({cpu_count} cores)."
        if others is not None and others >= 0.75
        else "",
        "Throughput fell during training (see the thread trials below)."
        if _fell(events, achieved, planned)
        else "",
        f"Training ran at {achieved / planned:.0%} of the planned speed."
        if planned is not None and achieved < 0.8 * planned
        else "",
    ]
    return [e for e in evidence if e]


def _fell(events: Sequence[dict[str, Any]], achieved: float, planned: float | None) -> bool:
    """A throughput drop that mattered: it moved the thread count, or the run fell short of its planned speed.
    Windows of 10 steps scatter by +-20% on an idle VM; a trial that kept the count in a run that met its plan
    (the 2026-12-01 README run: five such trials, 5.23 of 5.24 planned steps/s) is not a busy machine."""
    drops = [e for e in events if e["trigger"] == "drop"]
    if not drops:
        return False
    moved = any(e["from"] != e["to"] for e in drops)
    return moved or planned is None or achieved < 0.95 * planned


def _load_text(loads: dict[str, Any], own: int, cpu_count: int) -> str:
    during = loads.get("during")
    middle = (
        f"{during['min']:.1f}-{during['max']:.1f} during (mean {during['mean']:.1f}, this run's own {own} "
        "thread(s) included)"
        if during
        else "not sampled during"
    )
    return f"load average (1 min) {_fmt(loads.get('before'))} before, {middle}, {_fmt(loads.get('after'))} after, on {cpu_count} cores"


def _fmt(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.1f}"
