"""Search benchmarks, printed as JSON lines (one per measurement).

    python benchmarks/bench_search.py index  [--images 2000 --model ViT-B/32]   # indexing throughput
    python benchmarks/bench_search.py query  [--sizes 10000 100000 1000000]     # query latency, memory, recall
    python benchmarks/bench_search.py large  --n 10000000 --dir /work/bench   # clip index --from-embeddings

`index`: images/s embedding a folder of JPEG photos (640x480) with `Index.sync` (DataLoader workers, batches)
against the plain loop users write: `clip.load`, then `preprocess(Image.open(p))` and `encode_image` one image at
a time.  Both use the same randomly initialised model (no download) and the same threads.

`query`: latency of one query against N random 512-d unit vectors (clustered, as embeddings are: a Gaussian
mixture; `--distribution uniform` for structureless vectors), exact (float16 scan) vs FAISS IVF-SQ8 (nprobe
tuned for recall@10 >= 0.95 at build), with the memory each holds and FAISS's recall@10 on fresh queries (nprobe is tuned on other queries).

`large`: the `clip index --from-embeddings` path at 10^7 vectors.  The clustered vectors are written in chunks
as the shards of a `clip embed` job (float16 `.npy` of 10^6 rows plus Parquet metadata: 10 GB at 10^7 x 512,
never all in memory; N shrinks to what the disk holds), indexed with `build_from_embeddings` (IVF codes chosen
for `--max-index-memory`, 2G: PQ128), and queried through `EmbeddingsIndex.search_vectors` (FAISS candidates
rescored from the memory-mapped shards): latency, recall@10 against an exact chunked scan on fresh queries,
and memory (the IVF index, the process's anonymous and file-backed RSS).  The timing waits for a 1-minute load
average below `--max-load` (3) and records it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------------------------ indexing


def write_photos(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n photo-like JPEGs (smooth colour fields with texture, 640x480, ~30-60 kB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((640, 480), Image.Resampling.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i // 500:02d}" / f"photo{i:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(path, quality=88)
        paths.append(str(path))
    return paths


def plain_loop(ckpt: str, paths: list[str]) -> float:
    """The loop from openai/CLIP's README, one image at a time; returns seconds."""
    from PIL import Image

    import clip

    model, preprocess = clip.load(ckpt, device="cpu")
    t0 = time.perf_counter()
    feats = []
    with torch.no_grad():
        for p in paths:
            x = preprocess(Image.open(p)).unsqueeze(0)
            f = model.encode_image(x)
            feats.append(f / f.norm(dim=-1, keepdim=True))
    return time.perf_counter() - t0


