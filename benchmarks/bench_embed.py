"""Embedding a folder on the CPU, side by side in one run: the plain loop, `clip embed` and `clip index`, each in
fp32, bf16 and int8, with each one's agreement with fp32.

    python benchmarks/bench_embed.py --images 1000 --queries 100 --threads 2 --workers 2

Run it alone on an idle machine (estimated 15 minutes at 1,000 images on 2 cores; not yet run at that size).
Every variant is timed once, in turn, and a neighbour's burst lands on whichever runs then; the 1-minute load average before and after each
measurement is in its line.

The same folder of synthetic photos (JPEG 640x480, `benchmarks/bench_search.py`'s `write_photos`) and the same
randomly initialised model (`--model`, a registry config, ViT-B/32 by default: no download), saved once as a
checkpoint that every path loads. Measured, all with `--threads` torch threads:

* the plain loop users write: `clip.load(ckpt)`, then `preprocess(Image.open(p))` and `model.encode_image`,
  decoding in the main process, batched by `--batch-size` and one image at a time. fp32 is the plain model
  (the baseline every ratio is to); each `--precisions` entry is the same loop over
  `clip.optimize_for_cpu(model, precision)` (`encode_image`'s opt-in CPU route).
* `clip embed` through its library entry point (`clip.collection.embed.run_embed`, what `clip embed` calls):
  `--workers` DataLoader decoding workers, float16 shards written; its own timing (the embedding loop: model
  loading excluded, as in the loop's figure; below fp32 its first batch is embedded in fp32 too).
* `clip index` through `Index.sync` into a new index: `--workers` decoding workers, file hashing and SQLite /
  shard storage included (below fp32 its first 16 images are embedded in fp32 too).

Agreement with fp32, per measurement, on its own vectors: cosine to the plain fp32 loop's features (mean, min,
per image), and recall@10 of image search: `--queries` held-out photos (not in the folder), embedded by the same
path and precision, searched exactly among that path's vectors (`Index.search_image` for the index), against
the exact top 10 of the fp32 loop's queries among its vectors.

One JSON line per measurement: method, precision, images/s, ratios to the plain fp32 loop (batched and one at a
time), agreement, threads, workers, machine (CPU model, cores, torch), date, 1-minute load average before and
after.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_search import emit, machine, write_photos  # noqa: E402  (the house conventions, one definition)

K = 10


def plain_loop(model, preprocess, paths: list[str], batch: int) -> tuple[float, torch.Tensor]:
    """openai/CLIP's README loop, `batch` images per `encode_image`; (seconds, unit features [N, D] float32)."""
    from PIL import Image

    feats = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            x = torch.stack([preprocess(Image.open(p)) for p in paths[i : i + batch]])
            f = model.encode_image(x).float()
            feats.append(f / f.norm(dim=-1, keepdim=True))
    return time.perf_counter() - t0, torch.cat(feats)


def top_k(db: torch.Tensor, queries: torch.Tensor, paths: list[str], k: int) -> list[list[str]]:
    """Exact top-k paths of each query [Q, D] among `db` [N, D] (rows named by `paths`)."""
    scores = F.normalize(queries.float(), dim=-1) @ F.normalize(db.float(), dim=-1).t()
    return [[paths[j] for j in row] for row in scores.topk(min(k, len(paths)), dim=1).indices.tolist()]


def agreement(ref: torch.Tensor, vecs: torch.Tensor, truth: list[list[str]], found: list[list[str]]) -> dict:
    """Per-image cosine of `vecs` to the fp32 `ref` [N, D] (same row order) and recall@10 against `truth`."""
    cos = F.cosine_similarity(ref.float(), vecs.float(), dim=-1)
    recall = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(truth, found, strict=True)])
    return {"cosine_mean": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6),
            "recall_at_10": round(float(recall), 4), "queries": len(truth)}  # fmt: skip


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """fn's result with the 1-minute load average before and after it."""
    before = os.getloadavg()[0]
    out = fn()
    return out, round(before, 2), round(os.getloadavg()[0], 2)


