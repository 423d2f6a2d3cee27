"""Training-step throughput, ours vs open_clip: same config, weights, batch, threads and precision.

One step = forward of both towers, contrastive loss, backward, AdamW step, temperature clamp. Ours runs the
training loop's own step (`clip.train.step.forward_backward`, fused AdamW on CUDA); open_clip runs the step of
its `training/train.py` (model -> ClipLoss -> backward -> torch.optim.AdamW). Measurements alternate between
the two so that drifting machine load hits both alike; the best round is kept.

Prints one JSON line per implementation and one with the ratio ours / open_clip (> 1: ours is faster).

    python benchmarks/bench_train.py --model ViT-S/4@32px --batch-size 64
    python benchmarks/bench_train.py --model ViT-B/32 --batch-size 512 --device cuda --precision amp_bf16
    python benchmarks/bench_train.py --memory --model ViT-B/32 --batch-size 256 [--grad-checkpointing]
    python benchmarks/bench_train.py --profile --model ViT-B/32 --batch-size 512 --device cuda --precision amp_bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import resource
import subprocess
import sys
import time

import torch

OPEN_CLIP_NAMES = {
    "ViT-B/32": "ViT-B-32-quickgelu",
    "ViT-B/16": "ViT-B-16-quickgelu",
    "ViT-L/14": "ViT-L-14-quickgelu",
}


def open_clip_model(name: str, config):
    """The open_clip model with the same architecture as our `config` (random init)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if name in OPEN_CLIP_NAMES:
        return open_clip.create_model(OPEN_CLIP_NAMES[name])
    v, t = config.vision, config.text
    if v.kind != "vit":
        raise ValueError("small-config comparisons are built for ViT towers; use a registry ViT")
    vision = CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.width // v.heads, patch_size=v.patch_size,
                           image_size=v.image_size)  # fmt: skip
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                       layers=t.layers)  # fmt: skip
    return open_clip.CLIP(config.embed_dim, vision, text, quick_gelu=config.quick_gelu)


