"""The approximate (FAISS) side of `clip.search.index.Index`: building the ANN index and searching with it.

A mixin, so that `Index` keeps one public API while its module stays small: the methods here use the index's
store, snapshot loader, lock and encoder (`Index._store`, `_load`, `_lock`, `encoder`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clip.search import ann as ann_mod
from clip.search.ann import TUNING_SUBJECTS
from clip.search.store import Snapshot
from clip.search.topk import rank, search_exact


@dataclass
class _Loaded:
    """A snapshot with the derived structures searches need."""

    snap: Snapshot
    vectors: torch.Tensor  # float16 [N, D], shares memory with snap.vectors
    row_of: Any = None  # vec_id -> row, built when the ANN is used
    ann: ann_mod.AnnIndex | None = None
    ann_info: dict | None = None


class AnnSearch:
    """ANN methods of `Index` (see `clip.search.index` for when the ANN index is built and used)."""

    def ann_status(self) -> dict[str, Any]:
        """{"built": bool, "stale": share of vectors added or deleted since the build, "info": meta}."""
        info = json.loads(self._store.get_meta("ann") or "null")
        count = len(self)
        if info is None:
            return {"built": False, "stale": 1.0, "info": None, "count": count}
        covered = self._store.count_up_to(info["max_vec_id"])
        changed = (count - covered) + (info["count"] - covered)
        return {"built": True, "stale": changed / max(1, count), "info": info, "count": count}

    def build_ann(
        self, *, target_recall: float = ann_mod.TARGET_RECALL, nlist: int | None = None
    ) -> dict[str, Any]:
        """Build (or rebuild) the FAISS index over all vectors; returns its info, with recall@10 vs exact."""
        loaded = self._load()
        snap = loaded.snap
        if len(snap.paths) == 0:
            raise ValueError(f"index {str(self.root)!r} is empty: nothing to build an approximate index over")
        queries = self._tuning_queries(snap)
        index, stats = ann_mod.build(
            snap.vectors, snap.vec_ids, nlist=nlist, target_recall=target_recall, queries=queries
        )
        name = f"ann-{os.urandom(6).hex()}.faiss"
        with self._store.writing():
            index.save(self.root / name)
            info = ann_mod.AnnInfo(
                file=name,
                max_vec_id=int(snap.vec_ids.max()),
                count=len(snap.paths),
                nlist=stats["nlist"],
                nprobe=stats["nprobe"],
                recall=round(stats["recall"], 4),
                build_seconds=round(stats["build_seconds"], 2),
            ).to_dict()
            self._store.set_meta({"ann": json.dumps(info)})
            self._store.remove_orphans()  # the previous ANN file
        with self._lock:
            self._loaded = None
        return info

    def _tuning_queries(self, snap: Snapshot) -> np.ndarray:
        """Queries to tune nprobe on: text prompts through the index's model (text queries land farther from
        the images than any image does, so they need more probes) plus perturbed stored vectors."""
        image_like = ann_mod.probe_queries(snap.vectors, 100)
        try:
            encoder = self.encoder
        except (ValueError, OSError):
            return image_like  # a model held in memory elsewhere: tune on image-like queries only
        with self._lock:
            text = encoder.encode_texts([f"a photo of {s}" for s in TUNING_SUBJECTS]).numpy()
        return np.concatenate([text, image_like])

    def _ann(self, loaded: _Loaded) -> bool:
        """Attach the ANN index to `loaded` if one is built; returns whether it is usable."""
        info = json.loads(self._store.get_meta("ann") or "null")
        if info is None or not ann_mod.faiss_available():
            return False
        if loaded.ann is None or loaded.ann_info != info:
            loaded.ann = ann_mod.AnnIndex.load(self.root / info["file"], info["nprobe"])
            loaded.ann_info = info
            loaded.row_of = ann_mod.row_lookup(loaded.snap.vec_ids)
        return True

    def _search_ann(self, loaded: _Loaded, q: torch.Tensor, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """FAISS candidates for the vectors it covers, exact search over newer ones; all rescored exactly."""
        snap = loaded.snap
        labels = loaded.ann.search(q.numpy(), ann_mod.candidates_for(k))
        newer = np.flatnonzero(snap.vec_ids > loaded.ann_info["max_vec_id"])
        side = (
            search_exact(loaded.vectors.index_select(0, torch.from_numpy(newer)), q, k)
            if len(newer)
            else None
        )
        out = []
        for i in range(q.shape[0]):
            rows = loaded.row_of(labels[i][labels[i] >= 0])
            rows = rows[rows >= 0]
            if side is not None:
                rows = np.concatenate([rows, newer[side[i][0]]])
            out.append(rank(loaded.vectors, q[i], rows, k))
        return out
