"""The demo's pacing logic on a fake machine: planning from idle-like timing, the thread governor, the
timing cache and the verdict text. No real timing anywhere: clocks, timings and load probes are injected."""

from __future__ import annotations

import json

import pytest

from clip import demo_pace as pace
from clip import demo_verdict as verdict
from clip.demo_pace import Calibration, StepTiming, ThreadGovernor


def _cal(two_wall, one_wall, one_cpu, two_cpu=None, competing=0.0, data=(0.02, 0.02)) -> Calibration:
    timings = (StepTiming(2, two_wall, two_cpu if two_cpu is not None else 2 * two_wall),
               StepTiming(1, one_wall, one_cpu))  # fmt: skip
    return Calibration(timings, data[0], data[1], competing, cpu_count=2)


IDLE = _cal(two_wall=0.18, one_wall=0.28, one_cpu=0.275)
# The same machine with two CPU-bound processes: two threads spin-wait (25x slower), one thread gets 2/3 of a core.
BUSY = _cal(two_wall=4.5, one_wall=0.42, one_cpu=0.28, two_cpu=1.0, competing=2.0, data=(0.03, 0.02))


def test_idle_plan_fills_the_budget_with_the_fastest_thread_count():
    plan = pace.plan_steps(IDLE, budget_s=500.0, loop_ratio=1.1)
    assert plan.busy is None and plan.source == "measured"
    assert plan.run_threads == plan.plan_threads == 2
    assert plan.step_s == pytest.approx((0.18 + 0.02) * 1.1)
    assert plan.steps == int(500 / ((0.18 + 0.02) * 1.1))


def test_busy_plan_without_memory_uses_one_thread_cpu_time_and_runs_on_one_thread():
    plan = pace.plan_steps(BUSY, budget_s=500.0, loop_ratio=1.0)
    assert plan.busy is not None and "waited for a core" in plan.busy
    assert plan.source == "cpu-time" and plan.run_threads == 1 and plan.plan_threads == 1
    # Planned as one thread on a free core (0.28 + 0.02 s), not as the 0.45 s steps it gets now.
    assert plan.steps == int(500 / 0.30)
    assert plan.steps > int(500 / (0.42 + 0.03))


def test_busy_plan_with_a_remembered_idle_timing_plans_the_idle_length():
    idle = pace.plan_steps(IDLE, budget_s=500.0)
    busy = pace.plan_steps(BUSY, budget_s=500.0, remembered=pace.idle_step_seconds(IDLE))
    assert busy.source == "remembered" and busy.plan_threads == 2
    assert busy.steps == idle.steps  # the same number of steps whatever the load: the same scores
    assert busy.run_threads == 1  # but it trains on what is fastest now


def test_remembered_timing_is_ignored_on_an_idle_machine():
    slower_memory = {2: 1.0, 1: 1.0}
    faster_memory = {2: 0.01, 1: 0.01}
    for memory in (slower_memory, faster_memory):
        assert pace.plan_steps(IDLE, 500.0, remembered=memory) == pace.plan_steps(IDLE, 500.0)


def test_contention_from_other_runnable_tasks_even_when_one_thread_has_its_core():
    one_hog = _cal(two_wall=0.9, one_wall=0.28, one_cpu=0.275, competing=1.0)
    assert "other tasks were runnable" in pace.contention(one_hog)
    assert pace.contention(IDLE) is None
    assert pace.contention(_cal(0.18, 0.28, 0.275, competing=None)) is None  # no /proc/loadavg: ratio only


def test_runnable_others_reads_the_R_field_minus_the_reader(monkeypatch):
    monkeypatch.setattr(pace.time, "sleep", lambda s: None)
    lines = iter(["1.0 1.0 1.0 3/200 99", "1.0 1.0 1.0 1/200 99"])
    assert pace.runnable_others(samples=2, read=lambda: next(lines)) == pytest.approx(1.0)
    assert pace.runnable_others(samples=2, read=lambda: "garbage") is None


class FakeMachine:
    """Steps whose wall and CPU cost depend on the thread count; a clock that only they advance."""

    def __init__(self, wall: dict[int, float], cpu: dict[int, float]) -> None:
        self.wall_s, self.cpu_s, self.threads, self.now, self.cpu_now = wall, cpu, 1, 0.0, 0.0
        self.calls: list[int] = []

    def set_threads(self, t: int) -> None:
        self.threads = t

    def step(self) -> None:
        self.calls.append(self.threads)
        self.now += self.wall_s[self.threads]
        self.cpu_now += self.cpu_s[self.threads]

    def data(self) -> None:
        self.now += 0.05
        self.cpu_now += 0.04


