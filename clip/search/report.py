"""`IndexReport`: what one `Index.add` / `Index.sync` run did (printed by `clip index`, kept in report.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class IndexReport:
    """What one `add` / `sync` run did."""

    added: int = 0  # new files embedded
    updated: int = 0  # changed files re-embedded
    unchanged_content: int = 0  # stat changed, content hash did not: nothing re-embedded
    skipped: int = 0  # already indexed and unchanged (or unchanged and still unreadable)
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, message) read this run
    unreadable_folders: list[tuple[str, str]] = field(default_factory=list)  # (folder, message), left out
    repaired: list[str] = field(default_factory=list)  # one line per damaged shard dropped and re-embedded
    thumbs_pruned: int = 0  # cached thumbnails of files no longer indexed, deleted
    seconds: float = 0.0
    count: int = 0  # embeddings in the index afterwards
    frames: int = 0  # video frames embedded (their videos are counted in added / updated)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, message): a video cut short, ...

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed"] = [{"path": p, "error": m} for p, m in self.failed]
        d["unreadable_folders"] = [{"path": p, "error": m} for p, m in self.unreadable_folders]
        d["notes"] = [{"path": p, "note": m} for p, m in self.notes]
        d["images_per_second"] = round(self.images_per_second, 2)
        return d
