"""`Hit`: one search result, the same for a folder index and an index built from `clip embed` shards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Hit:
    """One result: the file's path (or `TAR#KEY` for a WebDataset sample), its cosine similarity, and the
    index's id of the vector (`vec_id` for a folder index, the row for one built from embeddings: the `id`
    of clip-retrieval's API); `caption` where the index holds captions; `time`, the frame's presentation time
    in seconds, for a frame of a video (each frame of a video is a hit of its own)."""

    path: str
    score: float
    id: int | None = field(default=None, compare=False)
    caption: str | None = field(default=None, compare=False)
    time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "score": round(self.score, 6)}
        if self.time is not None:
            d["time"] = round(self.time, 6)
        if self.caption is not None:
            d["caption"] = self.caption
        return d

    @property
    def label(self) -> str:
        """The path, with `#t=SECONDS` (a media fragment, as `clip embed` keys frames) for a video frame."""
        return self.path if self.time is None else f"{self.path}#t={self.time:.3f}"
