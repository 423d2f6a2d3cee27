"""`clip index --from-embeddings DIR --index IDX`: build an `EmbeddingsIndex` from `clip embed` shards.

Nothing is embedded again and nothing is held whole in memory: metadata is streamed shard by shard into one
memory-mappable Arrow file, caption embeddings into one float16 `.npy`, and the IVF indexes are trained on a
sample and filled chunk by chunk from the memory-mapped shards (`clip.search.ivf`), with codes chosen to fit
`max_index_memory`.  The model is the embed job's (or `model`), named by its identity; a few of the job's
images are embedded again and must reproduce their stored vectors, so a wrong model is refused at once.
Each file is written atomically under a new token and the manifest, written last, switches to them: a killed
build leaves the previous index as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip.io import atomic_path, atomic_write_json
from clip.search.ann import TARGET_RECALL, faiss_available
from clip.search.embindex import FORMAT_VERSION, MANIFEST, path_hash, read_manifest
from clip.search.encoder import Encoder, as_encoder
from clip.search.store import DB_NAME, THUMB_DIR, shard_problem
from clip.search.vectors import ShardedVectors

DEFAULT_MAX_INDEX_MEMORY = 16 * 1024**3
ANN_MIN = 100_000  # as `clip.search.index.ANN_THRESHOLD`: below, an exact scan is fast enough
MAX_SKIPPED_LISTED = 1000
CHECK_SAMPLES = 4
MIN_COSINE = {"fp32": 0.99}  # float16 storage and oneDNN kernels; other precisions agree to ~0.98
MIN_COSINE_LOW_PRECISION = 0.95
META_COLUMNS = ("key", "path", "tar", "caption", "width", "height")
STAT_THREADS = 16


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _job_shards(source: Path, dim: int) -> tuple[list[dict], list[dict]]:
    """(shards with rows > 0: name, rows, bytes, mtime_ns; every input the job skipped) of complete chunks."""
    from clip.collection import shards

    found, skipped = [], []
    for status in shards.chunk_statuses(source):
        name = shards.chunk_name(status["unit"], status["chunk"])
        skipped += status["errors"]
        if status["embedded"] == 0:
            continue
        path = source / shards.EMB_DIR / f"{name}.npy"
        problem = shard_problem(path, status["embedded"], dim)
        if problem is not None:
            raise ValueError(f"embedding shard {path} {problem}; rerun `clip embed` into {source} to redo it")
        st = path.stat()
        found.append(
            {"name": name, "rows": status["embedded"], "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        )
    return found, skipped


def _encoder_for(job: dict, model: Any, device: str) -> Encoder:
    spec = model if model is not None else job["model"]
    looks_like_file = isinstance(spec, (str, os.PathLike)) and (
        os.path.isabs(spec) or str(spec).endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    )
    if looks_like_file and not os.path.exists(spec):
        raise FileNotFoundError(
            f"the embed job's model {str(spec)!r} is not there (relative to {os.getcwd()!r}); pass its "
            "current path with --model"
        )
    return as_encoder(spec, device)


def check_model(encoder: Encoder, source: Path, first_shard: str, vectors: np.ndarray, precision: str) -> str:
    """Embed the first few samples of the job again; raise unless they match their stored vectors.

    Returns a line saying what was checked (or that nothing could be: files moved, shards gone)."""
    import pyarrow.parquet as pq

    from clip.collection.sources import Sample, decode, tar_samples
    from clip.search.index import ModelMismatchError

    meta = pq.read_table(source / "metadata" / f"{first_shard}.parquet", columns=["key", "path", "tar"])
    pixels, rows = [], []
    tar_cache: dict[str, dict[str, Sample]] = {}
    for row, (key, path, tar) in enumerate(
        zip(*(meta.column(c).to_pylist() for c in ("key", "path", "tar")))
    ):
        if len(rows) == CHECK_SAMPLES or row >= len(vectors):
            break
        if path:
            sample = Sample(key, row, path=path)
        elif tar and os.path.isfile(tar):
            if tar not in tar_cache:
                tar_cache[tar] = {}
                for s in tar_samples(tar):
                    tar_cache[tar][s.key] = s
                    if len(tar_cache[tar]) >= 4 * CHECK_SAMPLES:
                        break
            sample = tar_cache[tar].get(key)
            if sample is None:
                continue
        else:
            continue
        out = decode(sample, encoder.preprocess)
        if not isinstance(out, str):
            pixels.append(out.pixels)
            rows.append(row)
    if not rows:
        return "model check skipped: none of the first samples could be read again (moved?)"
    fresh = encoder.encode_pixels(torch.stack(pixels)).numpy()
    stored = vectors[rows].astype(np.float32)
    cosine = float((fresh * stored).sum(1).min())
    need = MIN_COSINE.get(precision, MIN_COSINE_LOW_PRECISION)
    if cosine < need:
        raise ModelMismatchError(
            f"model {encoder.describe()!r} does not reproduce the embeddings in {source} (cosine {cosine:.3f} "
            f"on {len(rows)} images, {need} needed): pass the model the embed job used with --model"
        )
    return f"model check: {len(rows)} images embedded again agree with the shards (min cosine {cosine:.5f})"


def _stat(path: str | None) -> tuple[int, int]:
    if not path:
        return -1, -1
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return (st.st_size, st.st_mtime_ns) if not os.path.isdir(path) else (-1, -1)


def minimal_roots(folders: set[str]) -> list[str]:
    """The folders of `folders` not inside another one of them, sorted."""
    out: list[str] = []
    for f in sorted(folders):
        if not any(f == r or f.startswith(r.rstrip(os.sep) + os.sep) for r in out):
            out.append(f)
    return out


def write_rows(source: Path, root: Path, token: str, shard_list: list[dict], dim: int, captions: bool,
               log: Callable[[str], None]) -> dict:  # fmt: skip
    """Stream the metadata (with stats), the path table and the caption vectors into `root`; returns the
    file names and the roots (folders holding the indexed files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clip.collection.shards import text_embeddings

    n = sum(s["rows"] for s in shard_list)
    names = {"metadata": f"metadata-{token}.arrow", "paths": f"paths-{token}.npy"}
    if captions:
        names["captions"] = f"captions-{token}.npy"
    schema = pa.schema([("key", pa.string()), ("path", pa.string()), ("tar", pa.string()),
                        ("caption", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                        ("size", pa.int64()), ("mtime_ns", pa.int64()), ("frame_time", pa.float64())])  # fmt: skip
    hashes = np.empty(n, dtype=np.int64)
    folders: dict[str, str] = {}
    start = 0
    with contextlib.ExitStack() as stack:
        meta_tmp = stack.enter_context(atomic_path(root / names["metadata"]))
        sink = stack.enter_context(pa.OSFile(str(meta_tmp), "wb"))
        writer = stack.enter_context(pa.ipc.new_file(sink, schema))
        pool = stack.enter_context(ThreadPoolExecutor(STAT_THREADS))
        text = None
        if captions:
            cap_tmp = stack.enter_context(atomic_path(root / names["captions"]))
            text = np.lib.format.open_memmap(cap_tmp, mode="w+", dtype=np.float16, shape=(n, dim))
        for i, s in enumerate(shard_list):
            cols = [*META_COLUMNS, "text_emb"] if captions else list(META_COLUMNS)
            part = source / "metadata" / f"{s['name']}.parquet"
            has_time = "frame_time" in pq.read_schema(part).names  # shards from before videos have none
            table = pq.read_table(part, columns=[*cols, "frame_time"] if has_time else cols)
            if table.num_rows != s["rows"]:
                raise ValueError(f"{source}/metadata/{s['name']}.parquet has {table.num_rows} rows for "
                                 f"{s['rows']} embeddings; rerun `clip embed` into {source}")  # fmt: skip
            paths = table.column("path").to_pylist()
            stats = list(pool.map(_stat, paths, chunksize=256))
            for p, (size, _) in zip(paths, stats, strict=True):
                if size >= 0:
                    d = os.path.dirname(p)
                    if d not in folders:
                        folders[d] = os.path.realpath(d)
            hashes[start : start + len(paths)] = [path_hash(p) if p else 0 for p in paths]
            arrays = [table.column(c).combine_chunks().cast(schema.field(c).type) for c in META_COLUMNS]
            arrays += [
                pa.array([a for a, _ in stats], pa.int64()),
                pa.array([b for _, b in stats], pa.int64()),
                table.column("frame_time").combine_chunks().cast(pa.float64())
                if has_time
                else pa.nulls(table.num_rows, pa.float64()),  # a video frame's time: hits are (file, time)
            ]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            if text is not None:
                text[start : start + len(paths)] = text_embeddings(table)
            start += len(paths)
            if (i + 1) % 100 == 0:
                log(f"metadata: {start:,} of {n:,} rows")
        if text is not None:
            text.flush()
            del text
    order = np.argsort(hashes, kind="stable")
    table = np.stack([hashes[order], order.astype(np.int64)])  # [2, N]: each row contiguous for searchsorted
    with atomic_path(root / names["paths"]) as tmp, open(tmp, "wb") as f:
        np.save(f, table)
    return {"files": names, "roots": minimal_roots(set(folders.values()))}


def add_ivf(root: Path, manifest: dict, vectors: ShardedVectors, captions: ShardedVectors | None,
            encoder: Encoder, *, max_index_memory: int | None = None, target_recall: float = TARGET_RECALL,
            log: Callable[[str], None] = _stderr) -> dict:  # fmt: skip
    """Build the IVF index of the images (and of the captions), record them in the manifest; returns it."""
    from clip.search.ann import TUNING_SUBJECTS, probe_queries
    from clip.search.ivf import build_ivf, choose_codes, format_bytes

    budget = max_index_memory or manifest.get("max_index_memory") or DEFAULT_MAX_INDEX_MEMORY
    counts = [len(vectors)] + ([len(captions)] if captions is not None else [])
    code = choose_codes(counts, vectors.dim, budget)
    text_q = encoder.encode_texts([f"a photo of {s}" for s in TUNING_SUBJECTS]).numpy()
    _, img_sample = vectors.sample(100, seed=1)
    token = os.urandom(6).hex()
    ann = {}
    for target, vecs in (("images", vectors), ("captions", captions)):
        if vecs is None:
            continue
        # Text prompts, and perturbed stored vectors of the target (images) or image vectors (captions).
        like = probe_queries(img_sample if target == "captions" else vecs.sample(100, seed=2)[1], 100)
        log(f"{target}: building the IVF index ({code.name}, budget {format_bytes(budget)})")
        ivf, info = build_ivf(vecs, code, queries=np.concatenate([text_q, like]), target_recall=target_recall,
                              log=lambda s, t=target: log(f"{t}: {s}"))  # fmt: skip
        info["file"] = f"{target}-{token}.faiss"
        ivf.save(root / info["file"])
        ann[target] = info
        log(f"{target}: {info['codes']} nlist {info['nlist']} nprobe {info['nprobe']} recall@10 {info['recall']:.3f}, "
            f"{format_bytes(info['bytes'])} in memory")  # fmt: skip
    manifest = {**manifest, "ann": ann, "max_index_memory": budget}
    _commit(root, manifest)
    return manifest


def _commit(root: Path, manifest: dict) -> None:
    """Write the manifest, then delete every tokened file it does not name (a previous build's, a killed one's)."""
    atomic_write_json(root / MANIFEST, manifest)
    keep = set(manifest["files"].values()) | {a["file"] for a in (manifest.get("ann") or {}).values()}
    for f in root.iterdir():
        if (
            f.is_file()
            and f.name != MANIFEST
            and f.name not in keep
            and f.suffix in (".arrow", ".npy", ".faiss")
        ):
            f.unlink(missing_ok=True)


def build_from_embeddings(
    source: str | os.PathLike,
    index: str | os.PathLike,
    *,
    model: Any = None,
    device: str = "cpu",
    ann: str = "auto",
    max_index_memory: int = DEFAULT_MAX_INDEX_MEMORY,
    captions: bool = True,
    target_recall: float = TARGET_RECALL,
    log: Callable[[str], None] = _stderr,
) -> dict:
    """Build (or rebuild) the index `index` over the complete shards of the embed job in `source`.

    ann: "auto" (IVF from ANN_MIN vectors, when faiss is installed), "always" or "never". captions: index the
    caption embeddings too when the job has them (`clip embed --text`). Returns the manifest.
    """
    from clip.collection import shards
    from clip.search.ivf import choose_codes

    source, root = Path(source).resolve(), Path(index)
    job = shards.read_job(source)
    if job is None:
        raise FileNotFoundError(f"{str(source)!r} is not the output of `clip embed` (no {shards.JOB_FILE})")
    if (root / DB_NAME).exists():
        raise ValueError(
            f"{str(root)!r} holds an index of a folder (`clip index PHOTOS`); choose a new --index"
        )
    if root.resolve() == source or source in root.resolve().parents:
        raise ValueError(f"--index {str(root)!r} lies inside the embeddings folder; choose another folder")
    if (root / MANIFEST).exists():
        read_manifest(root)  # a damaged or other-format manifest fails here, before any work
    dim = int(job["embed_dim"])
    shard_list, skipped = _job_shards(source, dim)
    if not shard_list:
        raise ValueError(f"{source} holds no finished embedding shards; run `clip embed` into it first")
    captions = bool(captions and job.get("text"))
    n = sum(s["rows"] for s in shard_list)
    want_ann = ann == "always" or (ann == "auto" and n >= ANN_MIN and faiss_available())
    if want_ann:  # fail on the budget before any long work
        choose_codes([n] + ([n] if captions else []), dim, max_index_memory)
    encoder = _encoder_for(job, model, device)
    if encoder.embed_dim != dim:
        raise ValueError(
            f"model {encoder.describe()!r} makes {encoder.embed_dim}-d vectors, the shards hold {dim}-d"
        )
    vectors = ShardedVectors([source / shards.EMB_DIR / f"{s['name']}.npy" for s in shard_list], dim)
    log(check_model(encoder, source, shard_list[0]["name"], vectors.rows(np.arange(min(n, 64))),
                    job.get("precision", "fp32")))  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    token = os.urandom(6).hex()
    log(f"indexing {n:,} embeddings from {len(shard_list)} shards of {source}")
    written = write_rows(source, root, token, shard_list, dim, captions, log)
    manifest = {
        "format": FORMAT_VERSION, "kind": "embeddings", "source": str(source), "job": job,
        "model_spec": encoder.spec or "", "model_identity": encoder.identity, "embed_dim": dim,
        "precision": job.get("precision", "fp32"), "count": n, "shards": shard_list, **written,
        "skipped": [{"key": e.get("key"), "error": e.get("error")} for e in skipped[:MAX_SKIPPED_LISTED]],
        "skipped_count": len(skipped), "ann": {}, "max_index_memory": max_index_memory,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    _commit(root, manifest)
    if (root / THUMB_DIR).is_dir():  # thumbnails are named by file state; the new build starts afresh
        for f in (root / THUMB_DIR).iterdir():
            f.unlink(missing_ok=True)
    if want_ann:
        text = ShardedVectors([root / written["files"]["captions"]], dim) if captions else None
        manifest = add_ivf(root, manifest, vectors, text, encoder, target_recall=target_recall, log=log)
    elif n >= ANN_MIN:
        log(
            "warning: no IVF index (faiss is not installed or --ann never): searches scan all vectors on disk"
        )
    return manifest
