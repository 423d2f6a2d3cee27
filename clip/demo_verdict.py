"""What the demo did about its machine's load: the verdict in results.json, the terminal and report.md.

A pure function of the run's numbers (its plan, steps, seconds, load samples, thread trials and re-plans), so the
tests give it any machine they like.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

from clip.demo_pace import OTHERS_BUSY, Plan, Replan


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
    replans: Sequence[Replan] = (),
) -> dict[str, Any]:
    """What the run did about the machine's load, as numbers and as sentences for the terminal and report.md.

    loop_s: the training loop's seconds; elapsed_s: command start to the end of evaluation; budget_s: the
    whole run's wall-clock budget (`--minutes`); replans: the length changes `LengthKeeper` made.
    """
    achieved = steps_done / loop_s if loop_s > 0 else 0.0
    planned = plan.steps_per_s if plan else None
    # After a re-plan, the speed to meet is the one the last re-plan measured (and planned the rest at).
    expected = replans[-1].steps_per_s if replans else planned
    own = max(thread_steps, key=thread_steps.get) if thread_steps else 1
    evidence = _busy_evidence(plan, loads, own, events, achieved, expected, cpu_count)
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
    lines += [_replan_line(r) for r in replans]
    if stopped_early:
        lines.append(
            f"With `--strict-time` it stopped at the budget after {steps_done:,} of {planned_steps:,} planned steps: "
            "the scores are lower than this machine gives idle (a shorter run of the same schedule learns less)."
        )
    elif plan is not None and busy and not replans:
        lines.append(_kept_steps_line(plan, planned_steps, loop_s, elapsed_s, budget_s))
    elif plan is not None and elapsed_s > budget_s:
        lines.append(
            f"It took {elapsed_s:.0f} s against the {budget_s:.0f} s budget"
            f"{'' if busy else ' on a machine that stayed idle'}: the plan expected "
            f"{planned_steps / planned:.0f} s of training and it took {loop_s:.0f} s (it remembers this machine's "
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
        "planned_train_seconds": round(planned_steps / planned, 1) if planned else None,
        "replans": [dataclasses.asdict(r) for r in replans],
        "train_loop_seconds": round(loop_s, 1),
        "plan_source": plan.source if plan else None,
        "calibration_busy": plan.busy if plan else None,
        "strict_time": strict,
        "load": loads,
        "threads_used": {str(t): n for t, n in sorted(thread_steps.items())},
        "thread_trials": list(events),
        "lines": lines,
    }


def _replan_line(r: Replan) -> str:
    """One re-plan of an idle-looking run, with the speed that caused it."""
    how = "shortened" if r.new < r.old else "lengthened"
    return (
        f"At step {r.step:,} ({r.loop_s:.0f} s into training) the loop had run at {r.steps_per_s:.2f} steps/s "
        f"since the last check, so {r.old:,} steps would have taken {r.projected_s:.0f} s against the "
        f"{r.budget_s:.0f} s it had for training; the machine looked idle, so it {how} the run to {r.new:,} "
        "steps (the learning-rate schedule now ends there)."
    )


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
        if others is not None and others >= OTHERS_BUSY
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
