"""On-disk storage of an index: float16 embedding shards plus one SQLite table of files.

Layout of an index folder::

    index.sqlite          meta (model identity, generation, ...), shards, files, errors
    shards/<token>.npy    float16 [rows, D] unit vectors, written once, never modified
    ann-<token>.faiss     optional approximate index (see `clip.search.ann`)
    thumbs/               thumbnails cached by `clip serve`
    report.json           the last run's report (counts, unreadable files)

Crash safety comes from the order of writes.  A batch of embeddings is first written as a new shard file
(temp file, fsync, `os.replace`), and only then are its rows recorded in one SQLite transaction (WAL journal,
`synchronous=FULL`).  A process killed at any moment leaves either the previous transaction's state or the new
one; a shard file whose transaction never committed is an orphan that the next writer deletes.  Compaction
follows the same rule: new shards first, then one transaction re-points the rows, then old files are unlinked.

Each embedding gets a `vec_id` that is never reused (a modified file gets a new one), which lets an
approximate index built earlier tell its still-valid vectors from stale ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip.io import atomic_path

FORMAT_VERSION = 1
DB_NAME = "index.sqlite"
SHARD_DIR = "shards"
LOCK_NAME = "write.lock"
SHARD_TARGET_ROWS = 65536

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, rows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL, vec_id INTEGER NOT NULL UNIQUE,
    shard INTEGER NOT NULL, row INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS files_shard ON files (shard);
CREATE TABLE IF NOT EXISTS errors (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, message TEXT NOT NULL);
"""


