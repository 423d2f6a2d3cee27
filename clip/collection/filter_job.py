"""The `clip filter` job: embeddings in (a `clip embed` folder, or raw inputs embedded first), kept pairs out.

OUT/kept.csv | kept.parquet | shards/00000.tar ...   the kept pairs (`--format csv|parquet|wds`)
OUT/decisions.parquet                                 every input pair: key, similarity, reason
OUT/report.json                                       settings, counts by reason, similarity histogram
OUT/similarity.png                                    the histogram (when matplotlib is installed)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from clip.collection import export, shards
from clip.collection.filter import REASONS, FilterConfig, counts, decide, histogram, plot_histogram


@dataclass(frozen=True)
class FilterJob:
    """One `clip filter` run. `inputs`: a `clip embed` output folder, or inputs for `clip embed`."""

    inputs: tuple[str, ...]
    output: str
    filters: FilterConfig
    format: str = "csv"
    model: str | None = None  # embeds raw inputs and the concept queries (default: the embeddings' model)
    embeddings: str | None = None  # where raw inputs are embedded (default OUTPUT/embeddings)
    samples_per_shard: int = 10_000
    shard_size: int = 10_000
    batch_size: int = 256
    workers: int = 4
    precision: str = "fp32"
    device: str = "auto"
    img_key: str = "filepath"
    caption_key: str = "caption"
    separator: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.format not in export.FORMATS:
            raise ValueError(f"unknown --format {self.format!r}; use one of {', '.join(export.FORMATS)}")


def is_embedding_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, shards.JOB_FILE))


def embedding_folder(job: FilterJob) -> str | None:
    """The `clip embed` folder to filter, embedding raw inputs first (with captions); None on ranks > 0."""
    from clip.collection.embed import EmbedConfig, run_embed

    if len(job.inputs) == 1 and is_embedding_folder(job.inputs[0]):
        return job.inputs[0]
    if job.model is None:
        raise ValueError("raw inputs are embedded first: pass --model (or give a `clip embed` output folder)")
    folder = job.embeddings or os.path.join(job.output, "embeddings")
    cfg = EmbedConfig(
        inputs=job.inputs, output=folder, model=job.model, shard_size=job.shard_size, batch_size=job.batch_size,
        workers=job.workers, text=True, precision=job.precision, device=job.device, img_key=job.img_key,
        caption_key=job.caption_key, separator=job.separator, progress=job.progress,
    )  # fmt: skip
    report = run_embed(cfg)
    if not report:
        return None  # another rank than 0: rank 0 filters
    if not report["complete"]:
        raise RuntimeError(f"embedding {folder} did not complete; rerun to resume")
    return folder


def query_embeddings(model_name: str, queries: tuple[str, ...], device: str) -> np.ndarray:
    """Unit-norm text embeddings [Q, D] of the concept queries, by the model that made the image embeddings."""
    import clip
    from clip.runtime import resolve_device
    from clip.score import encode_captions

    if not model_name:
        raise ValueError("concept queries need the embeddings' model: pass --model")
    model, _ = clip.load(model_name, device="cpu")
    model = model.to(resolve_device(device))
    return encode_captions(model, list(queries)).numpy()


def _pairs(meta, keep: np.ndarray, sim: np.ndarray | None) -> list[export.Pair]:
    cols = {c: meta.column(c).to_pylist() for c in ("key", "path", "tar", "caption", "width", "height")}
    return [
        export.Pair(
            cols["key"][i],
            cols["path"][i],
            cols["tar"][i],
            cols["caption"][i],
            cols["width"][i],
            cols["height"][i],
            None if sim is None else float(sim[i]),
        )  # fmt: skip
        for i in np.flatnonzero(keep)
    ]


def _write_decisions(meta, reason: np.ndarray, sim: np.ndarray | None, path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clip.io import atomic_path

    table = pa.table({
        "key": meta.column("key"),
        "tar": meta.column("tar"),
        "similarity": pa.array(sim if sim is not None else [None] * len(reason), pa.float32()),
        "reason": pa.array([REASONS[r] for r in reason], pa.string()),
    })  # fmt: skip
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def run_filter(job: FilterJob) -> dict | None:
    """Filter the pairs and write the kept ones, the decisions and the report; returns the report (None on
    ranks > 0 when the inputs were embedded under torchrun)."""
    from clip.collection.sources import require_pyarrow
    from clip.io import atomic_write_json

    require_pyarrow("clip filter's embedding shards")
    folder = embedding_folder(job)
    if folder is None:
        return None
    emb_job = shards.read_job(folder) or {}
    meta = shards.load_metadata(folder)
    image = shards.load_embeddings(folder)
    text = shards.text_embeddings(meta) if "text_emb" in meta.column_names else None
    model = job.model or emb_job.get("model")
    queries = {}
    for name, texts in (("exclude", job.filters.exclude), ("keep", job.filters.keep)):
        queries[name] = query_embeddings(model, texts, job.device) if texts else None
    captions = meta.column("caption").to_pylist()
    reason, sim = decide(image, text, captions, job.filters, queries["exclude"], queries["keep"])
    pairs = _pairs(meta, reason == 0, sim)
    os.makedirs(job.output, exist_ok=True)
    written: dict = {"format": job.format}
    if job.format == "wds":
        tars, errors = export.write_webdataset(
            pairs, os.path.join(job.output, "shards"), job.samples_per_shard
        )
        written.update(shards=len(tars), train_data=export.shard_pattern(tars), pairs=len(pairs) - len(errors),
                       errors=errors)  # fmt: skip
    else:
        path = os.path.join(job.output, f"kept.{job.format}")
        export.write_table(pairs, path, job.format)
        written.update(path=path, train_data=path, pairs=len(pairs), errors=[])
    _write_decisions(meta, reason, sim, os.path.join(job.output, "decisions.parquet"))
    report = {
        "embeddings": folder,
        "filters": asdict(job.filters),
        "counts": counts(reason),
        "output": written,
    }
    if sim is not None:
        report["similarity"] = {"mean": float(sim.mean()) if len(sim) else None, "histogram": histogram(sim)}
        png = os.path.join(job.output, "similarity.png")
        report["similarity"]["png"] = (
            png if plot_histogram(sim, reason, job.filters.min_similarity, png) else None
        )
    atomic_write_json(os.path.join(job.output, "report.json"), report)
    return report


def summary_lines(report: dict) -> list[str]:
    c = report["counts"]
    dropped = ", ".join(f"{c[r]} {r.replace('_', ' ')}" for r in REASONS[1:] if c[r])
    out = report["output"]
    lines = [f"kept {c['kept']} of {c['total']} pairs" + (f" (dropped: {dropped})" if dropped else "")]
    lines.append(f"wrote {out['pairs']} pairs: clip train --train-data '{out['train_data']}'")
    lines += [f"  skipped {e['key']}: {e['error']}" for e in out["errors"][:20]]
    return lines