def bench_index(args: argparse.Namespace) -> None:
    from clip.config import get_config
    from clip.loading import save_model
    from clip.model import CLIP
    from clip.search.index import Index

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        ckpt = str(tmp / "model.pt")
        save_model(CLIP(get_config(args.model)).eval(), ckpt)
        t0 = time.perf_counter()
        paths = write_photos(tmp / "photos", args.images)
        print(f"wrote {len(paths)} photos in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        # machine() is read after each run: its load average covers that run.
        common = {"bench": "index_throughput", "model": args.model, "images": len(paths)}

        seconds = plain_loop(ckpt, paths)
        emit({**common, "machine": machine(), "method": "plain loop: clip.load + preprocess + encode_image, batch 1",
              "seconds": round(seconds, 2), "images_per_second": round(len(paths) / seconds, 2)})  # fmt: skip
        baseline = len(paths) / seconds

        idx = Index.open(tmp / "idx", model=ckpt)
        report = idx.sync(tmp / "photos", batch_size=args.batch_size, num_workers=args.workers)
        assert report.added == len(paths), report
        emit({**common, "machine": machine(), "method": f"clip index (Index.sync): batch {args.batch_size}, "
              f"{args.workers if args.workers is not None else 'default'} decoding workers, hashing + storage included",
              "seconds": round(report.seconds, 2), "images_per_second": round(report.images_per_second, 2),
              "speedup": round(report.images_per_second / baseline, 2)})  # fmt: skip


# -------------------------------------------------------------------------------------------------- query


def random_vectors(n: int, dim: int, distribution: str, seed: int, clusters: int = 1) -> np.ndarray:
    """Unit vectors float32 [n, dim], uniform on the sphere or a Gaussian mixture resembling embeddings.

    clustered: `clusters` centres (fixed, whatever the seed) that share a common direction, as embeddings of one
    model do (cosine ~0.5 between centres), each sample a centre plus Gaussian noise of norm 1.4: clusters
    overlap, a random pair has cosine ~0.17 and a query's 10th neighbour ~0.33 at 10^5.
    """
    rng = np.random.default_rng(seed)
    centres = None
    if distribution == "clustered":
        fixed = np.random.default_rng(12345)
        common = fixed.standard_normal(dim).astype(np.float32)
        centres = fixed.standard_normal((clusters, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        centres += common / np.linalg.norm(common)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks, to bound temporary memory
        m = min(100_000, n - start)
        block = rng.standard_normal((m, dim), dtype=np.float32)
        if centres is not None:
            block *= np.float32(1.4 / np.sqrt(dim))
            block += centres[rng.integers(0, len(centres), m)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + m] = block
    return out


def timed(fns: dict, queries: torch.Tensor, repeats: int = 3) -> dict:
    """Run each fn on each query alone, interleaved (so a burst of load on this shared machine hits every
    method alike), best of `repeats` per query; returns {name: (results, per-query milliseconds)}."""
    out = {name: ([], []) for name in fns}
    for fn in fns.values():
        fn(queries[:1])  # warm-up
    for i in range(queries.shape[0]):
        for name, fn in fns.items():
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                result = fn(queries[i : i + 1])[0]
                best = min(best, (time.perf_counter() - t0) * 1000)
            out[name][0].append(result)
            out[name][1].append(best)
    return out


def stats(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ordered[int(0.95 * (len(ms) - 1))], 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def bench_query_size(n: int, args: argparse.Namespace) -> None:
    from clip.search import ann as ann_mod
    from clip.search.topk import search_exact

    dim, k = args.dim, 10
    t0 = time.perf_counter()
    clusters = max(10, n // 200)  # ~200 vectors per cluster
    vectors = random_vectors(n, dim, args.distribution, seed=0, clusters=clusters).astype(np.float16)
    queries = torch.from_numpy(
        random_vectors(args.queries, dim, args.distribution, seed=1, clusters=clusters)
    )
    print(f"n={n}: data in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    mat = torch.from_numpy(vectors)
    common = {"bench": "query_latency", "n": n, "dim": dim, "k": k, "distribution": args.distribution,
              "queries": args.queries, "machine": machine()}  # fmt: skip

    exact_fn = lambda q: search_exact(mat, q, k)  # noqa: E731
    t0 = time.perf_counter()
    batch = search_exact(mat, queries, k)
    batch_ms = (time.perf_counter() - t0) * 1000 / args.queries
    fns = {"exact": exact_fn}
    info = None
    if ann_mod.faiss_available():
        ids = np.arange(n, dtype=np.int64)
        # Tuned on other queries from the same distribution (as Index.build_ann tunes on prompts it writes).
        tuning = random_vectors(100, dim, args.distribution, seed=2, clusters=clusters)
        ann, info = ann_mod.build(vectors, ids, target_recall=0.95, nlist=args.nlist, queries=tuning)
        row_of = ann_mod.row_lookup(ids)
        fns["faiss"] = lambda q: ann_mod.ann_topk(ann, mat, row_of, q, k)
    runs = timed(fns, queries)
    common["machine"] = machine()  # the load average over the timed runs
    exact, ms = runs["exact"]
    assert [r[0].tolist() for r in batch] == [r[0].tolist() for r in exact]
    emit({**common, "method": "exact (float16 scan, float64 rescoring)", **stats(ms),
          "batch_per_query_ms": round(batch_ms, 2), "index_bytes": vectors.nbytes})  # fmt: skip
    if info is None:
        emit({**common, "method": "faiss", "skipped": "faiss not installed"})
        return
    found, ms = runs["faiss"]
    recall = np.mean([len(np.intersect1d(f[0], e[0])) / k for f, e in zip(found, exact, strict=True)])
    emit({**common, "method": f"faiss IVF{info['nlist']},SQ8 nprobe {info['nprobe']} + exact rescoring", **stats(ms),
          "recall_at_10": round(float(recall), 4), "build_recall_at_10": round(info["recall"], 4),
          "build_seconds": round(info["build_seconds"], 1), "index_bytes": ann.nbytes,
          "plus_stored_vectors_bytes": vectors.nbytes})  # fmt: skip


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _memory() -> dict:
    return {k: round(_status_kb(k) / 1024, 1) for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


def write_fake_job(out: Path, n: int, dim: int, shard_rows: int) -> None:
    """A `clip embed` output of n clustered vectors (keys without files), written shard by shard."""
    from clip.collection import shards

    clusters = max(10, n // 200)
    done = shards.scan_status(out).chunks
    for u, start in enumerate(range(0, n, shard_rows)):
        if (u, 0) in done:
            continue  # resumable, like clip embed
        m = min(shard_rows, n - start)
        part = np.empty((m, dim), dtype=np.float16)
        for s in range(0, m, 100_000):  # 100k rows at a time: bounded memory
            part[s : s + 100_000] = random_vectors(min(100_000, m - s), dim, "clustered", seed=1000 + u * 1000 + s // 100_000,
                                                   clusters=clusters)  # fmt: skip
        rows = list(range(start, start + m))
        data = shards.ChunkData(part, [f"{r:09d}" for r in rows], [None] * m, ["synthetic.tar"] * m, [""] * m,
                                [0] * m, [0] * m, rows)  # fmt: skip
        shards.write_chunk(out, u, 0, data, m, [])
        shards.write_unit_done(out, u, 1)
        print(f"wrote shard {u} ({start + m:,} of {n:,})", file=sys.stderr, flush=True)
    job = {"format": 1, "model": "random", "embed_dim": dim, "text": False, "precision": "fp32"}
    (out / shards.JOB_FILE).write_text(json.dumps(job))


def _fit_to_disk(n: int, dim: int, folder: Path) -> int:
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    need = lambda m: m * dim * 2 * 1.2 + 4 * 1024**3  # noqa: E731 - vectors, metadata, IVF file, headroom
    while n > 100_000 and need(n) > free:
        n //= 2
    return n


def bench_large(args: argparse.Namespace) -> None:
    from clip.config import get_config
    from clip.model import CLIP
    from clip.search.embbuild import _commit, build_from_embeddings
    from clip.search.embindex import EmbeddingsIndex
    from clip.search.encoder import Encoder
    from clip.search.ivf import build_ivf, choose_codes, parse_size
    from clip.search.vectors import search_exact_sharded

    folder = Path(args.dir)
    n = _fit_to_disk(args.n, args.dim, folder)
    if n != args.n:
        print(f"not enough disk for {args.n:,} vectors: using {n:,}", file=sys.stderr)
    emb, idx_dir = folder / f"emb-{n}", folder / f"idx-{n}"
    t0 = time.perf_counter()
    write_fake_job(emb, n, args.dim, args.shard_rows)
    gen_s = time.perf_counter() - t0
    # A random model with the vectors' width stands in for the embed job's (its identity is recorded).
    encoder = Encoder(CLIP(get_config("ViT-Tiny/8@32px").replace(embed_dim=args.dim)).eval(), lambda im: im)
    budget = parse_size(args.max_index_memory)
    t0 = time.perf_counter()
    manifest = build_from_embeddings(emb, idx_dir, model=encoder, ann="never", max_index_memory=budget)
    meta_s = time.perf_counter() - t0
    index = EmbeddingsIndex(idx_dir, manifest, encoder, "cpu")
    clusters = max(10, n // 200)
    # Tuned on queries from the vectors' distribution (as the folder benchmark), tested on other ones.
    tuning = random_vectors(100, args.dim, "clustered", seed=2, clusters=clusters)
    code = choose_codes([n], args.dim, budget)
    ivf, info = build_ivf(
        index.vectors, code, queries=tuning, log=lambda s: print(s, file=sys.stderr, flush=True)
    )
    info["file"] = "images-bench.faiss"
    ivf.save(idx_dir / info["file"])
    manifest = {**manifest, "ann": {"images": info}}
    _commit(idx_dir, manifest)
    del ivf
    index = EmbeddingsIndex(idx_dir, manifest, encoder, "cpu")
    queries = torch.from_numpy(random_vectors(args.queries, args.dim, "clustered", seed=1, clusters=clusters))
    deadline = time.monotonic() + args.wait_for_load  # the exact scan and the queries are timed
    while os.getloadavg()[0] >= args.max_load and time.monotonic() < deadline:
        time.sleep(30)
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    truth = search_exact_sharded(index.vectors, queries, 10)
    exact_batch_ms = (time.perf_counter() - t0) * 1000
    index.search_vectors(queries[:1], k=10)  # loads the IVF index
    mem_loaded = _memory()
    ms, found = [], []
    for i in range(args.queries):
        best = float("inf")
        for _ in range(3):
            t1 = time.perf_counter()
            hits = index.search_vectors(queries[i : i + 1], k=10)[0]
            best = min(best, (time.perf_counter() - t1) * 1000)
        ms.append(best)
        found.append([h.id for h in hits])
    recall = float(
        np.mean([len(set(f) & set(t[0].tolist())) / 10 for f, t in zip(found, truth, strict=True)])
    )
    emit({"bench": "from_embeddings_large", "n": n, "requested_n": args.n, "dim": args.dim, "k": 10,
          "method": f"IVF{info['nlist']},{info['codes']} nprobe {info['nprobe']} x{info['candidates_factor']} "
                    "candidates + exact rescoring from mmap", **stats(ms), "recall_at_10": round(recall, 4),
          "build_recall_at_10": info["recall"], "index_bytes": info["bytes"], "budget_bytes": budget,
          "vectors_on_disk_bytes": index.vectors.nbytes, "memory_mb_after_load": mem_loaded,
          "memory_mb_after_queries": _memory(), "exact_scan_per_query_ms": round(exact_batch_ms / args.queries, 1),
          "generate_seconds": round(gen_s, 1), "metadata_seconds": round(meta_s, 1),
          "ivf_build_seconds": info["build_seconds"], "load_before_timing": load_before,
          "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("index", help="indexing throughput")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--model", default="ViT-B/32", help="a registered config (random weights)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    q = sub.add_parser("query", help="query latency, memory and recall")
    q.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    q.add_argument("--dim", type=int, default=512)
    q.add_argument("--queries", type=int, default=100)
    q.add_argument("--nlist", type=int, default=None)
    q.add_argument("--distribution", choices=("clustered", "uniform"), default="clustered")
    g = sub.add_parser("large", help="clip index --from-embeddings at 10^7 vectors")
    g.add_argument("--n", type=int, default=10_000_000)
    g.add_argument("--dim", type=int, default=512)
    g.add_argument(
        "--dir", required=True, help="folder for the shards and the index (~1.2 x n x dim x 2 bytes)"
    )
    g.add_argument("--shard-rows", type=int, default=1_000_000)
    g.add_argument("--max-index-memory", default="2G")
    g.add_argument("--queries", type=int, default=100)
    g.add_argument("--max-load", type=float, default=3.0)
    g.add_argument("--wait-for-load", type=float, default=3600, help="seconds to wait for the load to drop")
    args = parser.parse_args()
    if args.what == "index":
        bench_index(args)
    elif args.what == "large":
        bench_large(args)
    else:
        for n in args.sizes:
            bench_query_size(n, args)


if __name__ == "__main__":
    main()