class Bench:
    """One run's shared state: the folder, the checkpoint, the fp32 truth, and the line every record shares."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        from clip.config import get_config
        from clip.loading import save_model
        from clip.model import CLIP

        self.args, self.tmp = args, tmp
        torch.manual_seed(0)
        self.ckpt = str(tmp / "model.pt")
        save_model(CLIP(get_config(args.model)).eval(), self.ckpt)
        t0 = time.perf_counter()
        self.paths = sorted(os.path.realpath(p) for p in write_photos(tmp / "photos", args.images, seed=0))
        self.queries = sorted(
            os.path.realpath(p) for p in write_photos(tmp / "queries", args.queries, seed=1)
        )
        print(
            f"wrote {args.images} + {args.queries} photos in {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
        info = machine()
        self.common = {
            "bench": "embed_throughput", "model": f"{args.model} (random init)", "images": args.images,
            "threads": torch.get_num_threads(),
            "machine": {k: info[k] for k in ("cpu", "cores", "torch")},
        }  # fmt: skip
        self.baseline: dict[int, float] = {}  # batch size -> plain fp32 loop images/s
        self.ref: torch.Tensor | None = (
            None  # the plain fp32 loop's features [N, D], rows in self.paths order
        )
        self.truth: list[list[str]] = []

    def record(self, method: str, precision: str, seconds: float, load: list[float], workers: int,
               batch: int, agree: dict | None, **extra) -> dict:  # fmt: skip
        """One measurement's line (printed by `finish`, once the baselines of its ratios are known)."""
        return {**self.common, "method": method, "precision": precision, "batch_size": batch, "workers": workers,
                "seconds": round(seconds, 2), "images_per_second": round(self.args.images / max(seconds, 1e-9), 2),
                "agreement_with_fp32": agree,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "load_1min_before": load[0], "load_1min_after": load[1], **extra}  # fmt: skip

    def finish(self, row: dict) -> dict:
        """`row` with its ratios to the plain fp32 loop (batched, and one at a time when measured), printed."""
        rate = row["images_per_second"]
        for key, batch in (
            ("vs_plain_fp32_loop_batched", self.args.batch_size),
            ("vs_plain_fp32_loop_one_at_a_time", 1),
        ):
            row[key] = round(rate / self.baseline[batch], 3) if batch in self.baseline else None
        emit(row)
        return row

    # ------------------------------------------------------------------------------------------- the paths

    def plain(self, precision: str | None, batch: int) -> dict:
        """The plain loop; precision None = the plain fp32 model (the baseline), else optimize_for_cpu's copy."""
        import clip

        model, preprocess = clip.load(self.ckpt, device="cpu")
        model = model.eval() if precision is None else clip.optimize_for_cpu(model, precision)
        (seconds, feats), *load = timed(lambda: plain_loop(model, preprocess, self.paths, batch))
        _, q = plain_loop(model, preprocess, self.queries, self.args.batch_size)
        found = top_k(feats, q, self.paths, K)
        if precision is None and self.ref is None:
            self.ref, self.truth = feats, found
        if precision is None:
            self.baseline[batch] = self.args.images / seconds
        method = f"plain loop: clip.load + preprocess(Image.open) + encode_image, batch {batch}"
        if precision is not None:
            method += f", clip.optimize_for_cpu(model, {precision!r})"
        return self.record(method, precision or "fp32", seconds, load, 0, batch,
                           agreement(self.ref, feats, self.truth, found))  # fmt: skip

    def embed(self, precision: str) -> dict:
        """`clip embed` through run_embed, into a new output folder."""
        import clip
        from clip.collection import shards
        from clip.collection.embed import EmbedConfig, run_embed

        out = self.tmp / f"embed-{precision}"
        cfg = EmbedConfig(inputs=(str(self.tmp / "photos"),), output=str(out), model=self.ckpt,
                          batch_size=self.args.batch_size, workers=self.args.workers, precision=precision,
                          device="cpu", progress=False)  # fmt: skip
        report, *load = timed(lambda: run_embed(cfg))
        run = report["last_run"]
        assert run["embedded"] == self.args.images, report
        vecs = torch.from_numpy(shards.load_embeddings(out).astype(np.float32))
        order = [os.path.realpath(p) for p in shards.load_metadata(out, ["path"]).column("path").to_pylist()]
        vecs = vecs[torch.tensor([order.index(p) for p in self.paths])]
        model, preprocess = clip.load(self.ckpt, device="cpu")
        _, q = plain_loop(
            clip.optimize_for_cpu(model, precision), preprocess, self.queries, self.args.batch_size
        )
        return self.record("clip embed (clip.collection.embed.run_embed)", precision, run["seconds"], load,
                           self.args.workers, self.args.batch_size,
                           agreement(self.ref, vecs, self.truth, top_k(vecs, q, self.paths, K)),
                           embed_agreement_reported=(run["agreement_with_fp32"] or [None])[0])  # fmt: skip

    def index(self, precision: str) -> dict:
        """`clip index` through Index.sync, into a new index."""
        from clip.search.index import Index

        with Index.open(self.tmp / f"index-{precision}", model=self.ckpt, precision=precision) as idx:
            report, *load = timed(lambda: idx.sync(self.tmp / "photos", batch_size=self.args.batch_size,
                                                   num_workers=self.args.workers))  # fmt: skip
            assert report.added == self.args.images, report
            hits = idx.search_vectors(torch.ones(1, idx.embed_dim), k=len(idx), ann=False)[0]
            by_path = dict(
                zip((os.path.realpath(h.path) for h in hits), idx.vectors_of([h.id for h in hits]))
            )
            vecs = torch.from_numpy(np.stack([by_path[p] for p in self.paths]))
            found = [
                [os.path.realpath(h.path) for h in row]
                for row in idx.search_image(self.queries, k=K, ann=False)
            ]
            reported = idx.report()["agreement_with_fp32"]
        return self.record("clip index (Index.sync)", precision, report.seconds, load, self.args.workers,
                           self.args.batch_size, agreement(self.ref, vecs, self.truth, found),
                           index_agreement_reported=reported)  # fmt: skip