def test_time_choices_takes_medians_per_thread_count_with_injected_clocks():
    m = FakeMachine(wall={2: 0.2, 1: 0.3}, cpu={2: 0.4, 1: 0.29})
    timings, data_wall, data_cpu = pace.time_choices(
        m.step, m.data, (2, 1), m.set_threads, reps=5, wall=lambda: m.now, cpu=lambda: m.cpu_now
    )
    assert [t.threads for t in timings] == [2, 1]
    assert timings[0].wall_s == pytest.approx(0.2) and timings[0].cpu_s == pytest.approx(0.4)
    assert timings[1].wall_s == pytest.approx(0.3) and timings[1].cpu_s == pytest.approx(0.29)
    assert (data_wall, data_cpu) == (pytest.approx(0.05), pytest.approx(0.04))
    assert m.calls == [1] * 6 + [2] * 6  # one thread first; one warm-up step per thread count


def test_time_choices_cuts_a_count_short_when_it_is_far_slower():
    """Two spin-waiting threads on a busy machine: one step proves it, not six."""
    m = FakeMachine(wall={2: 4.5, 1: 0.4}, cpu={2: 1.0, 1: 0.28})
    timings, _, _ = pace.time_choices(
        m.step, m.data, (2, 1), m.set_threads, reps=5, wall=lambda: m.now, cpu=lambda: m.cpu_now
    )
    assert m.calls == [1] * 6 + [2]
    assert timings[0] == StepTiming(2, pytest.approx(4.5), pytest.approx(1.0))
    assert pace.plan_steps(Calibration(timings, 0.05, 0.04, 2.0, 2), 100.0).run_threads == 1


def test_thread_choices():
    assert pace.thread_choices(2) == (2, 1)
    assert pace.thread_choices(1) == (1,) and pace.thread_choices(None) == (1,)


# ------------------------------------------------------------------------------------------- the governor


class Load:
    """A machine whose speed per thread count changes over steps: idle, then two hogs, then idle again."""

    IDLE = {2: 800.0, 1: 500.0}
    BUSY = {2: 30.0, 1: 300.0}  # spin-waiting threads: two are 10x slower than one

    def __init__(self, busy_steps: range) -> None:
        self.busy_steps = busy_steps
        self.step = 0

    def rate(self, threads: int) -> float:
        return (self.BUSY if self.step in self.busy_steps else self.IDLE)[threads]

    def load(self) -> tuple[float, float, float]:
        return (4.0 if self.step in self.busy_steps else 1.0, 0.0, 0.0)


def _drive(gov: ThreadGovernor, load: Load, steps: int) -> list[int]:
    """Run `steps` steps; returns the thread count each step ran with."""
    used = []
    for s in range(1, steps + 1):
        load.step = s
        t = gov.current
        used.append(t)
        gov({"step": s, "samples_per_s": load.rate(t)})
    return used


def test_governor_moves_to_one_thread_when_busy_and_back_when_idle():
    load = Load(busy_steps=range(101, 601))
    calls = []
    gov = ThreadGovernor(
        (2, 1), start=2, set_threads=calls.append, load_probe=load.load, recheck_every=100, expected=780.0
    )
    used = _drive(gov, load, 1200)
    busy_two = sum(1 for s, t in enumerate(used, 1) if s in load.busy_steps and t == 2)
    # A 10x drop is acted on after two steps, and no re-check tries two threads while the load stays.
    assert busy_two <= 2, busy_two
    assert all(t == 1 for s, t in enumerate(used, 1) if 104 <= s <= 600)
    assert (
        used[-1] == 2 and sum(1 for t in used[700:] if t == 1) < 20
    )  # back on two threads once the load is gone
    moves = [(e["from"], e["to"]) for e in gov.switches()]
    assert moves == [(2, 1), (1, 2)]
    assert gov.saw_drop() and calls and calls[-1] == 2
    assert gov.thread_steps[1] + gov.thread_steps[2] == 1200
    assert gov.loads and gov.loads[0][0] == 10


def test_governor_stays_put_on_a_steady_machine():
    load = Load(busy_steps=range(0))
    calls = []
    gov = ThreadGovernor((2, 1), start=2, set_threads=calls.append, load_probe=load.load, expected=780.0)
    assert set(_drive(gov, load, 1000)) == {2}
    assert gov.events == [] and calls == []