def inputs(
    config, batch: int, device: torch.device, full_text: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images [batch, 3, S, S] and token ids [batch, ctx]: start of text, random ids, end of text at
    ctx // 3 (a typical caption length; `full_text`: at the last position), then padding."""
    g = torch.Generator().manual_seed(0)
    n, ctx = config.vision.image_size, config.text.context_length
    images = torch.randn(batch, 3, n, n, generator=g)
    texts = torch.randint(1, 49405, (batch, ctx), generator=g)
    eot = ctx - 1 if full_text else ctx // 3
    texts[:, 0], texts[:, eot] = 49406, 49407  # start, end of text (pooled there), padding after
    texts[:, eot + 1 :] = 0
    return images.to(device), texts.to(device)


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def ours_step(model, config, device: torch.device, args):
    from clip.train.data import Batch
    from clip.train.distributed import DistInfo
    from clip.train.optim import adam_hparams, clamp_logit_scale, param_groups
    from clip.train.step import ContrastiveModel, StepContext, forward_backward

    batch = args.batch_size
    inner = ContrastiveModel(model).to(device).train()
    opt = torch.optim.AdamW(param_groups(inner, 0.2), lr=1e-5, **adam_hparams(config.vision.kind, None, None, None),
                            fused=device.type == "cuda")  # fmt: skip
    wrapped = torch.compile(inner) if args.compile else inner
    ctx = StepContext(wrapped, inner, DistInfo(device=device), batch, autocast(args.precision, device))
    # Token ids stay on the host, as the data loader hands them over (the step cuts them before the copy).
    images, texts = inputs(config, batch, torch.device("cpu"), args.full_text)
    b = Batch(images.to(device), texts, [], {}, 0, 0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        forward_backward([b], ctx, batch)
        opt.step()
        clamp_logit_scale(inner.clip)

    return step


def open_clip_step(model, config, device: torch.device, args):
    from open_clip.loss import ClipLoss

    model = model.to(device).train()
    run = torch.compile(model) if args.compile else model  # as open_clip's --torchcompile
    loss_fn = ClipLoss()
    # open_clip's training/main.py grouping: no decay for ndim < 2, norms, biases, logit_scale
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    params = list(model.named_parameters())
    groups = [{"params": [p for n, p in params if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in params if not exclude(n, p)], "weight_decay": 0.2}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    images, texts = inputs(config, args.batch_size, device, args.full_text)
    cast = autocast(args.precision, device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with cast():
            img, txt, scale = run(images, texts)[:3]
            loss = loss_fn(img, txt, scale)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def build(args, device: torch.device, which: tuple[str, ...] = ("ours", "open_clip")):
    """(config, our model, open_clip model) with equal weights; only the models in `which` are built."""
    from clip.config import get_config
    from clip.loading import model_from_state_dict
    from clip.model import CLIP

    config = get_config(args.model)
    torch.manual_seed(0)
    ref = open_clip_model(args.model, config) if "open_clip" in which else None
    if "ours" not in which:
        ours = None
    else:
        ours = model_from_state_dict(config, ref.state_dict()) if ref is not None else CLIP(config)
    for m in (ref, ours):
        if m is not None and args.grad_checkpointing:
            m.set_grad_checkpointing(True)
    return config, ours, ref


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device: torch.device, batch: int, min_seconds: float, warmup: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or n < 2:
        step()
        n += 1
        if n % 5 == 0:
            sync(device)
    sync(device)
    return n * batch / (time.perf_counter() - start)


def throughput(args, device: torch.device) -> None:
    config, ours, ref = build(args, device)
    steps = {
        "ours": ours_step(ours, config, device, args),
        "open_clip": open_clip_step(ref, config, device, args),
    }
    best = {k: 0.0 for k in steps}
    for _ in range(args.rounds):
        for impl, step in steps.items():
            best[impl] = max(best[impl], timed(step, device, args.batch_size, args.seconds, args.warmup))
    meta = {"model": args.model, "batch": args.batch_size, "precision": args.precision, "device": device_name(device),
            "threads": torch.get_num_threads(), "grad_checkpointing": args.grad_checkpointing,
            "compile": args.compile, "text_eot": "last" if args.full_text else "ctx // 3",
            "torch": torch.__version__}  # fmt: skip
    for impl, value in best.items():
        print(json.dumps({"impl": impl, "samples_per_s": round(value, 2), **meta}), flush=True)
    print(
        json.dumps({"ratio_ours_over_open_clip": round(best["ours"] / best["open_clip"], 3), **meta}),
        flush=True,
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def memory_child(args, device: torch.device) -> None:
    """One implementation's step in this fresh process; report its peak memory."""
    config, ours, ref = build(args, device, which=(args.impl,))  # only the measured model is built
    model = ours if args.impl == "ours" else ref
    make = ours_step if args.impl == "ours" else open_clip_step
    step = make(model, config, device, args)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.memory_steps):
        step()
    sync(device)
    out = {"impl": args.impl, "model": args.model, "batch": args.batch_size, "grad_checkpointing": args.grad_checkpointing,
           "precision": args.precision, "device": device_name(device), "seconds_per_step":
           round((time.perf_counter() - start) / args.memory_steps, 2),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "rss_before_step_gib": round(before, 2)}  # fmt: skip
    if device.type == "cuda":
        out["peak_cuda_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(out), flush=True)


def memory(args) -> None:
    """Peak memory of one training step, each configuration in its own process (peaks do not reset)."""
    for impl in args.impls:
        for ckpt in [False, True] if args.both_checkpointing else [args.grad_checkpointing]:
            cmd = [sys.executable, __file__, "--memory-child", "--impl", impl, "--model", args.model,
                   "--batch-size", str(args.batch_size), "--device", args.device, "--precision", args.precision,
                   "--threads", str(args.threads), "--memory-steps", str(args.memory_steps)]  # fmt: skip
            if ckpt:
                cmd.append("--grad-checkpointing")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            print(proc.stdout.strip() or json.dumps({"impl": impl, "error": proc.stderr[-500:]}), flush=True)


def profile(args, device: torch.device) -> None:
    """Top operators of our step (CUDA time on GPU), to see what limits it."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profile

    config, ours, _ = build(args, device, which=("ours",))
    step = ours_step(ours, config, device, args)
    for _ in range(args.warmup):
        step()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with run_profile(activities=acts) as prof:
        for _ in range(3):
            step()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.profile_rows), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-S/4@32px", help="registry name (ViT towers for small configs)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "amp_bf16", "amp_fp16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0, help="minimum timed seconds per measurement")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile both models (open_clip: as --torchcompile)"
    )
    ap.add_argument(
        "--full-text", action="store_true", help="end of text at the last position (no short captions)"
    )
    ap.add_argument(
        "--memory", action="store_true", help="peak memory of one step, each case in a fresh process"
    )
    ap.add_argument("--both-checkpointing", action="store_true", help="with --memory: with and without")
    ap.add_argument(
        "--impls", nargs="+", default=["ours"], choices=("ours", "open_clip"), help="with --memory"
    )
    ap.add_argument("--memory-steps", type=int, default=1)
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-rows", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.memory_child:
        memory_child(args, device)
    elif args.memory:
        memory(args)
    elif args.profile:
        profile(args, device)
    else:
        throughput(args, device)


if __name__ == "__main__":
    main()
