"""CPU precision: images/s of open_clip fp32 and of clip.optimize_for_cpu at fp32, bf16 and int8, with agreement.

Same random ViT-B/32 weights (loaded into open_clip's ViT-B-32-quickgelu, which is exact), one process, the
same threads; the variants run in interleaved rounds and the best round of each is kept (the machine is
shared: a neighbour's burst hits every variant alike, and best-of-N drops it). Agreement with our plain fp32
model: cosine of features per image on the timed batch, and recall@10 of image->image search over
`--images` photo-like images (each image queries the others; the fp32 top 10 is the truth; the database and
the queries are both embedded at the precision measured, as a `clip embed` job would give them).

Prints one JSON line per variant (images/s, ratio to open_clip fp32, agreement) and one summary line with
the load average before and after. Run: python benchmarks/bench_cpu_precision.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def photo_like(n: int, size: int, seed: int) -> torch.Tensor:
    """n normalised images [n, 3, size, size] with photo statistics: smooth colour fields, a few solid
    rectangles of random colour, mild noise (random weights see no content, but the value ranges are real)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = _fields(n, size, g, xx, yy)
    for _ in range(3):
        x0, y0 = torch.randint(0, size - 16, (2, n), generator=g)
        w, h = torch.randint(16, size // 2, (2, n), generator=g)
        colour = torch.rand(n, 3, generator=g)
        for i in range(n):
            base[i, :, y0[i] : y0[i] + h[i], x0[i] : x0[i] + w[i]] = colour[i].view(3, 1, 1)
    img = (base + 0.015 * torch.randn(base.shape, generator=g)).clamp(0, 1)
    return (img - MEAN) / STD


def _fields(n: int, size: int, g: torch.Generator, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel linear colour gradients [n, 3, size, size] in [0, 1]."""
    offset = torch.rand(n, 3, 1, 1, generator=g)
    sx, sy = torch.rand(2, n, 3, 1, 1, generator=g) - 0.5
    return (offset + sx * xx + sy * yy).clamp(0, 1)


def embed_all(model, images: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.inference_mode():
        parts = [F.normalize(model.encode_image(images[i : i + batch]).float(), dim=-1)
                 for i in range(0, len(images), batch)]  # fmt: skip
    return torch.cat(parts)


def recall_at_10(truth: torch.Tensor, test: torch.Tensor) -> float:
    """Mean share of each image's fp32 top-10 neighbours (itself excluded) that `test` vectors also rank top 10."""

    def top10(v: torch.Tensor) -> torch.Tensor:
        sim = v @ v.t()
        sim.fill_diagonal_(-2.0)
        return sim.topk(10, dim=1).indices

    a, b = top10(truth), top10(test)
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).float().sum(1)
    return float(hits.mean() / 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="ViT-B/32")
    ap.add_argument("--open-clip-name", default="ViT-B-32-quickgelu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds; the best of each is kept")
    ap.add_argument("--images", type=int, default=2000, help="images for the recall@10 search (0: skip)")
    args = ap.parse_args()

    import open_clip

    import clip
    from clip.config import get_config
    from clip.model import CLIP

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    ours = CLIP(get_config(args.model)).eval()
    peer = open_clip.create_model(args.open_clip_name).eval()
    peer.load_state_dict(ours.state_dict())
    variants = {"open_clip fp32": peer, "ours plain fp32": ours}
    for p in ("fp32", "bf16", "int8"):
        variants[f"ours {p}"] = clip.optimize_for_cpu(ours, p)
    size = ours.visual.input_resolution
    x = photo_like(args.batch, size, seed=1)

    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for m in variants.values():
            m.encode_image(x)  # warm-up: oneDNN builds its kernels on the first call
        for _ in range(args.rounds):
            for name, m in variants.items():
                start = time.perf_counter()
                m.encode_image(x)
                times[name].append(time.perf_counter() - start)
        ref = F.normalize(ours.encode_image(x), dim=-1)

    truth = None
    if args.images:
        pool = photo_like(args.images, size, seed=2)
        truth = embed_all(ours, pool, args.batch)
    meta = {"model": args.model, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine()}  # fmt: skip
    peer_best = min(times["open_clip fp32"])
    for name, m in variants.items():
        best = min(times[name])
        with torch.inference_mode():
            cos = F.cosine_similarity(F.normalize(m.encode_image(x).float(), dim=-1), ref, dim=-1)
        row = {**meta, "variant": name, "images_per_s": round(args.batch / best, 2),
               "median_images_per_s": round(args.batch / float(np.median(times[name])), 2),
               "vs_open_clip_fp32": round(peer_best / best, 3),
               "cosine_mean": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6)}  # fmt: skip
        if truth is not None:
            vectors = truth if m is ours else embed_all(m, pool, args.batch)
            row["recall_at_10"] = round(recall_at_10(truth, vectors), 4)
            row["search_images"] = args.images
        print(json.dumps(row), flush=True)
    print(json.dumps({"summary": "load average (1, 5, 15 min)", "before": [round(v, 2) for v in load_before],
                      "after": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count()}))  # fmt: skip


if __name__ == "__main__":
    main()
