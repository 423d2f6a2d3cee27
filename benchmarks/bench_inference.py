"""Inference throughput, ours vs open_clip, same random weights, same process and threads.

Prints one JSON line per (impl, task, batch) and one line per (task, batch) with the ratio
ours / open_clip (> 1 means ours is faster).  Run: python benchmarks/bench_inference.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def throughput(fn, batch: int, min_seconds: float, warmup: int = 2) -> float:
    """Items per second of `fn()` (which processes `batch` items), after warm-up calls."""
    for _ in range(warmup):
        fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or n < 3:
        fn()
        n += 1
    return n * batch / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="ViT-B/32")
    ap.add_argument("--open-clip-name", default="ViT-B-32-quickgelu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alternate ours/peer this many times; best is kept")
    args = ap.parse_args()

    import open_clip

    from clip.config import get_config
    from clip.loading import model_from_state_dict

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = open_clip.create_model(args.open_clip_name).eval()
    ours = model_from_state_dict(get_config(args.model), ref.state_dict())
    size = ours.visual.input_resolution
    text_rows = torch.randint(1, 49405, (64, 77))
    text_rows[:, 0], text_rows[:, 20], text_rows[:, 21:] = 49406, 49407, 0
    tasks = []
    for batch in (1, 32):
        image = torch.randn(batch, 3, size, size)
        tasks.append(("encode_image", batch, lambda m, x=image: m.encode_image(x)))
    for batch in (1, 64):
        tasks.append(("encode_text", batch, lambda m, x=text_rows[:batch]: m.encode_text(x)))
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
    }
    for task, batch, fn in tasks:
        best = {"ours": 0.0, "open_clip": 0.0}
        with torch.inference_mode():
            for _ in range(args.rounds):  # alternate so drifting machine load hits both alike
                for impl, model in (("ours", ours), ("open_clip", ref)):
                    best[impl] = max(best[impl], throughput(lambda m=model, f=fn: f(m), batch, args.seconds))
        for impl, value in best.items():
            line = {"bench": "inference", "model": args.model, "impl": impl, "task": task, "batch": batch}
            print(json.dumps({**line, "items_per_s": round(value, 2), **meta}), flush=True)
        ratio = best["ours"] / best["open_clip"]
        print(
            json.dumps(
                {
                    "bench": "inference",
                    "task": task,
                    "batch": batch,
                    "ratio_ours_over_open_clip": round(ratio, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