METHODS = ("plain", "plain1", "embed", "index")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000, help="photos in the folder (default 1000)")
    ap.add_argument(
        "--queries", type=int, default=100, help="held-out query photos for recall@10 (default 100)"
    )
    ap.add_argument(
        "--model", default="ViT-B/32", help="registry config, randomly initialised (default ViT-B/32)"
    )
    ap.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16", "int8"], choices=("fp32", "bf16", "int8")
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                    help="plain = the loop batched, plain1 = one image at a time, embed, index (default all)")  # fmt: skip
    ap.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass everywhere (default 32)"
    )
    ap.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (all cores)"
    )
    ap.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers of clip embed / clip index (2)"
    )
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed at the end)")
    args = ap.parse_args(argv)
    if args.images < 1 or args.queries < 1:
        ap.error("--images and --queries must be at least 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the records it printed (one per measurement)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        bench = Bench(args, Path(tmp))
        # The plain fp32 loops first: their features are the truth, their rates the baselines of every ratio.
        baselines = [bench.plain(None, args.batch_size)]
        if "plain1" in args.methods:
            baselines.append(bench.plain(None, 1))
        rows = [bench.finish(row) for row in baselines]
        for precision in args.precisions:
            if "plain" in args.methods:
                rows.append(bench.finish(bench.plain(precision, args.batch_size)))
            if "plain1" in args.methods:
                rows.append(bench.finish(bench.plain(precision, 1)))
            if "embed" in args.methods:
                rows.append(bench.finish(bench.embed(precision)))
            if "index" in args.methods:
                rows.append(bench.finish(bench.index(precision)))
    return rows


if __name__ == "__main__":
    main()