def test_governor_without_calibration_compares_the_other_count_once():
    load = Load(busy_steps=range(0, 10_000))  # busy from the start, and started on two threads
    gov = ThreadGovernor((2, 1), start=2, set_threads=lambda t: None, load_probe=load.load)
    used = _drive(gov, load, 300)
    assert used[:10] == [2] * 10 and set(used[12:]) == {1}
    assert [(e["trigger"], e["from"], e["to"]) for e in gov.events] == [("start", 2, 1)]
    assert not gov.saw_drop()
    idle = ThreadGovernor((2, 1), start=2, set_threads=lambda t: None, load_probe=Load(range(0)).load)
    assert _drive(idle, Load(range(0)), 300).count(1) == 5  # one trial window on one thread, then back
    assert [(e["from"], e["to"]) for e in idle.events] == [(2, 2)]


def test_governor_catches_a_run_slow_from_its_first_step():
    load = Load(busy_steps=range(0, 10_000))
    gov = ThreadGovernor((2, 1), start=2, set_threads=lambda t: None, load_probe=load.load, expected=780.0)
    used = _drive(gov, load, 100)
    assert used[:2] == [2, 2] and set(used[3:]) == {1} and gov.saw_drop()


def test_governor_aborts_a_bad_trial_after_one_step():
    """Started on one thread on a busy machine whose idle-fastest count is two: a re-check of two threads
    while the hogs still run (load not yet gone, e.g. no load average) must cost one slow step."""
    load = Load(busy_steps=range(0, 10_000))
    gov = ThreadGovernor((2, 1), start=1, preferred=2, set_threads=lambda t: None, load_probe=lambda: None,
                         recheck_every=100, expected=300.0)  # fmt: skip
    used = _drive(gov, load, 1000)
    assert used.count(2) <= 4  # re-checks at ~100, 300, 700 (the interval doubles), one step each
    assert all(e["to"] == 1 for e in gov.events)


def test_governor_with_one_choice_never_switches():
    load = Load(busy_steps=range(50, 300))
    gov = ThreadGovernor((1,), start=1, set_threads=lambda t: pytest.fail("switched"), load_probe=load.load)
    assert set(_drive(gov, load, 400)) == {1}


# ---------------------------------------------------------------------------------------- cache and verdict


def test_timing_cache_round_trip_keeps_other_keys_and_survives_damage(tmp_path):
    path = tmp_path / "c" / "timing.json"
    assert pace.read_remembered(path, "k") == (None, None)
    pace.remember(path, "k", idle_step_s={2: 0.2, 1: 0.3})
    pace.remember(path, "other", idle_step_s={1: 9.0})
    pace.remember(path, "k", loop_ratio=1.2)
    assert pace.read_remembered(path, "k") == ({2: 0.2, 1: 0.3}, 1.2)
    assert set(json.loads(path.read_text())) == {"k", "other"}
    path.write_text("{not json")
    assert pace.read_remembered(path, "k") == (None, None)
    pace.remember(path, "k", idle_step_s={1: 0.5})  # a damaged cache is replaced, not fatal
    assert pace.read_remembered(path, "k") == ({1: 0.5}, None)


def test_timing_key_depends_on_what_sets_the_step_cost():
    a = pace.timing_key({"model": {"w": 128}, "batch": 128})
    assert a == pace.timing_key({"batch": 128, "model": {"w": 128}})
    assert a != pace.timing_key({"model": {"w": 128}, "batch": 64})


def _verdict(plan, **kw):
    args = dict(plan=plan, planned_steps=plan.steps if plan else 200, steps_done=plan.steps if plan else 200,
                loop_s=500.0, elapsed_s=560.0, budget_s=600.0, strict=False, stopped_early=False,
                loads={"before": 0.1, "during": {"min": 2.0, "mean": 2.0, "max": 2.1}, "after": 2.0},
                events=[], thread_steps={2: 200}, cpu_count=2)  # fmt: skip
    args.update(kw)
    return verdict.pace_verdict(**args)


def test_verdict_on_an_idle_run_says_not_busy():
    plan = pace.plan_steps(IDLE, 500.0)
    v = _verdict(plan, loop_s=plan.steps * plan.step_s)
    assert not v["busy"] and v["lines"][0].startswith("The machine was not busy")
    assert v["planned_steps_per_s"] == pytest.approx(v["achieved_steps_per_s"], rel=1e-3)
    assert not any("kept the" in line for line in v["lines"])