@dataclass(frozen=True)
class FileRecord:
    """One embedded image: where it is, what it was when read, and its pixel size after EXIF rotation."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int


@dataclass(frozen=True)
class ErrorRecord:
    """A file that could not be read as an image; retried only when its size or mtime changes."""

    path: str
    size: int
    mtime_ns: int
    message: str


@dataclass(frozen=True)
class Snapshot:
    """All live embeddings at one generation, sorted by path (so row order is the tie-break order).

    paths: N strings; vec_ids: int64 [N]; vectors: float16 [N, D] unit vectors.
    """

    generation: int
    paths: list[str]
    vec_ids: np.ndarray
    vectors: np.ndarray


class IndexLockedError(RuntimeError):
    pass


def _lock_exclusive(fd: int, root: Path) -> None:
    """Take a POSIX record lock on `fd` or raise IndexLockedError.

    Not flock: a record lock belongs to this process only, so DataLoader workers forked while it is held do not
    keep it alive after this process is killed.  Without fcntl (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        raise IndexLockedError(
            f"index {str(root)!r} is being written by another process; wait for it to finish"
        ) from err


class Store:
    """SQLite + shard files of one index folder.  Thread-safe; one writing process at a time (file lock)."""

    def __init__(self, root: str | os.PathLike, create: bool = False) -> None:
        self.root = Path(root)
        db = self.root / DB_NAME
        if not db.exists():
            if not create:
                raise FileNotFoundError(f"no index at {str(self.root)!r} (missing {DB_NAME})")
            (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._writer = threading.Lock()  # POSIX file locks do not exclude threads of one process
        self._db = sqlite3.connect(db, isolation_level=None, check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss, not just SIGKILL
        self._db.executescript(_SCHEMA)
        version = self.get_meta("format_version")
        if version is None:
            self.set_meta({"format_version": str(FORMAT_VERSION), "generation": "0", "next_vec_id": "0"})
        elif int(version) != FORMAT_VERSION:
            raise ValueError(
                f"index {str(self.root)!r} has format version {version}; this version of clip reads "
                f"{FORMAT_VERSION}. Rebuild it with `clip index` into a new folder."
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------------ meta

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    @contextlib.contextmanager
    def _read_transaction(self) -> Iterator[sqlite3.Cursor]:
        """A deferred transaction: one consistent snapshot (WAL), without blocking a writer."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN")
            try:
                yield cur
            finally:
                cur.execute("COMMIT")

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, values: dict[str, str]) -> None:
        with self._transaction() as cur:
            cur.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", values.items())

    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    def _bump(self, cur: sqlite3.Cursor) -> None:
        cur.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    # ------------------------------------------------------------------------------------------- reading

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM files").fetchone()[0])

    def count_up_to(self, max_vec_id: int) -> int:
        """Live embeddings with vec_id <= max_vec_id (those an ANN index built then can still hold)."""
        with self._lock:
            return int(
                self._db.execute("SELECT COUNT(*) FROM files WHERE vec_id <= ?", (max_vec_id,)).fetchone()[0]
            )

    def known_files(self) -> dict[str, tuple[int, int, str]]:
        """path -> (size, mtime_ns, sha256) of every embedded file."""
        with self._lock:
            rows = self._db.execute("SELECT path, size, mtime_ns, sha256 FROM files").fetchall()
        return {p: (s, m, h) for p, s, m, h in rows}

    def known_errors(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            rows = self._db.execute("SELECT path, size, mtime_ns FROM errors").fetchall()
        return {p: (s, m) for p, s, m in rows}

    def errors(self) -> list[tuple[str, str]]:
        """(path, message) of every file that could not be read, sorted by path."""
        with self._lock:
            return [tuple(r) for r in self._db.execute("SELECT path, message FROM errors ORDER BY path")]

    def has_path(self, path: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM files WHERE path = ?", (path,)).fetchone() is not None

    def file_info(self, path: str) -> FileRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT path, size, mtime_ns, sha256, width, height FROM files WHERE path = ?", (path,)
            ).fetchone()
        return None if row is None else FileRecord(*row)

    def snapshot(self, embed_dim: int) -> Snapshot:
        """Load every live vector, sorted by path.  Retries if a concurrent compaction removed a shard."""
        for attempt in range(5):
            with self._read_transaction() as cur:  # one snapshot: rows and shard names agree
                generation = int(cur.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
                rows = cur.execute("SELECT path, vec_id, shard, row FROM files ORDER BY path").fetchall()
                names = dict(cur.execute("SELECT id, name FROM shards").fetchall())
            try:
                return self._gather(generation, rows, names, embed_dim)
            except FileNotFoundError:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def _gather(self, generation: int, rows: list, names: dict[int, str], dim: int) -> Snapshot:
        n = len(rows)
        paths = [r[0] for r in rows]
        vec_ids = np.fromiter((r[1] for r in rows), dtype=np.int64, count=n)
        shard_of = np.fromiter((r[2] for r in rows), dtype=np.int64, count=n)
        row_of = np.fromiter((r[3] for r in rows), dtype=np.int64, count=n)
        vectors = np.empty((n, dim), dtype=np.float16)
        for sid in np.unique(shard_of):
            where = np.flatnonzero(shard_of == sid)
            data = np.load(self.root / SHARD_DIR / names[int(sid)], mmap_mode="r")
            if data.ndim != 2 or data.shape[1] != dim or data.dtype != np.float16:
                raise ValueError(
                    f"shard {names[int(sid)]} has {data.dtype} {data.shape}, expected float16 [*, {dim}]"
                )
            vectors[where] = data[row_of[where]]
        return Snapshot(generation, paths, vec_ids, vectors)

    # ------------------------------------------------------------------------------------------- writing

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the index's write lock (one writer at a time) and delete orphaned files first."""
        if not self._writer.acquire(blocking=False):
            raise IndexLockedError(f"index {str(self.root)!r} is already being written by this process")
        try:
            with open(self.root / LOCK_NAME, "a+") as lock_file:
                _lock_exclusive(lock_file.fileno(), self.root)
                self.remove_orphans()
                yield
        finally:
            self._writer.release()

    def remove_orphans(self) -> list[str]:
        """Delete shard / ANN files that no committed transaction refers to (left by a killed writer)."""
        with self._lock:
            live = {r[0] for r in self._db.execute("SELECT name FROM shards")}
            ann = json.loads(self.get_meta("ann") or "null")
        removed = []
        for f in (self.root / SHARD_DIR).iterdir():
            if f.name not in live:
                f.unlink(missing_ok=True)
                removed.append(f.name)
        for f in self.root.glob("*ann-*.faiss*"):
            if ann is None or f.name != ann["file"]:
                f.unlink(missing_ok=True)
                removed.append(f.name)
        return removed

    def _write_shard(self, vectors: np.ndarray) -> str:
        name = f"{secrets.token_hex(8)}.npy"
        with atomic_path(self.root / SHARD_DIR / name) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(vectors, dtype=np.float16))
        return name

    def commit(
        self,
        vectors: np.ndarray,
        records: list[FileRecord],
        errors: Iterable[ErrorRecord] = (),
        touched: Iterable[tuple[str, int, int]] = (),
    ) -> None:
        """Record one batch atomically.

        vectors: float16 [len(records), D], row i embedding records[i]; errors: files that failed (their old
        embedding, if any, is dropped); touched: (path, size, mtime_ns) of files whose stat changed but whose
        content hash did not (only the stat is updated).
        """
        if len(vectors) != len(records):
            raise ValueError(f"{len(vectors)} vectors for {len(records)} records")
        name = self._write_shard(vectors) if records else None
        with self._transaction() as cur:
            if name is not None:
                cur.execute("INSERT INTO shards (name, rows) VALUES (?, ?)", (name, len(records)))
                shard_id = cur.lastrowid
                first = int(cur.execute("SELECT value FROM meta WHERE key = 'next_vec_id'").fetchone()[0])
                cur.executemany(
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (r.path, r.size, r.mtime_ns, r.sha256, r.width, r.height, first + i, shard_id, i)
                        for i, r in enumerate(records)
                    ],
                )
                cur.executemany("DELETE FROM errors WHERE path = ?", [(r.path,) for r in records])
                cur.execute(
                    "UPDATE meta SET value = ? WHERE key = 'next_vec_id'", (str(first + len(records)),)
                )
            errors = list(errors)
            cur.executemany(
                "INSERT OR REPLACE INTO errors VALUES (?, ?, ?, ?)",
                [(e.path, e.size, e.mtime_ns, e.message) for e in errors],
            )
            cur.executemany("DELETE FROM files WHERE path = ?", [(e.path,) for e in errors])
            cur.executemany(
                "UPDATE files SET size = ?, mtime_ns = ? WHERE path = ?", [(s, m, p) for p, s, m in touched]
            )
            self._bump(cur)

    def delete(self, paths: Iterable[str]) -> int:
        """Forget `paths` (embeddings and error entries); returns how many embeddings were dropped."""
        paths = [(p,) for p in paths]
        with self._transaction() as cur:
            before = cur.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            cur.executemany("DELETE FROM files WHERE path = ?", paths)
            cur.executemany("DELETE FROM errors WHERE path = ?", paths)
            dropped = before - cur.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            self._bump(cur)
        return int(dropped)

    def compact(self, target_rows: int = SHARD_TARGET_ROWS) -> int:
        """Merge small shards and rewrite mostly-dead ones; returns the number of shards rewritten."""
        with self._lock:
            shards = self._db.execute(
                "SELECT s.id, s.name, s.rows, COUNT(f.path) FROM shards s "
                "LEFT JOIN files f ON f.shard = s.id GROUP BY s.id"
            ).fetchall()
        redo = [s for s in shards if s[3] < target_rows // 2 or s[3] < s[2] // 2]
        if len(redo) < 2 and not any(s[3] < s[2] for s in redo):
            return 0  # one small shard without dead rows: nothing to gain
        ids = [s[0] for s in redo]
        with self._lock:
            marks = ",".join("?" * len(ids))
            rows = self._db.execute(
                f"SELECT f.path, s.name, f.row FROM files f JOIN shards s ON f.shard = s.id "
                f"WHERE f.shard IN ({marks}) ORDER BY f.path",
                ids,
            ).fetchall()
        loaded = {name: np.load(self.root / SHARD_DIR / name, mmap_mode="r") for name in {r[1] for r in rows}}
        new_shards = []
        for start in range(0, len(rows), target_rows):
            part = rows[start : start + target_rows]
            vecs = np.stack([loaded[name][row] for _, name, row in part])
            new_shards.append((self._write_shard(vecs), part))
        with self._transaction() as cur:
            for name, part in new_shards:
                cur.execute("INSERT INTO shards (name, rows) VALUES (?, ?)", (name, len(part)))
                sid = cur.lastrowid
                cur.executemany(
                    "UPDATE files SET shard = ?, row = ? WHERE path = ?",
                    [(sid, i, p[0]) for i, p in enumerate(part)],
                )
            cur.execute(f"DELETE FROM shards WHERE id IN ({marks})", ids)
            self._bump(cur)
        del loaded
        for s in redo:
            (self.root / SHARD_DIR / s[1]).unlink(missing_ok=True)
        return len(redo)
