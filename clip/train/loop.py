"""The training loop: plain functions over one `Run` record, identical in one process and under torchrun.

    from clip.train import TrainConfig, DataConfig, ModelSpec, OptimConfig, RunConfig, train
    result = train(TrainConfig(data=DataConfig(train_data="data.csv", batch_size=128),
                               model=ModelSpec(name="ViT-B/32"), run=RunConfig(output_dir="out", steps=1000)))

The model is wrapped (DDP, torch.compile) in one place and checkpointed bare. Only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip.config import CLIPConfig
from clip.model import CLIP
from clip.train import checkpoint as ckpt_io
from clip.train import rundir
from clip.train.build import (
    apply_locks,
    build_model,
    build_stream,
    build_val_dataset,
    check_sources,
    load_model_config,
    model_tokenizer,
)
from clip.train.config import TrainConfig, default_loss
from clip.train.distributed import (
    DistInfo,
    agree,
    all_reduce_sum,
    gather_objects,
    init_from_env,
    shutdown,
    wrap_ddp,
)
from clip.train.optim import (
    CosineSchedule,
    adam_hparams,
    autocast_factory,
    clamp_logit_scale,
    make_scaler,
    param_groups,
    resolve_precision,
    set_lr,
)
from clip.train.runlog import CURVES_FILE, RunLog, read_metrics
from clip.train.step import ContrastiveModel, StepContext, forward_backward
from clip.train.validate import validate

SKIP_REASONS = (
    "missing_image",
    "unreadable_image",
    "empty_caption",
    "missing_caption",
    "unreadable_caption",
    "unreadable_shard_entry",
    "truncated_shard",
)


@dataclass
class TrainResult:
    """What `train` returns. `model` is the bare trained CLIP (on the training device, train mode off)."""

    model: CLIP
    step: int
    epoch: int
    loss: float | None  # global-batch loss of the last step
    skipped: dict[str, int]  # samples skipped over the whole run, by reason (all ranks)
    stopped_early: bool  # True when `max_seconds` ended the run before `steps`
    elapsed_s: float  # the loop's time, all attempts (resumes included; not the last save and curves)
    output_dir: Path
    checkpoint: Path | None  # the final checkpoint (None on ranks other than 0)
    metrics_path: Path
    curves_path: Path | None
    notes: list[str] = field(default_factory=list)  # one-line remarks for the user (e.g. an output skipped)


@dataclass
class Run:
    """Everything the loop functions share. `model` is what the step calls (DDP / compiled wrapper);
    `inner.clip` is the bare model that is saved."""

    cfg: TrainConfig
    info: DistInfo
    inner: ContrastiveModel
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: CosineSchedule
    stream: Any
    ctx: StepContext
    log: RunLog
    total_steps: int
    step: int = 0
    epoch: int = 0
    skipped: Counter = field(default_factory=Counter)
    elapsed_before: float = 0.0
    last_loss: float | None = None
    last_saved: int = -1
    pending: list = field(default_factory=list)
    val_dataset: Any = None
    on_step: Callable[[dict], None] | None = None
    replan: Callable[[int, float], int | None] | None = None
    requested_total: int = 0  # rank 0's replan answer, applied on every rank at the next step's agreement
    t_start: float | None = None  # monotonic time this attempt's loop began
    notes: list[str] = field(default_factory=list)


def train(
    cfg: TrainConfig,
    *,
    model: CLIP | None = None,
    dataset: Any = None,
    order: Callable[[int], np.ndarray] | None = None,
    on_step: Callable[[dict], None] | None = None,
    replan: Callable[[int, float], int | None] | None = None,
) -> TrainResult:
    """Train a CLIP model contrastively; the function behind `clip train`. Call it on every rank under torchrun.

    cfg: the run (data, model, optimisation, length, outputs). cfg.data.train_data may be None when `dataset`
        is given.
    model: train this module instead of building one from cfg.model (it is moved to the device in place).
    dataset: any map-style data set; item i of epoch e is `dataset.get(i, e)` if it has `get`, else
        `dataset[i]`, and must be (image float [3, H, W], token ids [L]). Its randomness must come from
        (seed, epoch, index) only, so runs do not depend on the number of workers. ValueError / OSError from an
        item skips that sample (counted). Optional `dataset.key(i)` names samples for `on_step`.
    order: epoch -> np.ndarray of sample indices, the global order of that epoch (default: a permutation seeded
        by (seed, epoch)). Step s uses order[s*G:(s+1)*G] with G = batch_size x accum_freq x world size, rank r
        its r-th slice; a trailing partial batch is dropped.
    on_step: called on every rank, every `log_every` steps, with each step's metrics record plus "keys" (this
        rank's sample keys of that step).
    replan: called on rank 0 after every step with (steps done, this attempt's loop seconds); an int it returns
        becomes the run's length from the next step on (at least one more step), the cosine schedule then
        decaying to that step instead (e.g. a run that fits a wall-clock budget by re-planning its length as it
        measures its speed). None keeps the length. Each change is in `TrainResult.notes` and the checkpoints.
    """
    info = init_from_env(cfg.run.device)
    try:
        # Rank 0 holds the run folder's lock for the whole run; the other ranks write nothing there.
        with rundir.claim(cfg.run.output_dir, enabled=info.is_main) as removed:
            if removed:
                warnings.warn(
                    f"removed {len(removed)} partial file(s) an interrupted save left in {cfg.run.output_dir} "
                    f"({', '.join(sorted(p.name for p in removed)[:3])}{', ...' if len(removed) > 3 else ''})",
                    stacklevel=2,
                )
            return _train(cfg, info, model, dataset, order, on_step, replan)
    finally:
        shutdown(info)


def _train(
    cfg: TrainConfig, info: DistInfo, model: CLIP | None, dataset: Any, order: Any, on_step: Any, replan: Any
) -> TrainResult:
    check_sources(cfg)  # a wrong --train-data fails now, not after building the model
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank and for any world size
    out = Path(cfg.run.output_dir)
    saved = ckpt_io.load_checkpoint(ckpt_io.resolve_resume(cfg.run.resume, out)) if cfg.run.resume else None
    if saved is None and info.is_main and ckpt_io.step_files(out):
        warnings.warn(
            f"{out} holds checkpoints of an earlier run: this fresh run replaces them as it passes their steps "
            "(continue the earlier run with --resume latest instead)",
            stacklevel=2,
        )
    model = _prepare_model(cfg, model, saved)
    if cfg.optim.loss is None:  # the model's own loss, written into config.json and the checkpoints
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, loss=default_loss(model.config)))
    run = _setup(cfg, info, model, saved, dataset, order)
    run.on_step, run.replan = on_step, replan
    stopped = False
    try:
        stopped = _loop(run)
        # The loop's own time: the final save and curves.png below are not training (a short run's speed would
        # otherwise read slower than its steps ran).
        loop_s = run.elapsed_before + _elapsed(run)
        _flush(run)
        if run.step != run.last_saved:
            _save(run)
        curves = _finish_outputs(run)
    finally:
        run.log.close()
        run.stream.close()
    final = ckpt_io.step_path(out, run.last_saved) if info.is_main and run.last_saved >= 0 else None
    run.inner.clip.eval()
    return TrainResult(
        model=run.inner.clip, step=run.step, epoch=run.epoch, loss=run.last_loss, skipped=dict(run.skipped),
        stopped_early=stopped, elapsed_s=loop_s, output_dir=out, checkpoint=final,
        metrics_path=run.log.path, curves_path=curves, notes=run.notes,
    )  # fmt: skip


def _prepare_model(cfg: TrainConfig, model: CLIP | None, saved: dict | None) -> CLIP:
    """The model to train: given, built from cfg, or rebuilt from the checkpoint being resumed."""
    if saved is not None:
        config = CLIPConfig.from_dict(saved["config"])
        if model is None:
            if not cfg.model.pretrained:
                wanted = load_model_config(cfg.model.config_path) if cfg.model.config_path else None
                wanted = wanted or _registry_config(cfg.model.name)
                if wanted != config:
                    raise ValueError(
                        f"the checkpoint's model differs from the one asked for ({cfg.model.name!r})"
                    )
            model = CLIP(config)
        elif model.config != config:
            raise ValueError("the model passed to train() differs from the checkpoint's model")
        model.load_state_dict(saved["state_dict"], strict=True)
        return model
    if model is None:
        model = build_model(cfg)
        if (cfg.optim.loss or default_loss(model.config)) == "siglip" and not cfg.model.pretrained:
            with torch.no_grad():  # SigLIP starts the temperature at 10, not 1 / 0.07 (Zhai et al., 2023)
                model.logit_scale.fill_(math.log(10.0))
    return model


def _registry_config(name: str) -> CLIPConfig:
    from clip.config import get_config

    return get_config(name)


def _setup(
    cfg: TrainConfig, info: DistInfo, model: CLIP, saved: dict | None, dataset: Any, order: Any
) -> Run:
    apply_locks(model, cfg.model.lock_image, cfg.model.lock_text)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    inner = ContrastiveModel(model, cfg.optim.loss).to(info.device)
    precision = resolve_precision(cfg.optim.precision, info.device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(inner, o.wd), lr=o.lr, **adam_hparams(model.config.vision.kind, o.beta1, o.beta2, o.eps),
        fused=info.device.type == "cuda" if o.fused is None else o.fused,
    )  # fmt: skip
    position = _resume_position(cfg, info, saved) if saved else None
    tokenizer = model_tokenizer(model)  # None for OpenAI's BPE
    stream = build_stream(
        cfg, model.config, info, dataset=dataset, order=order, position=position, tokenizer=tokenizer
    )
    total = cfg.run.steps if cfg.run.steps is not None else cfg.run.epochs * stream.steps_per_epoch
    if o.warmup >= total:
        warnings.warn(f"warmup ({o.warmup} steps) >= run length ({total} steps): the peak lr is never reached",
                      stacklevel=2)  # fmt: skip
    saved_total = (saved or {}).get("scheduler", {}).get("total_steps")
    if saved_total is not None and saved_total != total and info.is_main:
        warnings.warn(
            f"the checkpoint's learning-rate schedule ended at step {saved_total:,} (its run's length, or a "
            f"re-planned one); this run follows its own length of {total:,} steps from step {saved['step']:,}",
            stacklevel=2,
        )
    scaler = make_scaler(precision, info.device)
    wrapped = wrap_ddp(inner, info)
    if cfg.model.compile:
        wrapped = torch.compile(wrapped)
    autocast = autocast_factory(precision, info.device)
    ctx = StepContext(wrapped, inner, info, cfg.data.batch_size, autocast, scaler, cfg.optim.label_smoothing)
    start = saved["step"] if saved else 0
    log = RunLog(cfg.run.output_dir, enabled=info.is_main, tensorboard=cfg.run.tensorboard,
                 progress=cfg.run.progress, total_steps=total, start_step=start)  # fmt: skip
    run = Run(cfg, info, inner, wrapped, optimizer, CosineSchedule(o.lr, o.warmup, total, o.min_lr), stream,
              ctx, log, total, val_dataset=build_val_dataset(cfg, model.config, tokenizer))  # fmt: skip
    if saved:
        _restore(run, saved)
    log.write_config(_resolved(run, precision))
    return run


def _resume_position(cfg: TrainConfig, info: DistInfo, saved: dict) -> dict:
    """This rank's data position in the checkpoint, carried over to the current global batch size.

    A map-style position counts global batches of the saved size; with another size (batch, accum or number
    of processes) the epoch goes on from the same sample, rounded down to a whole new batch, and a warning says
    so. A WebDataset position counts each worker's batches, so it only holds for the same layout.
    """
    ranks = saved["data_position"]["ranks"]
    args = saved.get("args", {})
    old_batch = args.get("data", {}).get("batch_size", cfg.data.batch_size)
    old_global = old_batch * args.get("optim", {}).get("accum_freq", 1) * saved.get("world_size", len(ranks))
    new_global = cfg.data.batch_size * cfg.optim.accum_freq * info.world_size
    if ranks[0]["kind"] == "wds":
        if len(ranks) != info.world_size:
            raise ValueError("resume a WebDataset run with the same number of processes it was saved with")
        if old_batch != cfg.data.batch_size:
            raise ValueError(
                f"resume a WebDataset run with the --batch-size it was saved with ({old_batch}, not "
                f"{cfg.data.batch_size}): its position counts batches of that size"
            )
        return ranks[info.rank]
    position = dict(ranks[0])  # map-style positions are the same on every rank
    if old_global != new_global:
        sample = int(position["batch"]) * old_global
        position["batch"] = sample // new_global
        if info.is_main:
            warnings.warn(
                f"resuming with a global batch of {new_global} samples (--batch-size {cfg.data.batch_size} x "
                f"--accum-freq {cfg.optim.accum_freq} x {info.world_size} process(es)) where the checkpoint used "
                f"{old_global}: epoch {position['epoch']} goes on from sample {position['batch'] * new_global} "
                f"(it had reached {sample}), the step count and learning-rate schedule go on from step "
                f"{saved['step']}, and the run no longer equals an uninterrupted one",
                stacklevel=3,
            )
    return position


def _restore(run: Run, saved: dict) -> None:
    run.optimizer.load_state_dict(saved["optimizer"])
    if run.ctx.scaler is not None and saved.get("scaler"):
        run.ctx.scaler.load_state_dict(saved["scaler"])
    if run.inner.logit_bias is not None:
        run.inner.logit_bias.data.copy_(saved["loss_state"]["logit_bias"])
    ckpt_io.set_rng_state(saved["rng"])
    run.step = run.last_saved = int(saved["step"])
    run.epoch = int(saved["epoch"])
    run.skipped.update(saved.get("skipped", {}))
    run.elapsed_before = float(saved.get("elapsed_s", 0.0))


def _resolved(run: Run, precision: str) -> dict:
    info, d = run.info, run.cfg.data
    return {
        "train": run.cfg.to_dict(),
        "model_config": run.inner.clip.config.to_dict(),
        "world_size": info.world_size,
        "global_batch": d.batch_size * run.cfg.optim.accum_freq * info.world_size,
        "total_steps": run.total_steps,
        "steps_per_epoch": run.stream.steps_per_epoch,
        "precision": precision,
        "device": str(info.device),
        "parameters": sum(p.numel() for p in run.inner.parameters()),
        "trainable_parameters": sum(p.numel() for p in run.inner.parameters() if p.requires_grad),
    }


def _elapsed(run: Run) -> float:
    return time.monotonic() - run.t_start if run.t_start is not None else 0.0


def _loop(run: Run) -> bool:
    """Steps until `total_steps` (False) or the wall-clock budget (True)."""
    run.t_start = time.monotonic()
    run.inner.train()
    if run.cfg.model.lock_image:
        run.inner.clip.visual.eval()  # a locked tower keeps its BatchNorm statistics (LiT)
    recent: deque[float] = deque(maxlen=20)
    # Samples met in this epoch: a resumed epoch already had some (its position is past the start).
    epoch_samples = run.stream.position().get("batch", 0)
    budget = run.cfg.run.max_seconds
    while run.step < run.total_steps:
        t0 = time.perf_counter()
        batches = run.stream.next_step()
        data_time = time.perf_counter() - t0
        over = budget is not None and _elapsed(run) + (sum(recent) / len(recent) if recent else 0.0) >= budget
        skipped = Counter()
        for b in batches:
            skipped.update(b.skipped)
        flags = agree([int(not batches), int(over), sum(b.size for b in batches), run.requested_total,
                       *(skipped.get(r, 0) for r in SKIP_REASONS)], run.info)  # fmt: skip
        run.skipped.update({r: n for r, n in zip(SKIP_REASONS, flags[4:], strict=True) if n})
        if flags[3]:  # only rank 0 asks, so the sum is its answer (never below the next step)
            _set_length(run, flags[3])
        if flags[1]:
            return True
        if flags[0] == run.info.world_size:  # every rank's share of the epoch is used up
            if epoch_samples == 0:
                raise ValueError(f"no readable sample in epoch {run.stream.epoch} of {run.cfg.data.train_data}; "
                                 f"skipped: {dict(run.skipped)}")  # fmt: skip
            run.stream.end_epoch()
            epoch_samples = 0
            continue
        epoch_samples += flags[2]
        if flags[2] == 0:
            continue  # nothing readable in this global batch: no optimizer step
        _train_step(run, batches, flags[2], data_time, t0)
        recent.append(time.perf_counter() - t0)
        if run.replan is not None and run.info.is_main:
            run.requested_total = int(run.replan(run.step, _elapsed(run)) or 0)
    return False


def _set_length(run: Run, total: int) -> None:
    """Make the run `total` steps long (at least one more than done): the schedule, progress bar and loop."""
    run.requested_total = 0
    total = max(run.step + 1, total)
    if total == run.total_steps:
        return
    run.notes.append(f"re-planned at step {run.step}: {run.total_steps:,} -> {total:,} steps")
    run.total_steps = total
    run.schedule = dataclasses.replace(run.schedule, total_steps=total)
    run.log.set_total(total)


def _train_step(run: Run, batches: list, n_valid: int, data_time: float, t0: float) -> None:
    step, opt, scaler = run.step, run.optimizer, run.ctx.scaler
    lr = run.schedule.lr_at(step)
    set_lr(opt, lr)
    opt.zero_grad(set_to_none=True)
    micro = list(batches) + [None] * (run.cfg.optim.accum_freq - len(batches))
    loss = forward_backward(micro, run.ctx, n_valid)
    clip_norm = run.cfg.optim.grad_clip_norm
    if scaler is not None:
        if clip_norm is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for p in run.inner.parameters() if p.requires_grad], clip_norm)
        scaler.step(opt)
        scaler.update()
    else:
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in run.inner.parameters() if p.requires_grad], clip_norm)
        opt.step()
    clamp_logit_scale(run.inner.clip)
    run.step += 1
    run.epoch = run.stream.epoch
    keys = [k for b in batches for k in b.keys]
    seconds = time.perf_counter() - t0
    record = {"step": run.step, "epoch": run.epoch, "lr": lr, "samples_per_s": n_valid / seconds,
              "data_time": data_time, "skipped": sum(run.skipped.values())}  # fmt: skip
    run.pending.append((record, loss, run.inner.clip.logit_scale.detach().exp(), keys))
    run.log.advance()
    due_val = (
        run.val_dataset is not None and run.cfg.data.val_every and run.step % run.cfg.data.val_every == 0
    )
    if len(run.pending) >= run.cfg.run.log_every or due_val or run.step % run.cfg.run.save_every == 0:
        _flush(run, validate_now=due_val)
    if run.step % run.cfg.run.save_every == 0:
        _save(run)


def _flush(run: Run, validate_now: bool = False) -> None:
    """Turn pending losses into floats (one all-reduce for the batch of steps) and write their records."""
    if not run.pending:
        return
    losses = all_reduce_sum(torch.stack([p[1].float() for p in run.pending])) / run.info.world_size
    scales = torch.stack([p[2].float() for p in run.pending])
    for (record, _, _, keys), loss, scale in zip(run.pending, losses.tolist(), scales.tolist(), strict=True):
        record.update(loss=loss, logit_scale=scale)
        if validate_now and record is run.pending[-1][0] and run.info.is_main:
            record.update({f"val_{k}": v for k, v in _validate(run).items()})
        run.log.add(record)
        if run.on_step is not None:
            run.on_step({**record, "keys": keys})
    run.last_loss = losses[-1].item()
    run.pending.clear()


def _validate(run: Run) -> dict[str, float]:
    return validate(run.inner.clip, run.val_dataset, limit=run.cfg.data.val_num_samples,
                    batch_size=run.cfg.data.batch_size, device=run.info.device, autocast=run.ctx.autocast)  # fmt: skip


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _save(run: Run) -> None:
    """Checkpoint the bare model and everything resuming needs (rank 0 writes; all ranks give positions)."""
    _flush(run)
    positions = gather_objects(run.stream.position(), run.info)
    if run.info.is_main:
        state = {
            "config": run.inner.clip.config.to_dict(),
            "state_dict": _to_cpu(run.inner.clip.state_dict()),
            "optimizer": _to_cpu(run.optimizer.state_dict()),
            "scaler": run.ctx.scaler.state_dict() if run.ctx.scaler is not None else {},
            "scheduler": run.schedule.state_dict(),
            "loss_state": {"logit_bias": run.inner.logit_bias.detach().cpu()}
            if run.inner.logit_bias is not None
            else {},
            "step": run.step,
            "epoch": run.epoch,
            "data_position": {"ranks": positions},
            "rng": ckpt_io.rng_state(),
            "args": run.cfg.to_dict(),
            "skipped": dict(run.skipped),
            "elapsed_s": run.elapsed_before + _elapsed(run),
            "world_size": run.info.world_size,
        }
        ckpt_io.save_checkpoint(state, run.cfg.run.output_dir, run.step, run.cfg.run.keep)
    run.last_saved = run.step


def _finish_outputs(run: Run) -> Path | None:
    """Draw curves.png from the metrics; without matplotlib (a plain install) skip it with a note, never fail
    a finished run over a picture."""
    if not run.info.is_main:
        return None
    from clip.train.plots import plot_curves, plotting_available

    path = Path(run.cfg.run.output_dir) / CURVES_FILE
    records = read_metrics(run.log.path)
    if not records:
        return None
    if not plotting_available():
        run.notes.append(
            f"{CURVES_FILE} skipped: it needs matplotlib, which the training extra installs: "
            "pip install 'clipforge[train]'"
        )
        return None
    plot_curves(records, path)
    return path
