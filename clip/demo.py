"""The main job: train a small CLIP on the bundled emoji art, then evaluate it zero-shot.

Training uses the training styles (Noto, Twemoji, OpenMoji) on the seen concepts, through the
project's ordinary model, tokenizer and training loop.  Three zero-shot cells are then scored:
  style   - the held-out Fluent 3D renders of seen concepts (classes: all seen concepts);
  concept - held-out concepts drawn in the training styles (classes: the held-out concepts);
  both    - held-out concepts in the held-out style.
Outputs in OUT: report.md, results.json, curves.png, examples.png, checkpoints/latest.pt.
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

from clip.config import CLIPConfig, TextConfig, VisionConfig
from clip.data.emoji import CELLS, EmojiData, load_emoji
from clip.data.emoji_train import EmojiPairs, concept_balanced_order, eval_images, subset_concepts
from clip.evaluation.metrics import topk_accuracy
from clip.io import atomic_write_json, atomic_write_text
from clip.model import CLIP
from clip.zeroshot import zero_shot_classifier

# The demo architecture, chosen by the measurements recorded in docs/demo-experiments.md.
DEMO_MODEL = CLIPConfig(
    embed_dim=128,
    vision=VisionConfig(kind="vit", image_size=32, width=128, layers=4, heads=2, patch_size=8),
    text=TextConfig(context_length=32, vocab_size=49408, width=128, heads=2, layers=3),
    quick_gelu=False,
)


@dataclass(frozen=True)
class DemoConfig:
    """The main job's knobs.  `minutes` bounds the whole run (training + evaluation) on the wall clock;
    `steps` fixes the training length instead (tests).  `max_concepts` trains on a random slice."""

    output_dir: str = "demo-out"
    minutes: float = 10.0
    steps: int | None = None
    model: CLIPConfig = DEMO_MODEL
    batch_size: int = 128  # one image per concept per batch; 128 beat 64 and 256 (docs/demo-experiments.md)
    lr: float = 5e-4
    wd: float = 0.5  # stronger than CLIP's 0.1-0.2: the held-out style needs regularisation (docs/demo-experiments.md)
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


def plan_steps(cfg: DemoConfig, model: CLIP, pairs: EmojiPairs, budget_s: float) -> tuple[int, int]:
    """(training steps that fit `budget_s`, CPU threads to use), from timing a few real steps.

    Both all cores and one thread are timed: on a busy machine PyTorch's worker threads spin-wait
    for cores they cannot get, and one thread can then be many times faster than two.
    """
    from clip.train.loss import clip_loss

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    batch = [pairs.get(j, 10**6) for j in range(min(cfg.batch_size, len(pairs)))]  # an unused epoch
    images = torch.stack([b[0] for b in batch])
    tokens = torch.stack([b[1] for b in batch])
    data_s = _timed(lambda: [pairs.get(j, 10**6 + 1) for j in range(len(batch))])
    best: tuple[float, int] | None = None
    for threads in sorted({os.cpu_count() or 1, 1}, reverse=True):
        torch.set_num_threads(threads)

        def step() -> None:
            img = F.normalize(model.encode_image(images), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            clip_loss(img, txt, model.logit_scale.exp()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # the first step pays one-off allocation costs
        per_step = min(_timed(step) for _ in range(3)) + data_s
        if best is None or per_step < best[0]:
            best = (per_step, threads)
    per_step, threads = best
    torch.set_num_threads(threads)
    return max(10, int(budget_s / per_step)), threads


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train, evaluate, and write the report; returns what results.json holds."""
    from clip.train import DataConfig, ModelSpec, OptimConfig, RunConfig, TrainConfig, train
    from clip.train.plots import plotting_available

    if not plotting_available():  # say so now, not after ten minutes of training
        raise ValueError(
            "clip demo draws curves.png and examples.png with matplotlib, which is not installed: "
            "pip install 'clipforge[demo]'"
        )
    t_start = time.monotonic()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    data, pairs = _train_data(cfg)
    model = CLIP(cfg.model)
    # One image per concept per batch: with fewer than 2 x batch concepts most of an epoch would be dropped.
    n_concepts = len(np.unique(data.image_concept[pairs.indices]))
    batch = max(2, min(cfg.batch_size, n_concepts // 2))
    threads = torch.get_num_threads()
    if cfg.steps is not None:
        steps = cfg.steps
    else:  # keep ~12% of the budget for start-up, evaluation and the report
        budget = cfg.minutes * 60 * 0.88 - (time.monotonic() - t_start)
        steps, threads = plan_steps(cfg, model, pairs, budget)
        model = CLIP(cfg.model)  # a fresh start: calibration must not leak into the run
    model_json = out / "model_config.json"  # recorded in OUT/config.json by the training loop
    atomic_write_json(model_json, cfg.model.to_dict())
    order = concept_balanced_order(data.image_concept[pairs.indices], batch, cfg.seed)
    train_cfg = TrainConfig(
        data=DataConfig(batch_size=batch, workers=cfg.workers),
        model=ModelSpec(name=None, config_path=str(model_json)),
        optim=OptimConfig(
            lr=cfg.lr, wd=cfg.wd, warmup=max(1, int(steps * cfg.warmup_fraction)), precision="fp32"
        ),
        run=RunConfig(
            output_dir=str(out), steps=steps, seed=cfg.seed, save_every=max(steps, 1), keep=1,
            max_seconds=None if cfg.steps is not None else cfg.minutes * 60 * 0.92, progress=cfg.progress,
            device="cpu", log_every=10,
        ),
    )  # fmt: skip
    result = train(train_cfg, model=model, dataset=pairs, order=order)
    train_s = time.monotonic() - t_start
    model = result.model.eval()
    cells = evaluate_cells(model, data)
    results = {
        "cells": cells,
        "steps": result.step,
        "planned_steps": steps,
        "stopped_early": result.stopped_early,
        "samples_seen": result.step * batch,
        "train_images": len(pairs),
        "train_concepts": int(n_concepts),
        "batch_size": batch,
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.monotonic() - t_start, 1),
        "final_loss": result.loss,
        "model": cfg.model.to_dict(),
        "demo_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"},
        "machine": {"cpu_threads": threads, "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
    }
    write_report(out, results, model, data)
    results["wall_seconds"] = round(time.monotonic() - t_start, 1)
    atomic_write_json(out / "results.json", results)
    return results


@torch.no_grad()
def cell_logits(model: CLIP, data: EmojiData, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine logits [M, K] of cell `kind`'s images against its class captions, and labels [M]."""
    cell = data.cell(kind)
    classifier = zero_shot_classifier(model, cell.captions, ["{}"], batch_size=512)  # [D, K]
    feats = torch.cat([model.encode_image(x) for x in eval_images(data, cell.indices).split(512)])
    return F.normalize(feats, dim=-1) @ classifier, torch.as_tensor(cell.labels)


def evaluate_cells(model: CLIP, data: EmojiData) -> dict[str, dict[str, float]]:
    """Top-1 / top-5 accuracy and chance levels for the three zero-shot cells."""
    out = {}
    for kind in CELLS:
        logits, labels = cell_logits(model, data, kind)
        if len(labels) == 0:
            continue
        acc = topk_accuracy(logits, labels, ks=(1, 5))
        k = logits.shape[1]
        out[kind] = {
            "top1": round(acc[1], 4), "top5": round(acc[5], 4), "classes": k, "images": len(labels),
            "chance_top1": round(1 / k, 5), "chance_top5": round(min(5, k) / k, 5),
        }  # fmt: skip
    return out


CELL_TITLES = {
    "style": "held-out style (Fluent 3D), seen concepts",
    "concept": "held-out concepts, training styles",
    "both": "held-out concepts in the held-out style",
}


def results_table(results: dict[str, Any]) -> str:
    lines = [
        "| zero-shot cell | classes | images | top-1 | top-5 | chance top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in results["cells"].items():
        lines.append(
            f"| {CELL_TITLES[kind]} | {r['classes']} | {r['images']} | {100 * r['top1']:.1f}% | "
            f"{100 * r['top5']:.1f}% | {100 * r['chance_top1']:.2f}% |"
        )
    return "\n".join(lines)


def write_report(out: Path, results: dict[str, Any], model: CLIP, data: EmojiData) -> None:
    """report.md and examples.png (curves.png and the checkpoint come from the training loop)."""
    from clip.demo_plots import examples_grid

    examples_grid(model, data, out / "examples.png")
    text = f"""# CLIP on emoji art: zero-shot report

A CLIP ({_describe(results["model"])}) trained for {results["steps"]} steps of {results["batch_size"]}
pairs ({results["samples_seen"]:,} samples, {results["train_images"]:,} images of {results["train_concepts"]:,}
concepts in the training styles) in {results["train_seconds"]:.0f} s on {results["machine"]["cpu_threads"]} CPU
threads, then evaluated zero-shot on what it never saw.

{results_table(results)}

![training curves](curves.png)

![examples: held-out images with their top-3 captions](examples.png)

Weights: `checkpoints/latest.pt` (readable by `clip.load`, `clip classify`, `clip eval`).
"""
    atomic_write_text(out / "report.md", text)


def _describe(model: dict[str, Any]) -> str:
    v, t = model["vision"], model["text"]
    tower = f"ViT {v['layers']}x{v['width']}, patch {v['patch_size']}" if v["kind"] == "vit" else "ResNet"
    return (
        f"{tower} at {v['image_size']} px; text {t['layers']}x{t['width']}; {model['embed_dim']}-d embedding"
    )


def print_summary(results: dict[str, Any]) -> None:
    print()
    print(results_table(results))
    print(
        f"\n{results['steps']} steps, {results['samples_seen']:,} samples, "
        f"{results['wall_seconds']:.0f} s wall. Report: {Path(results['checkpoint'] or '.').parents[1] / 'report.md'}"
    )
