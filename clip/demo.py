"""The main job: train a small CLIP on the bundled emoji art, then evaluate it zero-shot.

Training uses the training styles (Noto, Twemoji, OpenMoji) on the seen concepts, through the
project's ordinary model, tokenizer and training loop.  Three zero-shot cells are then scored:
  style   - the held-out Fluent 3D renders of seen concepts (classes: all seen concepts);
  concept - held-out concepts drawn in the training styles (classes: the held-out concepts);
  both    - held-out concepts in the held-out style.
Outputs in OUT: report.md, results.json, curves.png, examples.png, retrieval.png, checkpoints/latest.pt.

The run's length is planned from timed steps for what this machine does idle, re-planned at the loop's real
speed while the machine looks idle (so it ends within the budget), and kept when the machine gets busy (the run
then ends later and says why); `strict_time` cuts it at the budget instead (`clip.demo_pace`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clip import demo_pace as pace
from clip import demo_verdict as verdict
from clip.config import CLIPConfig, TextConfig, VisionConfig
from clip.data.emoji import EmojiData, load_emoji
from clip.data.emoji_train import EmojiPairs, concept_balanced_order, subset_concepts
from clip.demo_report import (
    category_breakdown,
    evaluate_cells,
    example_dict,
    report_markdown,
    results_table,
    retrieval,
    score_cells,
)
from clip.io import atomic_write_json, atomic_write_text
from clip.model import CLIP

# The demo architecture, chosen by the measurements recorded in docs/demo-experiments.md.
DEMO_MODEL = CLIPConfig(
    embed_dim=128,
    # Early convolutions instead of the 8x8 patch conv: held-out style 18.3 / 14.5 -> 22.9 / 22.8 (two seeds).
    # MLP ratio 2 instead of 4: a bare step 150 -> 120 ms, so the same budget runs ~20% more steps; at 2,900
    # steps against 2,400 (two seeds) style 31.6 / 30.7 -> 33.6 / 34.9, concepts 29.0 / 27.3 -> 29.4 / 29.8,
    # both 16.7 / 18.3 -> 15.6 / 17.1 (docs/demo-experiments.md, eighth session).
    vision=VisionConfig(
        kind="vit",
        image_size=32,
        width=128,
        layers=4,
        heads=2,
        patch_size=8,
        mlp_ratio=2.0,
        conv_stem=(32, 64, 128),
    ),
    # One text layer: held-out style 24.2 -> 30.1 / 27.8, both 14.0 -> 15.6 / 16.0 (two seeds) in the same time:
    # its steps are 25% cheaper and the nearly bag-of-words tower composes unseen names no worse.
    # 4 heads instead of 2, at the same cost: held-out concepts up in 5 of 6 seeds (none down), means 28.7 -> 29.55
    # at 2,900 steps (docs/demo-experiments.md, tenth session).
    text=TextConfig(context_length=32, vocab_size=49408, width=128, heads=4, layers=1),
    quick_gelu=False,
)


# The budget's share the training loop plans for (start-up and calibration are then subtracted); the rest covers
# the evaluation and report (about 3 s on the 2-core machine) and what the length keeper cannot correct after its
# last check at 80% of the run. Before the keeper, idle README runs ended up to 23% slower than planned (the loop
# ran slower than its calibration for whole runs), so the share was 0.88 and one run still took 685 s.
TRAIN_SHARE = 0.93
STRICT_SHARE = 0.97


@dataclass(frozen=True)
class DemoConfig:
    """The main job's knobs.  `minutes` is the whole run's budget (training + evaluation) on this machine idle:
    the number of steps is planned for it and kept on a busy machine, which then takes longer; `strict_time`
    stops at the budget instead (lower scores).  `steps` fixes the training length (tests).  `max_concepts`
    trains on a random slice.  `timing_cache`: where idle timings are remembered (None: the user cache folder,
    "": nowhere)."""

    output_dir: str = "demo-out"
    minutes: float = 10.0
    steps: int | None = None
    model: CLIPConfig = DEMO_MODEL
    batch_size: int = 128  # one image per concept per batch; 128 beat 64 and 256 (docs/demo-experiments.md)
    lr: float = 5e-4
    wd: float = 0.5  # stronger than CLIP's 0.1-0.2: the held-out style needs regularisation (docs/demo-experiments.md)
    # The loss's label smoothing, over two seeds at 2,400 steps (docs/demo-experiments.md): none 27.5 / 27.7,
    # 27.9 / 25.5, 12.8 / 13.6 (style, concept, both); 0.2 31.6 / 30.7, 29.0 / 27.3, 16.7 / 18.3 (0.1: in between).
    label_smoothing: float = 0.2
    warmup_fraction: float = 0.05
    crop_scale: tuple[float, float] = (0.7, 1.0)
    jitter: float = 0.3
    gray_blur: float = 0.5  # grey-scale + blur: doubled held-out-style top-1 (docs/demo-experiments.md)
    shade: float = 0.4  # a lighting ramp across the drawing: a little more on the held-out 3-D style
    openmoji: bool = True
    max_concepts: int | None = None
    seed: int = 0
    workers: int = 0
    progress: bool = True
    strict_time: bool = False
    timing_cache: str | None = None


def calibrate(
    model: CLIP, pairs: EmojiPairs, batch_size: int, choices: tuple[int, ...], label_smoothing: float = 0.0
) -> pace.Calibration:
    """Time real training steps (the run's loss: `label_smoothing` as in its `OptimConfig`) with each thread count
    in `choices`, and how busy the machine looks."""
    from clip.train.loss import clip_loss

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)  # as the run's (`_train_config`)
    positions = list(range(min(batch_size, len(pairs))))
    images, tokens = pairs.get_batch(
        positions, 10**6
    )  # an unused epoch; the loop also prepares whole batches

    def step() -> None:
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        clip_loss(img, txt, model.logit_scale.exp(), label_smoothing=label_smoothing).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    competing = pace.runnable_others()  # sampled while this process is idle, before it loads the cores
    timings, data_wall, data_cpu = pace.time_choices(
        step, lambda: pairs.get_batch(positions, 10**6 + 1), choices, torch.set_num_threads
    )
    return pace.Calibration(timings, data_wall, data_cpu, competing, pace.available_cpus())


@dataclass(frozen=True)
class Pacing:
    """A planned run's plan, with where its machine's idle timing is remembered (None: nowhere)."""

    plan: pace.Plan
    now_step_s: float  # seconds per step at plan.run_threads as measured now (data included)
    loop_ratio: float
    cache: Path | None
    key: str


def _plan(
    cfg: DemoConfig, model: CLIP, pairs: EmojiPairs, batch: int, budget_s: Callable[[], float]
) -> Pacing:
    """Calibrate, plan, and remember this machine's idle timing (or use a remembered one when it is busy).
    `budget_s()`: the seconds left for the training loop, asked after the calibration (which spends some)."""
    cache = None if cfg.timing_cache == "" else Path(cfg.timing_cache or pace.default_timing_cache())
    aug = [cfg.crop_scale, cfg.jitter, cfg.gray_blur, cfg.shade]
    key = pace.timing_key({"model": cfg.model.to_dict(), "batch": batch, "aug": aug, "workers": cfg.workers,
                           "optimizer": "adamw-fused", "data": "batched"})  # fmt: skip
    remembered, ratio = pace.read_remembered(cache, key) if cache else (None, None)
    ratio = ratio or pace.DEFAULT_LOOP_RATIO
    cal = calibrate(model, pairs, batch, pace.thread_choices(pace.available_cpus()), cfg.label_smoothing)
    plan = pace.plan_steps(cal, budget_s(), remembered, loop_ratio=ratio)
    if cache is not None and plan.busy is None:
        pace.remember(cache, key, idle_step_s=pace.idle_step_seconds(cal))
    return Pacing(plan, pace.idle_step_seconds(cal)[plan.run_threads], ratio, cache, key)


def _learn_loop_ratio(pacing: Pacing | None, verdict: dict[str, Any], stopped_early: bool) -> None:
    """After a run that stayed idle, remember how much slower the loop's steps were than the calibration's."""
    if pacing is None or pacing.cache is None or verdict["busy"] or stopped_early or pacing.plan.busy:
        return
    loop_step = verdict["train_loop_seconds"] / max(1, verdict["steps"])
    bare = pacing.plan.step_s / pacing.loop_ratio
    pace.remember(pacing.cache, pacing.key, loop_ratio=min(1.6, max(1.0, loop_step / bare)))


def _busy_message(cfg: DemoConfig, pacing: Pacing) -> str:
    plan = pacing.plan
    if cfg.strict_time:
        then = "stops at the budget (--strict-time), so expect lower scores"
    else:
        minutes = plan.steps * pacing.now_step_s * pacing.loop_ratio / 60
        then = (f"keeps them and will take longer than the budget (training alone: about {minutes:.0f} min at "
                "today's speed; --strict-time stops at the budget instead, with lower scores)")  # fmt: skip
    return (f"clip demo: the machine is busy ({plan.busy}). Planned {plan.steps:,} steps for what it does idle; "
            f"this run {then}. report.md will say what happened.")  # fmt: skip


def _train_data(cfg: DemoConfig) -> tuple[EmojiData, EmojiPairs]:
    data = load_emoji(openmoji=cfg.openmoji)
    if cfg.max_concepts is not None:
        rng = np.random.default_rng(cfg.seed)
        data = subset_concepts(data, np.sort(rng.choice(data.num_concepts, cfg.max_concepts, replace=False)))
    pairs = EmojiPairs(
        data,
        data.train_indices(),
        cfg.model.text.context_length,
        cfg.seed,
        cfg.crop_scale,
        cfg.jitter,
        cfg.gray_blur,
        cfg.shade,
    )
    return data, pairs


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)  # keeps a progress bar intact


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Train, evaluate, and write the report; returns what results.json holds. `say` gets the lines the user
    must see while it runs (a busy machine, a thread change). PyTorch's thread count is restored after."""
    threads = torch.get_num_threads()
    try:
        return _run_demo(cfg, say)
    finally:
        torch.set_num_threads(threads)


def _run_demo(cfg: DemoConfig, say: Callable[[str], None]) -> dict[str, Any]:
    from clip.train import train
    from clip.train.plots import plotting_available

    if not plotting_available():  # say so now, not after ten minutes of training
        raise ValueError(
            "clip demo draws curves.png and examples.png with matplotlib, which is not installed: "
            "pip install 'clipforge[demo]'"
        )
    t_start, cpu_start, load_before = time.monotonic(), time.process_time(), pace.loadavg()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    data, pairs = _train_data(cfg)
    model = CLIP(cfg.model)
    # One image per concept per batch: with fewer than 2 x batch concepts most of an epoch would be dropped.
    n_concepts = len(np.unique(data.image_concept[pairs.indices]))
    batch = max(2, min(cfg.batch_size, n_concepts // 2))
    pacing, steps, threads = None, cfg.steps, torch.get_num_threads()
    if steps is None:

        def left_s() -> float:
            # The loop's share minus start-up and calibration (idle-like: CPU time when that is less).
            spent = min(time.monotonic() - t_start, time.process_time() - cpu_start)
            return cfg.minutes * 60 * TRAIN_SHARE - spent

        pacing = _plan(cfg, model, pairs, batch, left_s)
        steps, threads = pacing.plan.steps, pacing.plan.run_threads
        model = CLIP(cfg.model)  # a fresh start: calibration must not leak into the run
        if pacing.plan.busy:
            say(_busy_message(cfg, pacing))
    torch.set_num_threads(threads)
    governor = pace.ThreadGovernor(
        pace.thread_choices(pace.available_cpus()), threads, pacing.plan.plan_threads if pacing else None,
        expected=batch / (pacing.now_step_s * pacing.loop_ratio) if pacing else None,
    )  # fmt: skip
    # A planned run re-plans its length at the loop's real speed while the machine looks idle (`LengthKeeper`).
    # Its deadline is wall-clock: what is left of the loop's share now.
    loop_budget = cfg.minutes * 60 * TRAIN_SHARE - (time.monotonic() - t_start)
    cpus = pace.available_cpus()
    keeper = pace.LengthKeeper(steps, loop_budget, lambda: pace.busy_now(governor, cpus)) if pacing else None

    def on_step(record: dict[str, Any]) -> None:
        before = len(governor.events)
        governor(record)
        for e in governor.events[before:]:
            if e["from"] != e["to"]:
                say(f"clip demo: step {e['step']}: {e['from']} -> {e['to']} CPU thread(s) ({e['reason']})")

    # --strict-time: stop where an idle run would have ended (plus its error), leaving the evaluation's seconds.
    strict_s = max(1.0, cfg.minutes * 60 * STRICT_SHARE - (time.monotonic() - t_start))
    train_cfg = _train_config(cfg, out, steps, batch, strict_s if cfg.strict_time and pacing else None)
    order = concept_balanced_order(data.image_concept[pairs.indices], batch, cfg.seed)
    result = train(train_cfg, model=model, dataset=pairs, order=order, on_step=on_step, replan=keeper)
    train_s, load_after = time.monotonic() - t_start, pace.loadavg()
    results, scores, ret = _evaluate(cfg, data, pairs, result, steps, batch, train_s, threads)
    results["pace"] = verdict.pace_verdict(
        plan=pacing.plan if pacing else None, planned_steps=steps, steps_done=result.step,
        loop_s=result.elapsed_s, elapsed_s=time.monotonic() - t_start, budget_s=cfg.minutes * 60,
        strict=cfg.strict_time, stopped_early=result.stopped_early, events=governor.events,
        loads=verdict.load_summary(load_before, governor.loads, load_after), thread_steps=dict(governor.thread_steps),
        cpu_count=pace.available_cpus(), cache=str(pacing.cache) if pacing and pacing.cache else None,
        replans=keeper.replans if keeper else (),
    )  # fmt: skip
    _learn_loop_ratio(pacing, results["pace"], result.stopped_early)
    write_report(out, results, scores, ret[1] if ret else [], data)
    results["wall_seconds"] = round(time.monotonic() - t_start, 1)
    atomic_write_json(out / "results.json", results)
    return results


def _evaluate(
    cfg: DemoConfig,
    data: EmojiData,
    pairs: EmojiPairs,
    result: Any,
    steps: int,
    batch: int,
    train_s: float,
    threads: int,
) -> tuple[dict[str, Any], dict, tuple | None]:
    """(what results.json holds, less the pace verdict; the cells' scores; retrieval metrics and examples)."""
    model = result.model.eval()
    scores = score_cells(model, data)
    ret = retrieval(data, scores, seed=cfg.seed)
    n_concepts = len(np.unique(data.image_concept[pairs.indices]))
    results = {
        "cells": evaluate_cells(scores),
        "by_category": category_breakdown(scores, data),
        "retrieval": {"metrics": ret[0], "examples": [example_dict(data, e) for e in ret[1]]} if ret else None,
        "steps": result.step, "planned_steps": steps, "stopped_early": result.stopped_early,
        "samples_seen": result.step * batch, "train_images": len(pairs), "train_concepts": int(n_concepts),
        "batch_size": batch, "train_seconds": round(train_s, 1), "final_loss": result.loss,
        "model": cfg.model.to_dict(),
        "demo_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"},
        "machine": {"cpu_threads": threads, "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
    }  # fmt: skip
    return results, scores, ret


def _train_config(cfg: DemoConfig, out: Path, steps: int, batch: int, max_seconds: float | None) -> Any:
    """The training loop's config: the demo's model (as a JSON file in OUT), optimiser and length."""
    from clip.train import DataConfig, ModelSpec, OptimConfig, RunConfig, TrainConfig

    model_json = out / "model_config.json"  # recorded in OUT/config.json by the training loop
    atomic_write_json(model_json, cfg.model.to_dict())
    return TrainConfig(
        data=DataConfig(batch_size=batch, workers=cfg.workers),
        model=ModelSpec(name=None, config_path=str(model_json)),
        optim=OptimConfig(
            lr=cfg.lr, wd=cfg.wd, warmup=max(1, int(steps * cfg.warmup_fraction)), precision="fp32",
            label_smoothing=cfg.label_smoothing,
            fused=True,  # the 6.3M-parameter token embedding: one fused pass, 31 -> 7 ms of each step
        ),
        run=RunConfig(
            output_dir=str(out), steps=steps, seed=cfg.seed, save_every=max(steps, 1), keep=1,
            max_seconds=max_seconds, progress=cfg.progress, device="cpu",
            log_every=1,  # every step reaches the thread governor right after it ran
        ),
    )  # fmt: skip


def write_report(out: Path, results: dict[str, Any], scores: dict, examples: list, data: EmojiData) -> None:
    """report.md, examples.png and retrieval.png (curves.png and the checkpoint come from the training loop)."""
    from clip.demo_plots import examples_grid, retrieval_grid

    examples_grid(scores, data, out / "examples.png")
    if examples:
        retrieval_grid(examples, data, out / "retrieval.png")
    atomic_write_text(out / "report.md", report_markdown(results))


def print_summary(results: dict[str, Any]) -> None:
    print()
    print(results_table(results))
    for line in results["pace"]["lines"]:
        print("- " + line.replace("**", ""))
    print(
        f"\n{results['steps']} steps, {results['samples_seen']:,} samples, "
        f"{results['wall_seconds']:.0f} s wall. Report: {Path(results['checkpoint'] or '.').parents[1] / 'report.md'}"
    )
