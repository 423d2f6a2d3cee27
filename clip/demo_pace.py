"""Pacing the demo on a shared machine: plan its length from idle-like timing, adapt threads, report the load.

A wall-clock-bounded run on a busy machine trains a fraction of the steps and scores far lower (issue 13: 511
steps instead of 2,212, four fifths of the accuracy gone). So the demo plans its number of steps from what THIS
machine does when idle, keeps that number whatever the load (it then finishes later and says so), and re-checks
its thread count while it trains: with PyTorch's OpenMP workers spin-waiting for cores that other processes
hold, one thread can be many times faster than two. While the machine looks idle it re-plans the length at the
loop's measured speed (`LengthKeeper`): on a VM the loop can run 20% off its calibration with an idle load.

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
# Other processes that add this much to the 1-minute load average (beyond this run's own threads) make it busy.
OTHERS_BUSY = 0.75
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
    if crowded(cal.competing, cal.cpu_count):
        return f"{cal.competing:.1f} other tasks were runnable on {cal.cpu_count} cores"
    return None


def crowded(competing: float | None, cpu_count: int) -> bool:
    """Whether `competing` other runnable tasks (None: unknown) make `cpu_count` cores busy."""
    return competing is not None and competing >= max(0.5, cpu_count / 4)


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

    def looks_busy(self, others: float = OTHERS_BUSY) -> bool:
        """Whether the machine looks busy now: a thread trial is under way, the latest trial was a throughput
        drop that moved the thread count (and no re-check has moved it back), or other processes add `others`
        to the last load sample. Running off the planned count alone is no sign: a conservative plan's count is
        a guess."""
        if self._trial is not None:
            return True
        last = self.events[-1] if self.events else None
        if last is not None and last["trigger"] == "drop" and last["from"] != last["to"]:
            return True
        return bool(self.loads) and self.loads[-1][1] - self.current >= others

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


# ------------------------------------------------------------------------------------ keeping to the budget


@dataclass(frozen=True)
class Replan:
    """One change of the run's length: at `step` (after `loop_s` seconds of training) the loop had run at
    `steps_per_s` since the last check, so `old` steps would have ended `projected_s` into training instead of
    at `budget_s`."""

    step: int
    loop_s: float
    old: int
    new: int
    steps_per_s: float
    projected_s: float
    budget_s: float


class LengthKeeper:
    """A `replan` hook for `clip.train.train` that ends an idle-looking run within its training budget.

    The plan's steps come from a few calibration steps, and on a VM the loop can then run 20% slower (or
    faster) for minutes with nothing else on the load average: the 2026-12-01 fresh-clone run planned 2,833
    steps at 5.42 steps/s, ran at 4.18 and took 685 s against 600. So at `checks` (fractions of the planned
    steps) it measures the loop's speed since the last check and, where the run would end more than
    `tolerance` = (under, over) fractions of `budget_s` before or after it, re-plans the remaining steps at that
    speed (at most `max_growth` x the plan). It leaves the length alone while `busy()` says the machine is
    busy: a busy run keeps its steps and says so. An early re-plan barely moves the cosine schedule: at 10% of
    a run, 20% fewer steps take its learning rate from 0.993 to 0.989 of the peak; late ones are small changes
    (the speed error left is what drifted since the last check).
    """

    def __init__(
        self,
        steps: int,
        budget_s: float,
        busy: Callable[[], bool],
        checks: Sequence[float] = (0.1, 0.25, 0.45, 0.65, 0.8),
        tolerance: tuple[float, float] = (0.03, 0.01),
        max_growth: float = 1.5,
        min_step: int = 20,
    ) -> None:
        self.planned, self.steps, self.budget_s = steps, steps, budget_s
        self._busy = busy
        # A speed needs some steps, and `busy` needs the load samples the governor takes every 10 steps.
        self._checks = sorted({max(min_step, round(f * steps)) for f in checks})
        self.tolerance, self.max_growth = tolerance, max_growth
        self._last = (0, 0.0)
        self.replans: list[Replan] = []
        self.skipped_busy = 0  # checks that would have re-planned but the machine looked busy

    def __call__(self, step: int, loop_s: float) -> int | None:
        if not self._checks or step < self._checks[0]:
            return None
        self._checks = [c for c in self._checks if c > step]
        (s0, t0), self._last = self._last, (step, loop_s)
        rate = (step - s0) / max(loop_s - t0, 1e-9)
        projected = loop_s + (self.steps - step) / rate
        under, over = self.tolerance
        if -under <= projected / self.budget_s - 1 <= over:
            return None
        if self._busy():  # asked only when a re-plan would follow: it may sample the machine (~0.25 s)
            self.skipped_busy += 1
            return None
        new = step + int(max(0.0, self.budget_s - loop_s) * rate)
        new = max(step + 1, min(new, int(self.planned * self.max_growth)))
        if new == self.steps:
            return None
        self.replans.append(
            Replan(
                step, round(loop_s, 1), self.steps, new, round(rate, 3), round(projected, 1), self.budget_s
            )
        )
        self.steps = new
        return new


def busy_now(
    governor: ThreadGovernor, cpu_count: int, probe: Callable[[], float | None] | None = None
) -> bool:
    """The length keeper's question: does the machine look busy at this moment? The governor's view (a trial,
    a drop that moved the thread count, the 1-minute load average) lags a process that started a minute ago,
    so the runnable tasks are counted now as well (`runnable_others`, ~0.25 s between two steps)."""
    return governor.looks_busy() or crowded((probe or runnable_others)(), cpu_count)