def test_verdict_on_a_busy_run_says_what_it_did_and_why():
    plan = pace.plan_steps(BUSY, 500.0, remembered=pace.idle_step_seconds(IDLE))
    loads = {"before": 2.1, "during": {"min": 2.9, "mean": 3.1, "max": 3.3}, "after": 3.0}
    v = _verdict(plan, loop_s=plan.steps * 0.45, elapsed_s=plan.steps * 0.45 + 60, loads=loads,
                 thread_steps={1: plan.steps})  # fmt: skip
    text = " ".join(v["lines"])
    assert v["busy"] and v["lines"][0].startswith("**The machine was busy**")
    assert "waited for a core" in text and "other processes added about 2.1 to the load" in text
    assert f"kept the {plan.steps:,} planned steps, so the scores are what this machine gives idle" in text
    assert "--strict-time" in text
    assert f"took {plan.steps * 0.45:.0f} s to train" in text and "remembered" in text
    assert v["achieved_steps_per_s"] < 0.8 * v["planned_steps_per_s"]
    assert v["load"] == loads and v["threads_used"] == {"1": plan.steps}


def test_verdict_on_a_busy_run_with_a_conservative_plan_does_not_promise_idle_scores():
    # Without a remembered idle run the plan comes from a one-thread step's CPU time: fewer steps than idle.
    plan = pace.plan_steps(BUSY, 500.0)
    assert plan.source == "cpu-time"
    v = _verdict(plan, loop_s=plan.steps * 0.45, elapsed_s=plan.steps * 0.45 + 60, thread_steps={1: plan.steps},
                 loads={"before": 2.1, "during": {"min": 2.9, "mean": 3.1, "max": 3.3}, "after": 3.0})  # fmt: skip
    text = " ".join(v["lines"])
    assert f"kept the {plan.steps:,} planned steps" in text and "conservative" in text
    assert "what this machine gives idle" not in text and "shorter run" in text


