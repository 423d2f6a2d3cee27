"""`Index`: a folder of images embedded by one CLIP model, searchable by text or by image.

    import clip
    idx = clip.Index.open("photos.idx", model="ViT-B/32")   # creates the index on first use
    idx.sync("~/Pictures")                                   # embed new / changed files, drop deleted ones
    for hit in idx.search_text("a dog on a beach", k=10):
        print(f"{hit.score:.3f} {hit.path}")

Updates are incremental (a file is re-embedded only when its size or mtime changed *and* its SHA-256 differs)
and crash-safe (see `clip.search.store`).  An index records its model's identity (`clip.search.encoder`) and
refuses to be extended or queried with another model.  Search is exact by default; with an approximate FAISS
index present (built by `build_ann`, automatically by `clip index` above `ANN_THRESHOLD` vectors) it is used
for large indexes, with the files added since it was built searched exactly on the side.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip.collection.video import VideoOptions
from clip.files import is_video_name
from clip.search import ann as ann_mod
from clip.search.embindex import is_embeddings_index
from clip.search.encoder import Encoder, adopt_precision, as_encoder, check_precision, recorded_precision
from clip.search.hits import Hit
from clip.search.index_ann import AnnSearch, _Loaded
from clip.search.report import IndexReport
from clip.search.scan import Job, default_workers, make_loader, relative_to, resolve_paths, scan_images
from clip.search.store import DB_NAME, SHARD_TARGET_ROWS, THUMB_DIR, FileRecord, Store
from clip.search.topk import search_exact

# Above this many vectors an exact scan costs more than ~25 ms per query on a 2-core CPU (see docs/search.md),
# so `clip index` builds an approximate index and searches use it.
ANN_THRESHOLD = 100_000
COMPACT_EVERY = 256  # commits between shard merges during a run
ANN_STALE_FRACTION = 0.1  # rebuild once this share of vectors was added or deleted since the last build


class ModelMismatchError(ValueError):
    """The model given is not the one whose embeddings the index holds."""


class Index(AnnSearch):
    """An image index on disk.  Use `Index.open`; safe to share between threads (searches are serialised).

    `Index.open` on a folder made by `clip index --from-embeddings` returns an `EmbeddingsIndex`
    (`clip.search.embindex`), which has the same reading API.
    """

    kind = "folder"
    has_captions = False

    def __init__(self, store: Store, encoder: Encoder | None, device: str | torch.device) -> None:
        self._store = store
        self._encoder = encoder
        self._device = device
        self._lock = threading.RLock()
        self._loaded: _Loaded | None = None

    # ------------------------------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        model: Any = None,
        *,
        device: str | torch.device = "cpu",
        create: bool = True,
        precision: str | None = None,
    ) -> Index:
        """Open the index at `path`, creating it when `model` is given (and `create`) and the folder holds none.

        model: a model name or checkpoint path (as `clip.load` takes), a `(model, preprocess)` pair, an
        `Encoder`, or None to use the model recorded in the index (loaded when first needed).
        Raises ModelMismatchError if `model` differs from the index's model (weights, config, preprocessing).
        precision: how vectors are computed (`clip.search.encoder`); None = the index's own (fp32 when new).
        """
        root = Path(path)
        if is_embeddings_index(root):  # built by `clip index --from-embeddings`: the same reading API
            from clip.search.embindex import EmbeddingsIndex

            return EmbeddingsIndex.open(root, model, device=device)  # type: ignore[return-value]
        if not (root / DB_NAME).exists() and (model is None or not create):
            raise FileNotFoundError(
                f"no index at {str(root)!r}; create one with `clip index PHOTOS --index {root} --model M` "
                "or Index.open(path, model=...)"
            )
        encoder = as_encoder(model, device, precision) if model is not None else None
        store = Store(root, create=encoder is not None)
        try:
            if store.get_meta("model_identity") is None and encoder is None:
                raise ValueError(
                    f"index {str(root)!r} records no model; open it with model=... to initialise it"
                )
            if encoder is not None:
                encoder = adopt_precision(encoder, store, precision or getattr(model, "precision", None))
                _check_identity(store, encoder, claim=True)
            elif precision is not None:
                check_precision(store, precision)
        except BaseException:
            store.close()
            raise
        return cls(store, encoder, device)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def root(self) -> Path:
        return self._store.root

    @property
    def model_identity(self) -> str:
        return self._store.get_meta("model_identity") or ""

    @property
    def model_spec(self) -> str:
        return self._store.get_meta("model_spec") or ""

    @property
    def embed_dim(self) -> int:
        return int(self._store.get_meta("embed_dim") or 0)

    @property
    def encoder(self) -> Encoder:
        """The index's model, loaded from the recorded spec on first use and checked against the identity."""
        with self._lock:
            if self._encoder is None:
                spec = self.model_spec
                if not spec:
                    raise ValueError(
                        f"index {str(self.root)!r} was built with a model held in memory; pass it again: "
                        "Index.open(path, model=(model, preprocess))"
                    )
                encoder = Encoder.load(spec, self._device, recorded_precision(self._store) or "fp32")
                if encoder.identity != self.model_identity:
                    raise ModelMismatchError(
                        f"the model at {spec!r} changed since index {str(self.root)!r} was built (identity "
                        f"{encoder.identity[:12]}, index has {self.model_identity[:12]}); rebuild the index"
                    )
                self._encoder = encoder
            return self._encoder

    def __len__(self) -> int:
        return self._store.count()

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._store.has_path(path)

    def file_info(self, path: str) -> FileRecord | None:
        """The stored record of `path` (exactly as indexed: absolute), or None if it is not in the index."""
        return self._store.file_info(path)

    def errors(self) -> list[tuple[str, str]]:
        """(path, message) of every file that could not be read, sorted by path."""
        return self._store.errors()

    def frame_times(self, path: str) -> list[float]:
        """Times (seconds) of the indexed frames of the video `path` (exactly as indexed), in order."""
        return self._store.frame_times(path)

    def vectors_of(self, ids: Sequence[int], target: str = "images") -> np.ndarray:
        """float32 [len(ids), D] stored vectors of `ids` (`Hit.id`); zeros for ids no longer indexed."""
        if target != "images":
            raise ValueError(f"index {str(self.root)!r} holds images only, not {target!r}")
        with self._lock:
            loaded = self._load()
            if loaded.row_of is None:
                loaded.row_of = ann_mod.row_lookup(loaded.snap.vec_ids)
            rows = loaded.row_of(np.asarray(ids, dtype=np.int64))
            out = np.zeros((len(rows), self.embed_dim), dtype=np.float32)
            out[rows >= 0] = loaded.snap.vectors[rows[rows >= 0]]
        return out

    def metadata(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        """{"path", "width", "height"} of the files holding the vectors `ids` (`Hit.id`), None where gone;
        a video frame's also has "time" (seconds)."""
        found = self._store.records_by_vec_id([int(i) for i in ids])
        return [
            {"path": r.path, "width": r.width, "height": r.height, **({"time": r.time} if r.is_video else {})}
            if (r := found.get(int(i)))
            else None
            for i in ids
        ]

    @property
    def roots(self) -> list[str]:
        """Real paths (links resolved) of the folders this index was filled from; `clip serve` sends only
        files that still resolve inside one of them.  Empty for an index made before they were recorded."""
        return json.loads(self._store.get_meta("roots") or "[]")

    @property
    def thumb_dir(self) -> Path:
        return self.root / THUMB_DIR

    def report(self) -> dict[str, Any]:
        return {
            "index": str(self.root),
            "model": self.model_spec,
            "model_identity": self.model_identity,
            "precision": recorded_precision(self._store) or "fp32",
            "agreement_with_fp32": json.loads(self._store.get_meta("agreement_with_fp32") or "null"),
            "count": len(self),
            "errors": [{"path": p, "error": m} for p, m in self.errors()],
            "ann": json.loads(self._store.get_meta("ann") or "null"),
        }

    # ------------------------------------------------------------------------------------------ writing

    def add(
        self,
        paths: Iterable[str | os.PathLike],
        *,
        batch_size: int = 64,
        num_workers: int | None = None,
        progress: bool = False,
        commit_seconds: float = 2.0,
        video: VideoOptions | None = None,
    ) -> IndexReport:
        """Embed the image and video files `paths` that are new or changed; unreadable ones are recorded as
        errors.  video: how videos are sampled (default: a frame a second; `clip.search.videos`)."""
        from clip.search.videos import av_available, missing_av_note, split_videos

        paths = resolve_paths(paths)
        images, videos = split_videos(paths)
        with self._writing() as report:
            if videos and not av_available():
                paths = images
                report.notes.append(missing_av_note(len(videos)))
            self._add_roots(os.path.dirname(p) for p in paths)
            return self._update(report, paths, [], batch_size, num_workers, progress, commit_seconds, video)

    def sync(
        self,
        folder: str | os.PathLike,
        *,
        batch_size: int = 64,
        num_workers: int | None = None,
        progress: bool = False,
        commit_seconds: float = 2.0,
        video: VideoOptions | None = None,
    ) -> IndexReport:
        """Make the index match the images and videos under `folder`: embed new and changed files, drop
        deleted ones.  video: how videos are sampled (default: a frame a second; `clip.search.videos`).

        Files indexed from other folders are left alone, and so are the indexed files of a folder that
        cannot be listed now (it is reported in `unreadable_folders`, not taken as deleted), and its videos
        while PyAV is not installed (a note says so).
        """
        from clip.search.videos import av_available, missing_av_note, split_videos

        folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
        files, unreadable = scan_images(folder, exclude=[self.root], videos=True)
        left_out = set() if av_available() else set(split_videos(files)[1])  # kept, not taken as deleted
        files = [f for f in files if f not in left_out]
        with self._writing() as report:
            if left_out:
                report.notes.append(missing_av_note(len(left_out)))
            report.unreadable_folders = unreadable
            self._add_roots([folder])
            present = set(files) | left_out
            known = list(self._store.known_files()) + list(self._store.known_errors())
            gone = [
                p
                for p in known
                if relative_to(p, folder)
                and p not in present
                and not any(relative_to(p, u) for u, _ in unreadable)
            ]
            return self._update(report, files, gone, batch_size, num_workers, progress, commit_seconds, video)

    def remove(self, paths: Iterable[str | os.PathLike]) -> int:
        """Drop `paths` from the index; returns how many embeddings were removed."""
        with self._writing():
            removed = self._store.delete(resolve_paths(paths))
            self._store.compact()
            self.prune_thumbnails()
        return removed

    @contextlib.contextmanager
    def _writing(self) -> Iterator[IndexReport]:
        """The write lock, with the model identity checked under it and damaged shards dropped first."""
        with self._store.writing():
            report = IndexReport()
            if self._encoder is not None:
                _check_identity(self._store, self._encoder, claim=False)
            for name, problem, paths in self._store.repair_shards(self.embed_dim):
                report.repaired.append(f"shard {name} {problem}: its {len(paths)} images are embedded again")
            yield report

    def _add_roots(self, folders: Iterable[str]) -> None:
        """Record the real paths of `folders` among the index's roots (see `roots`)."""
        roots = self.roots
        new = [r for r in dict.fromkeys(os.path.realpath(f) for f in folders) if r not in roots]
        if new:
            self._store.set_meta({"roots": json.dumps(sorted(roots + new))})

    def prune_thumbnails(self) -> int:
        """Delete cached thumbnails (IDX/thumbs) of content no longer in the index; returns how many."""
        if not self.thumb_dir.is_dir():
            return 0
        live = self._store.live_hashes()
        pruned = 0
        for f in self.thumb_dir.iterdir():
            if f.name.split("-", 1)[0] not in live:  # also older names, and temp files of killed writes
                f.unlink(missing_ok=True)
                pruned += 1
        return pruned

    def _plan(self, paths: list[str], report: IndexReport, video: VideoOptions) -> list[Job]:
        from clip.search.videos import resampled

        known = self._store.known_files()
        bad = self._store.known_errors()
        jobs = []
        for path in paths:
            try:
                st = os.stat(path)
                stat = (st.st_size, st.st_mtime_ns)
            except OSError:
                stat = None  # read_job records the error
            if path in known:
                if stat == known[path][:2] and not resampled(path, known[path][2], video):
                    report.skipped += 1
                    continue
                jobs.append(Job(path, known_sha256=known[path][2]))
            elif path in bad and stat == bad[path]:
                report.skipped += 1  # unchanged and still unreadable: do not retry every run
            else:
                jobs.append(Job(path))
        return jobs

    def _update(
        self,
        report: IndexReport,
        paths: list[str],
        gone: list[str],
        batch_size: int,
        num_workers: int | None,
        progress: bool,
        commit_seconds: float,
        video: VideoOptions | None = None,
    ) -> IndexReport:
        from clip.search.videos import VideoRun

        t0 = time.perf_counter()
        video = video or VideoOptions()
        if gone:
            report.removed = self._store.delete(gone)
        jobs = self._plan(paths, report, video)
        images = [j for j in jobs if not is_video_name(j.path)]
        if images:
            self._embed(images, report, batch_size, num_workers, progress, commit_seconds)
        if len(images) < len(jobs):  # the videos: frames in chunks, each video committed whole
            workers = default_workers() if num_workers is None else num_workers
            run = VideoRun(self._encode_locked, self._flush, report, video, batch_size, workers, progress,
                           commit_seconds)  # fmt: skip
            run.run([j for j in jobs if is_video_name(j.path)], self.encoder.preprocess)
        if jobs and self.encoder.agreement is not None:  # below fp32: measured on the first images embedded
            self._store.set_meta({"agreement_with_fp32": json.dumps(self.encoder.agreement)})
        self._store.compact()
        report.thumbs_pruned = self.prune_thumbnails()
        report.seconds = time.perf_counter() - t0
        report.count = len(self)
        return report

    def _embed(
        self,
        jobs: list[Job],
        report: IndexReport,
        batch_size: int,
        num_workers: int | None,
        progress: bool,
        commit_seconds: float,
    ) -> None:
        """Decode in workers, encode here, commit every `commit_seconds` (a killed run loses at most that)."""
        from tqdm import tqdm

        encoder = self.encoder
        known = {j.path for j in jobs if j.known_sha256 is not None}
        workers = default_workers() if num_workers is None else num_workers
        loader = make_loader(jobs, encoder.preprocess, batch_size, min(workers, len(jobs)))
        pending: tuple[list, list, list, list] = ([], [], [], [])  # vectors, records, errors, unchanged
        last = time.monotonic()
        flushes = 0
        with tqdm(total=len(jobs), unit="img", desc="indexing", disable=not progress, smoothing=0.1) as bar:
            for batch in loader:
                if batch.records:
                    with self._lock:
                        vecs = encoder.encode_pixels(batch.pixels)
                        encoder.measure_agreement(batch.pixels, vecs)
                    pending[0].append(vecs.to(torch.float16).numpy())
                pending[1].extend(batch.records)
                pending[2].extend(batch.errors)
                pending[3].extend(batch.unchanged)
                for r in batch.records:
                    if r.path in known:
                        report.updated += 1
                    else:
                        report.added += 1
                report.unchanged_content += len(batch.unchanged)
                report.failed.extend((e.path, e.message) for e in batch.errors)
                bar.update(len(batch.records) + len(batch.errors) + len(batch.unchanged))
                if time.monotonic() - last >= commit_seconds or len(pending[1]) >= SHARD_TARGET_ROWS:
                    self._flush(pending)
                    last = time.monotonic()
                    flushes += 1
                    if flushes % COMPACT_EVERY == 0:
                        self._store.compact()  # keep the shard count bounded during a long run
            self._flush(pending)

    def _encode_locked(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._lock:
            vecs = self.encoder.encode_pixels(pixels)
            self.encoder.measure_agreement(pixels, vecs)
            return vecs

    def _flush(self, pending: tuple[list, list, list, list]) -> None:
        vectors, records, errors, unchanged = pending
        if not (records or errors or unchanged):
            return
        dim = self.embed_dim
        stacked = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float16)
        self._store.commit(stacked, list(records), list(errors), list(unchanged))
        for part in pending:
            part.clear()

    # ---------------------------------------------------------------------------------------------- ANN

    def ann_needed(self) -> bool:
        """Whether `build_ann` should run: big enough, faiss installed, and none built or too stale."""
        status = self.ann_status()
        if status["count"] < ANN_THRESHOLD or not ann_mod.faiss_available():
            return False
        return status["stale"] > ANN_STALE_FRACTION

    # ------------------------------------------------------------------------------------------ reading

    def refresh(self) -> None:
        """Reload vectors if another process (or this one) changed the index since they were loaded."""
        self._load()

    def _load(self) -> _Loaded:
        with self._lock:
            gen = self._store.generation()
            if self._loaded is None or self._loaded.snap.generation != gen:
                snap = self._store.snapshot(self.embed_dim)
                self._loaded = _Loaded(snap, torch.from_numpy(snap.vectors))
            return self._loaded

    def search_vectors(
        self, queries: torch.Tensor, k: int = 10, *, ann: bool | None = None
    ) -> list[list[Hit]]:
        """Top-k hits for each query vector [Q, D] (normalised here), best first, ties by path.

        ann: None = the FAISS index if one is built and the index holds >= ANN_THRESHOLD vectors; True = FAISS
        (built now if missing); False = exact.
        """
        if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
            raise ValueError(f"queries must be [Q, {self.embed_dim}], got {list(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        q = F.normalize(queries.detach().float().cpu(), dim=-1)
        if ann and not self.ann_status()["built"]:
            self.build_ann()
        with self._lock:
            loaded = self._load()
            use_ann = ann is not False and len(loaded.snap.paths) > 0 and self._ann(loaded)
            if ann is None and len(loaded.snap.paths) < ANN_THRESHOLD:
                use_ann = False
            results = self._search_ann(loaded, q, k) if use_ann else search_exact(loaded.vectors, q, k)
            snap = loaded.snap
        return [
            [
                Hit(snap.paths[r], float(s), int(snap.vec_ids[r]), time=snap.time_of(r))
                for r, s in zip(rows, scores, strict=True)
            ]
            for rows, scores in results
        ]

    @overload
    def search_text(self, text: str, k: int = 10, *, ann: bool | None = None) -> list[Hit]: ...
    @overload
    def search_text(
        self, text: Sequence[str], k: int = 10, *, ann: bool | None = None
    ) -> list[list[Hit]]: ...

    def search_text(self, text: str | Sequence[str], k: int = 10, *, ann: bool | None = None):
        """Images best matching `text`: hits for one string, a list of hit lists for a list (one batch)."""
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("search_text takes a string or a list of strings")
        with self._lock:
            q = self.encoder.encode_texts(texts)
        hits = self.search_vectors(q, k, ann=ann)
        return hits[0] if isinstance(text, str) else hits

    @overload
    def search_image(
        self, image: Image.Image | str | os.PathLike, k: int = 10, *, ann: bool | None = None
    ) -> list[Hit]: ...
    @overload
    def search_image(
        self, image: Sequence[Image.Image | str | os.PathLike], k: int = 10, *, ann: bool | None = None
    ) -> list[list[Hit]]: ...

    def search_image(self, image, k: int = 10, *, ann: bool | None = None):
        """Images most similar to `image` (a PIL image or a file path), or to each of a list of them."""
        from clip.preprocess import load_image

        single = isinstance(image, (Image.Image, str, os.PathLike))
        items = [image] if single else list(image)
        # Same reading policy as indexing (EXIF applied), so an indexed file finds itself with score ~1.
        images = [im if isinstance(im, Image.Image) else load_image(im, exif=True) for im in items]
        with self._lock:
            q = self.encoder.encode_images(images)
        hits = self.search_vectors(q, k, ann=ann)
        return hits[0] if single else hits


def _check_identity(store: Store, encoder: Encoder, *, claim: bool) -> None:
    """Raise ModelMismatchError unless `encoder` is the index's model; with `claim`, an index that records
    no model yet gets this one's identity, set in the same write transaction that reads it (two processes
    creating one index with different models: exactly one identity wins, and the other process is refused)."""
    values = {
        "model_identity": encoder.identity,
        "model_spec": encoder.spec or "",
        "embed_dim": str(encoder.embed_dim),
        "precision": encoder.precision,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    stored = store.claim_meta("model_identity", values) if claim else store.get_meta("model_identity")
    if stored is not None and stored != encoder.identity:
        raise ModelMismatchError(
            f"index {str(store.root)!r} holds embeddings of model {store_spec(store)} (identity {stored[:12]}),"
            f" but the model given, {encoder.describe()!r}, has identity {encoder.identity[:12]} (other "
            "weights, config or preprocessing). Embeddings of different models cannot be mixed: use a "
            "new index folder, or the index's own model (leave --model out)."
        )
    check_precision(store, encoder.precision)


def store_spec(store: Store) -> str:
    spec = store.get_meta("model_spec")
    return repr(spec) if spec else "<model in memory>"
