"""`EmbeddingsIndex`: an index over the shards of a `clip embed` job, read in place (built by `clip.search.embbuild`).

Layout of its folder (every file but the manifest carries a token; the manifest, written last, names them)::

    collection.json              the manifest: model identity and spec, the embed job, its shards (name, rows,
                                 bytes, mtime), the folders files may be served from, the IVF indexes
    metadata-<t>.arrow           Arrow IPC file, memory-mapped: key, path, tar, caption, width, height, and the
                                 size and mtime of each file when the index was built (-1: no file)
    paths-<t>.npy                int64 [2, N]: 64-bit hashes of the paths (sorted) and their rows
    captions-<t>.npy             float16 [N, D] caption embeddings (when the job embedded captions)
    images-<t>.faiss, captions-<t>.faiss    IVF indexes (`clip.search.ivf`), ids = rows
    thumbs/                      thumbnails cached by `clip serve`

The image vectors stay in the embed job's `img_emb/*.npy`, memory-mapped (`clip.search.vectors`): opening the
index reads only headers, and a search reads the pages of its candidate rows.  Row r is the r-th embedded
sample in the job's order, so ties are ordered by input order (a folder index orders them by path).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip.search.encoder import Encoder, as_encoder
from clip.search.store import THUMB_DIR, DamagedIndexError, FileRecord, shard_problem
from clip.search.vectors import ShardedVectors, search_exact_sharded

MANIFEST = "collection.json"
FORMAT_VERSION = 1
TARGETS = ("images", "captions")
EXACT_MAX = 100_000  # without an IVF index, above this many vectors an exact scan is slow: say so once


def path_hash(path: str) -> int:
    """A signed 64-bit hash of a path's bytes (the lookup key of paths-<t>.npy)."""
    digest = hashlib.blake2b(os.fsencode(path), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def state_token(path: str, size: int, mtime_ns: int) -> str:
    """Hex digest naming one state of a file (path, size, mtime): the thumbnail-cache key of its record."""
    return hashlib.sha256(f"{path}\0{size}\0{mtime_ns}".encode("utf-8", "surrogateescape")).hexdigest()


def is_embeddings_index(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(root: Path) -> dict:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise DamagedIndexError(
            f"index {str(root)!r}: {MANIFEST} is unreadable ({err}); rebuild it"
        ) from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"index {str(root)!r} has format {manifest.get('format')}; this version reads {FORMAT_VERSION}: "
            "rebuild it with `clip index --from-embeddings`"
        )
    return manifest


def check_shards(manifest: dict, root: Path) -> list[Path]:
    """The embed job's vector files, each checked to be the one indexed (header, size, mtime)."""
    source = Path(manifest["source"])
    paths = []
    for s in manifest["shards"]:
        path = source / "img_emb" / f"{s['name']}.npy"
        problem = shard_problem(path, s["rows"], manifest["embed_dim"])
        if problem is None:
            st = path.stat()
            if (st.st_size, st.st_mtime_ns) != (s["bytes"], s["mtime_ns"]):
                problem = "changed since the index was built"
        if problem is not None:
            raise DamagedIndexError(
                f"embedding shard {path} {problem}; rebuild the index: clip index --from-embeddings {source} "
                f"--index {root}"
            )
        paths.append(path)
    return paths


class MetadataRows:
    """Rows of metadata-<t>.arrow (one record batch per shard), read from a memory map."""

    def __init__(self, path: Path, rows_per_batch: Sequence[int]) -> None:
        import pyarrow as pa

        self._reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        self.offsets = np.concatenate([[0], np.cumsum(rows_per_batch)]).astype(np.int64)
        if self._reader.num_record_batches != len(rows_per_batch):
            raise DamagedIndexError(f"{path} holds {self._reader.num_record_batches} batches, expected "
                                    f"{len(rows_per_batch)}; rebuild the index")  # fmt: skip

    def get(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        batches = np.searchsorted(self.offsets, np.asarray(rows, dtype=np.int64), side="right") - 1
        out = []
        for r, b in zip(rows, batches, strict=True):
            batch = self._reader.get_batch(int(b))
            out.append(batch.slice(int(r - self.offsets[b]), 1).to_pylist()[0])
        return out


def display_path(meta: dict[str, Any]) -> str:
    """A row's file path, or `TAR#KEY` for a WebDataset sample (no file of its own)."""
    return meta["path"] or f"{meta['tar'] or ''}#{meta['key']}"


class EmbeddingsIndex:
    """Search over `clip embed` shards: the `Index` reading API (search_text / search_image / search_vectors,
    file_info, roots, ...), plus caption search (`target="captions"`) where the job embedded captions."""

    kind = "embeddings"

    def __init__(
        self, root: Path, manifest: dict, encoder: Encoder | None, device: str | torch.device
    ) -> None:
        self.root = root
        self.manifest = manifest
        self._device = device
        self._encoder = encoder
        self._lock = threading.RLock()
        self.vectors = ShardedVectors(check_shards(manifest, root), manifest["embed_dim"])
        files = manifest["files"]
        self._meta = MetadataRows(root / files["metadata"], [s["rows"] for s in manifest["shards"]])
        self._paths = np.load(root / files["paths"], mmap_mode="r")
        self.captions = (
            ShardedVectors([root / files["captions"]], self.embed_dim) if files.get("captions") else None
        )
        self._ivf: dict[str, Any] = {}

    @classmethod
    def open(
        cls, path: str | os.PathLike, model: Any = None, *, device: str | torch.device = "cpu"
    ) -> EmbeddingsIndex:
        """Open the index at `path`; `model` (optional) must be the index's model (checked by identity)."""
        from clip.search.index import ModelMismatchError

        root = Path(path)
        manifest = read_manifest(root)
        encoder = as_encoder(model, device) if model is not None else None
        if encoder is not None and encoder.identity != manifest["model_identity"]:
            raise ModelMismatchError(
                f"index {str(root)!r} holds embeddings of model {manifest['model_spec']!r} (identity "
                f"{manifest['model_identity'][:12]}), but the model given, {encoder.describe()!r}, has identity "
                f"{encoder.identity[:12]}; leave --model out to use the index's own model"
            )
        return cls(root, manifest, encoder, device)

    def close(self) -> None:
        self._ivf.clear()

    def __enter__(self) -> EmbeddingsIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ facts

    @property
    def model_identity(self) -> str:
        return self.manifest["model_identity"]

    @property
    def model_spec(self) -> str:
        return self.manifest["model_spec"]

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def has_captions(self) -> bool:
        return self.captions is not None

    @property
    def roots(self) -> list[str]:
        return list(self.manifest["roots"])

    @property
    def thumb_dir(self) -> Path:
        return self.root / THUMB_DIR

    def __len__(self) -> int:
        return len(self.vectors)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._row_of(path) is not None

    def errors(self) -> list[tuple[str, str]]:
        """(key, message) of the inputs the embed job skipped (the first 1000)."""
        return [(e["key"], e["error"]) for e in self.manifest.get("skipped", [])]

    def report(self) -> dict[str, Any]:
        m = self.manifest
        return {"index": str(self.root), "kind": self.kind, "model": m["model_spec"],
                "model_identity": m["model_identity"], "count": len(self), "source": m["source"],
                "captions": self.has_captions, "ann": m.get("ann"), "skipped": m.get("skipped_count", 0)}  # fmt: skip

    def ann_status(self) -> dict[str, Any]:
        info = (self.manifest.get("ann") or {}).get("images")
        return {"built": info is not None, "stale": 0.0, "info": info, "count": len(self)}

    def ann_needed(self) -> bool:
        return False  # built by `clip index --from-embeddings` (its vectors never change)

    def build_ann(self, **kwargs: Any) -> dict[str, Any]:
        """Build the IVF indexes now (`clip search --ann` on an index built with --ann never)."""
        from clip.search.embbuild import add_ivf

        self.manifest = add_ivf(self.root, self.manifest, self.vectors, self.captions, self.encoder, **kwargs)
        self._ivf.clear()
        return self.manifest["ann"]["images"]

    def refresh(self) -> None:
        """Nothing to reload: the index changes only by being rebuilt (then open it again)."""

    @property
    def encoder(self) -> Encoder:
        from clip.search.index import ModelMismatchError

        with self._lock:
            if self._encoder is None:
                encoder = Encoder.load(self.model_spec, self._device)
                if encoder.identity != self.model_identity:
                    raise ModelMismatchError(
                        f"the model at {self.model_spec!r} changed since index {str(self.root)!r} was built "
                        f"(identity {encoder.identity[:12]}, index has {self.model_identity[:12]}); pass the "
                        "embed job's model with --model, or rebuild the index"
                    )
                self._encoder = encoder
            return self._encoder

    # ------------------------------------------------------------------------------------------ rows

    def _row_of(self, path: str) -> int | None:
        h = path_hash(path)
        keys = self._paths[0]  # contiguous: a binary search touches log2(N) pages (a strided view is copied)
        lo, hi = np.searchsorted(keys, h, "left"), np.searchsorted(keys, h, "right")
        for row in self._paths[1, lo:hi]:
            if self._meta.get([int(row)])[0]["path"] == path:
                return int(row)
        return None

    def file_info(self, path: str) -> FileRecord | None:
        """The record of an indexed *file* (None for a WebDataset key, an unknown path, or a file that was
        missing when the index was built); its `sha256` names the file's state (see `FileRecord`)."""
        row = self._row_of(path) if path else None
        if row is None:
            return None
        m = self._meta.get([row])[0]
        if m["size"] < 0:
            return None
        token = state_token(path, m["size"], m["mtime_ns"])
        return FileRecord(
            path, m["size"], m["mtime_ns"], token, m["width"], m["height"], content_hashed=False
        )

    def metadata(self, rows: Sequence[int]) -> list[dict[str, Any] | None]:
        """Metadata of rows (None for a row that does not exist)."""
        rows = [int(r) for r in rows]
        valid = [r for r in rows if 0 <= r < len(self)]
        got = dict(zip(valid, self._meta.get(valid), strict=True))
        return [got.get(r) for r in rows]

    def vectors_of(self, ids: Sequence[int], target: str = "images") -> np.ndarray:
        """float32 [len(ids), D] stored vectors of rows `ids` (`Hit.id`) of the images or the captions."""
        return self._target(target)[0].rows(np.asarray(ids, dtype=np.int64)).astype(np.float32)

    def _hits(self, rows: np.ndarray, scores: np.ndarray):
        from clip.search.index import Hit

        metas = self._meta.get(rows.tolist())
        return [
            Hit(
                display_path(m), float(s), int(r), m["caption"], m.get("frame_time")
            )  # no time: built before videos
            for r, s, m in zip(rows, scores, metas, strict=True)
        ]

    # ------------------------------------------------------------------------------------------ search

    def _target(self, target: str) -> tuple[ShardedVectors, str]:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if target == "captions" and self.captions is None:
            raise ValueError(f"index {str(self.root)!r} holds no caption embeddings (embed with --text)")
        return (self.vectors if target == "images" else self.captions), target

    def _ivf_for(self, target: str) -> Any:
        from clip.search.ann import faiss_available
        from clip.search.ivf import IvfIndex

        info = (self.manifest.get("ann") or {}).get(target)
        if info is None or not faiss_available():
            return None
        if target not in self._ivf:
            self._ivf[target] = IvfIndex.load(
                self.root / info["file"], info["nprobe"], info["candidates_factor"]
            )
        return self._ivf[target]

    def search_vectors(
        self, queries: torch.Tensor, k: int = 10, *, ann: bool | None = None, target: str = "images"
    ):
        """Top-k hits per query vector [Q, D] (normalised here), best first, ties by row; `target` "captions"
        searches the caption embeddings. ann: None/True = the IVF index when built, False = exact scan."""
        if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
            raise ValueError(f"queries must be [Q, {self.embed_dim}], got {list(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        vectors, target = self._target(target)
        q = F.normalize(queries.detach().float().cpu(), dim=-1)
        with self._lock:  # FAISS thread settings are process-wide
            ivf = self._ivf_for(target) if ann is not False else None
            if ann and ivf is None:
                raise ValueError(f"index {str(self.root)!r} has no IVF index for {target}: "
                                 "rebuild it with --ann always (needs faiss)")  # fmt: skip
            results = ivf.topk(vectors, q, k) if ivf is not None else search_exact_sharded(vectors, q, k)
        return [self._hits(rows, scores) for rows, scores in results]

    def search_text(
        self, text: str | Sequence[str], k: int = 10, *, ann: bool | None = None, target: str = "images"
    ):
        """Images (or captions) best matching `text`: hits for one string, a list of hit lists for a list."""
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("search_text takes a string or a list of strings")
        with self._lock:
            q = self.encoder.encode_texts(texts)
        hits = self.search_vectors(q, k, ann=ann, target=target)
        return hits[0] if isinstance(text, str) else hits

    def search_image(self, image: Any, k: int = 10, *, ann: bool | None = None, target: str = "images"):
        """Images (or captions) most similar to `image` (a PIL image or a path), or to each of a list."""
        from clip.preprocess import load_image

        single = isinstance(image, (Image.Image, str, os.PathLike))
        items = [image] if single else list(image)
        images = [im if isinstance(im, Image.Image) else load_image(im, exif=True) for im in items]
        with self._lock:
            q = self.encoder.encode_images(images)
        hits = self.search_vectors(q, k, ann=ann, target=target)
        return hits[0] if single else hits