def test_verdict_under_strict_time_says_the_scores_are_lower():
    plan = pace.plan_steps(BUSY, 500.0)
    v = _verdict(plan, strict=True, stopped_early=True, steps_done=plan.steps // 2)
    text = " ".join(v["lines"])
    assert "stopped at the budget" in text and "lower" in text and "kept the" not in text
    assert v["strict_time"] and v["steps"] == plan.steps // 2


def test_verdict_lists_thread_trials():
    events = [{"step": 140, "from": 2, "to": 1, "trigger": "drop", "reason": "throughput fell",
               "samples_per_s": "2 thread(s) 30, 1 thread(s) 300"}]  # fmt: skip
    v = _verdict(None, events=events)
    assert v["busy"] and any("at step 140 went from 2 to 1" in line for line in v["lines"])
    assert any(line.startswith("Fixed length: 200 steps") for line in v["lines"])


def test_verdict_ignores_drop_trials_that_kept_the_threads_in_a_run_that_met_its_plan():
    plan = pace.plan_steps(IDLE, 500.0)
    stayed = [{"step": 595, "from": 2, "to": 2, "trigger": "drop", "reason": "throughput fell",
               "samples_per_s": "2 thread(s) 524, 1 thread(s) 383"}]  # fmt: skip
    on_plan = _verdict(plan, loop_s=plan.steps * plan.step_s, events=stayed)
    assert not on_plan["busy"] and on_plan["lines"][0].startswith("The machine was not busy")
    assert any("at step 595 stayed on 2" in line for line in on_plan["lines"])  # still reported
    slow = _verdict(plan, loop_s=plan.steps * plan.step_s * 1.1, events=stayed)
    assert slow["busy"] and any("Throughput fell" in line for line in slow["lines"])


def test_verdict_on_an_idle_run_that_overran_says_the_plan_was_optimistic():
    plan = pace.plan_steps(IDLE, 500.0)
    v = _verdict(plan, loop_s=plan.steps * plan.step_s * 1.1, elapsed_s=640.0)
    text = " ".join(v["lines"])
    assert not v["busy"] and "took 640 s against the 600 s budget on a machine that stayed idle" in text
    assert "kept the" not in text


# ------------------------------------------------------------------------------------ the length keeper


def _keep(keeper: pace.LengthKeeper, step_s) -> float:
    """Drive `keeper` as the loop does (step_s(step) seconds per step); the loop seconds at the run's end."""
    t, step = 0.0, 0
    while step < keeper.steps:
        step += 1
        t += step_s(step)
        keeper(step, t)
    return t


@pytest.mark.parametrize("speed", [0.65, 0.40])  # the loop 30% slower, then 20% faster, than the plan's 0.5 s
def test_keeper_ends_an_idle_run_within_its_budget_at_any_speed(speed):
    keeper = pace.LengthKeeper(1000, budget_s=500.0, busy=lambda: False)
    end = _keep(keeper, lambda step: speed)
    assert end == pytest.approx(500.0, rel=0.01)
    first = keeper.replans[0]
    assert first.step == 100 and first.old == 1000 and first.steps_per_s == pytest.approx(1 / speed, abs=1e-3)
    assert first.projected_s == pytest.approx(1000 * speed) and first.budget_s == 500.0
    assert len(keeper.replans) == 1  # the first re-plan was right, so the later checks leave it


def test_keeper_follows_a_speed_change_and_caps_growth():
    keeper = pace.LengthKeeper(1000, budget_s=500.0, busy=lambda: False)
    end = _keep(keeper, lambda step: 0.5 if step <= 300 else 0.6)  # slower from step 300 on
    # The check at 450 still saw some fast steps; the one at 650 corrects the rest.
    assert [r.step for r in keeper.replans] == [450, 650] and 495.0 <= end <= 500.0
    fast = pace.LengthKeeper(1000, budget_s=500.0, busy=lambda: False, max_growth=1.2)
    _keep(fast, lambda step: 0.1)
    assert fast.steps == 1200  # five times faster, but at most 1.2 x the plan


def test_keeper_leaves_a_run_on_plan_or_on_a_busy_machine_alone():
    on_plan = pace.LengthKeeper(1000, budget_s=500.0, busy=lambda: False)
    _keep(on_plan, lambda step: 0.5 * (1.02 if step % 2 else 0.98))  # +-2% scatter
    assert on_plan.replans == [] and on_plan.steps == 1000
    busy = pace.LengthKeeper(1000, budget_s=500.0, busy=lambda: True)
    assert _keep(busy, lambda step: 0.9) == pytest.approx(900.0)  # kept its steps, took longer
    assert busy.replans == [] and busy.skipped_busy == 5


def test_governor_says_when_the_machine_looks_busy():
    idle = Load(range(0))
    gov = ThreadGovernor((2, 1), start=2, set_threads=lambda t: None, load_probe=idle.load, expected=780.0)
    _drive(gov, idle, 20)
    assert not gov.looks_busy()
    gov.loads.append((30, 3.0))  # another process adds 1.0 to the load average
    assert gov.looks_busy()
    load = Load(busy_steps=range(21, 10_000))  # two spin-waiting threads turn 10x slower from step 21
    moved = ThreadGovernor(
        (2, 1), start=2, set_threads=lambda t: None, load_probe=lambda: None, expected=780.0
    )
    _drive(moved, load, 40)
    assert moved.switches() and moved.current == 1 and moved.looks_busy()  # a drop moved it: busy
    planned_off = ThreadGovernor(
        (2, 1), start=2, preferred=1, set_threads=lambda t: None, load_probe=idle.load
    )
    _drive(planned_off, idle, 20)
    assert not planned_off.looks_busy()  # off a conservative plan's guessed count, but nothing slowed


def test_busy_now_counts_runnable_tasks_the_load_average_has_not_caught_up_with():
    # The 2026-12-01 one-process busy run: a process started 30 s before the run left the 1-minute load average
    # below the threshold at the keeper's first check, which then called the machine idle.
    idle = Load(range(0))
    gov = ThreadGovernor((2, 1), start=1, preferred=1, set_threads=lambda t: None, load_probe=idle.load)
    _drive(gov, idle, 20)
    assert not gov.looks_busy()
    assert pace.busy_now(gov, 2, probe=lambda: 1.0)  # one other runnable task on 2 cores
    assert not pace.busy_now(gov, 2, probe=lambda: 0.1) and not pace.busy_now(gov, 2, probe=lambda: None)


def test_verdict_on_a_replanned_idle_run_says_what_it_changed():
    plan = pace.plan_steps(IDLE, 500.0)
    rate = plan.steps_per_s * 0.77
    r = pace.Replan(280, 280 / rate, plan.steps, int(500 * rate), round(rate, 3), plan.steps / rate, 500.0)
    v = _verdict(plan, steps_done=r.new, loop_s=r.new / rate, elapsed_s=560.0, replans=[r])
    text = " ".join(v["lines"])
    assert not v["busy"] and v["lines"][0].startswith("The machine was not busy")
    assert f"shortened the run to {r.new:,} steps" in text and "At step 280" in text
    assert "kept the" not in text and v["replans"][0]["new"] == r.new
    slow = _verdict(plan, steps_done=r.new, loop_s=r.new / rate * 1.3, replans=[r])
    assert slow["busy"]  # slower still than the re-plan's speed: that is a busy machine
