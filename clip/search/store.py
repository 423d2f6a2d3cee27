"""On-disk storage of an index: float16 embedding shards plus one SQLite table of files.

Layout of an index folder::

    index.sqlite          meta (model identity, generation, ...), shards, files, errors
    shards/<token>.npy    float16 [rows, D] unit vectors, written once, never modified
    ann-<token>.faiss     optional approximate index (see `clip.search.ann`)
    thumbs/               thumbnails cached by `clip serve` (<sha256>-<size>.jpg; pruned by every writer)
    report.json           the last run's report (counts, unreadable files)

Crash safety comes from the order of writes.  A batch of embeddings is first written as a new shard file
(temp file, fsync, `os.replace`), and only then are its rows recorded in one SQLite transaction (WAL journal,
`synchronous=FULL`).  A process killed at any moment leaves either the previous transaction's state or the new
one; a shard file whose transaction never committed is an orphan that the next writer deletes.  Compaction
follows the same rule: new shards first, then one transaction re-points the rows, then old files are unlinked.

Each embedding gets a `vec_id` that is never reused (a modified file gets a new one), which lets an
approximate index built earlier tell its still-valid vectors from stale ones.

Damage is detected, never hidden: a shard file that is missing, truncated or of another dtype or shape makes
reads fail with `DamagedIndexError` (one line naming the shard and the fix), and the next writer drops the rows
it held (`repair_shards`) so that `clip index` re-embeds those files.  An unreadable `index.sqlite` is reported
the same way.  A read-only index can be searched (it is opened read-only) but not written.

Paths are stored as SQLite text when they are valid UTF-8, and as the file name's raw bytes (a BLOB) otherwise,
so a file whose name is not UTF-8 is indexed like any other and found again under its exact name.
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
from clip.search.damage import (  # noqa: F401  (re-exported: these are the store's errors)
    DB_NAME,
    DamagedIndexError,
    IndexLockedError,
    IndexWriteError,
    ReadOnlyIndexError,
    database_error,
    shard_problem,
)
from clip.search.schema import FORMAT_VERSION, connect, db_path, has_time_column, py_path  # noqa: F401

SHARD_DIR = "shards"
LOCK_NAME = "write.lock"
THUMB_DIR = "thumbs"
SHARD_TARGET_ROWS = 65536


@dataclass(frozen=True)
class FileRecord:
    """One embedded image or video frame: where it is, what it was when read, and its pixel size after EXIF
    rotation; `time` is a video frame's presentation time in seconds (None for an image).

    content_hashed False (an index built from `clip embed` shards, whose bytes it never read): `sha256` is not
    the content's hash but a digest of (path, size, mtime_ns) taken when the index was built, naming that state
    of the file for thumbnail caching, and serving checks the size and mtime only.
    """

    path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int
    content_hashed: bool = True
    time: float | None = None

    @property
    def is_video(self) -> bool:
        return self.time is not None


@dataclass(frozen=True)
class ErrorRecord:
    """A file that could not be read as an image; retried only when its size or mtime changes."""

    path: str
    size: int
    mtime_ns: int
    message: str


@dataclass(frozen=True)
class Snapshot:
    """All live embeddings at one generation, sorted by path then time (so row order is the tie-break order).

    paths: N strings; vec_ids: int64 [N]; vectors: float16 [N, D] unit vectors; times: float64 [N], a video
    frame's time in seconds, NaN for an image (None: no frame at all).
    """

    generation: int
    paths: list[str]
    vec_ids: np.ndarray
    vectors: np.ndarray
    times: np.ndarray | None = None

    def time_of(self, row: int) -> float | None:
        if self.times is None or np.isnan(self.times[row]):
            return None
        return float(self.times[row])


def _stat_fields(r: FileRecord) -> tuple[int, int, str, int, int]:
    return r.size, r.mtime_ns, r.sha256, r.width, r.height


def _record_of(row: tuple) -> FileRecord:
    """A FileRecord from a row of `Store._columns()`: path, size, mtime_ns, sha256, width, height, time."""
    return FileRecord(py_path(row[0]), *row[1:6], time=row[6])


def thumb_name(sha256: str, size: int) -> str:
    """File name of the cached thumbnail of content `sha256` at `size` pixels (in IDX/thumbs)."""
    return f"{sha256}-{size}.jpg"


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
        try:
            self._db, self.read_only = connect(db)
            # "NULL": an index made before videos that this process could not migrate (every row an image).
            self._time = "time" if has_time_column(self._db) else "NULL"
        except sqlite3.Error as err:
            raise database_error(self.root, err) from None
        version = self.get_meta("format_version")
        if version is None:
            raise DamagedIndexError(
                f"index {str(self.root)!r} is damaged: {DB_NAME} records no format version"
            )
        if int(version) != FORMAT_VERSION:
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
        self._require_writable()
        with self._lock, self._sqlite_errors():
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            try:
                cur.execute("COMMIT")
            except sqlite3.OperationalError:
                with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may leave the transaction open
                    cur.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _read_transaction(self) -> Iterator[sqlite3.Cursor]:
        """A deferred transaction: one consistent snapshot (WAL), without blocking a writer."""
        with self._lock, self._sqlite_errors():
            cur = self._db.cursor()
            cur.execute("BEGIN")
            try:
                yield cur
            finally:
                cur.execute("COMMIT")

    @contextlib.contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        """Turn a damaged or read-only database into its one-line error; other errors pass unchanged."""
        try:
            yield
        except sqlite3.Error as err:
            converted = database_error(self.root, err)
            if converted is err:
                raise
            raise converted from None

    def _rows(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._lock, self._sqlite_errors():
            return self._db.execute(sql, tuple(params)).fetchall()

    def _require_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyIndexError(
                f"index {str(self.root)!r} is read-only for this process: make it writable "
                f"(chmod -R u+w {self.root}) or index into another folder"
            )

    def get_meta(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, values: dict[str, str]) -> None:
        with self._transaction() as cur:
            cur.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", values.items())

    def claim_meta(self, key: str, values: dict[str, str]) -> str:
        """Store `values` (which include `key`) only if `key` is unset, in one write transaction; returns the
        value of `key` afterwards: the one stored before if another process set it first."""
        current = self.get_meta(key)
        if current is not None:
            return current
        with self._transaction() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is None:
                cur.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", values.items())
        return row[0] if row is not None else values[key]

    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    def _bump(self, cur: sqlite3.Cursor) -> None:
        cur.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    # ------------------------------------------------------------------------------------------- reading

    def count(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM files")[0][0])

    def count_up_to(self, max_vec_id: int) -> int:
        """Live embeddings with vec_id <= max_vec_id (those an ANN index built then can still hold)."""
        return int(self._rows("SELECT COUNT(*) FROM files WHERE vec_id <= ?", (max_vec_id,))[0][0])

    def known_files(self) -> dict[str, tuple[int, int, str]]:
        """path -> (size, mtime_ns, sha256) of every embedded file (a video once, however many frames)."""
        rows = self._rows("SELECT DISTINCT path, size, mtime_ns, sha256 FROM files")
        return {py_path(p): (s, m, h) for p, s, m, h in rows}

    def known_errors(self) -> dict[str, tuple[int, int]]:
        rows = self._rows("SELECT path, size, mtime_ns FROM errors")
        return {py_path(p): (s, m) for p, s, m in rows}

    def errors(self) -> list[tuple[str, str]]:
        """(path, message) of every file that could not be read, sorted by path."""
        return [(py_path(p), m) for p, m in self._rows("SELECT path, message FROM errors ORDER BY path")]

    def has_path(self, path: str) -> bool:
        return bool(self._rows("SELECT 1 FROM files WHERE path = ?", (db_path(path),)))

    def file_info(self, path: str) -> FileRecord | None:
        """The record of `path` (of a video: its first frame's), or None."""
        rows = self._rows(
            f"SELECT {self._columns()} FROM files WHERE path = ? ORDER BY {self._time} LIMIT 1",
            (db_path(path),),
        )
        return _record_of(rows[0]) if rows else None

    def frame_times(self, path: str) -> list[float]:
        """Times (seconds) of the indexed frames of the video `path`, in order; empty for an image."""
        rows = self._rows(
            f"SELECT {self._time} FROM files WHERE path = ? AND {self._time} IS NOT NULL ORDER BY 1",
            (db_path(path),),
        )
        return [r[0] for r in rows]

    def _columns(self) -> str:
        return f"path, size, mtime_ns, sha256, width, height, {self._time}"

    def records_by_vec_id(self, vec_ids: list[int]) -> dict[int, FileRecord]:
        """vec_id -> record of the live embeddings among `vec_ids`."""
        out: dict[int, FileRecord] = {}
        for start in range(0, len(vec_ids), 500):  # SQLite's limit on bound parameters
            part = vec_ids[start : start + 500]
            rows = self._rows(
                f"SELECT vec_id, {self._columns()} FROM files WHERE vec_id IN ({','.join('?' * len(part))})",
                part,
            )
            out.update({r[0]: _record_of(r[1:]) for r in rows})
        return out

    def live_hashes(self) -> set[str]:
        """SHA-256 of every embedded file's content."""
        return {r[0] for r in self._rows("SELECT DISTINCT sha256 FROM files")}

    def snapshot(self, embed_dim: int) -> Snapshot:
        """Load every live vector, sorted by path (names that are not UTF-8 last), a video's frames by time.

        Retries if a concurrent compaction removed a shard; raises DamagedIndexError for a shard that is
        missing, truncated or not float16 [rows, embed_dim] while nothing else is changing the index.
        """
        problems: list[tuple[str, str, int]] = []
        for _ in range(5):
            with self._read_transaction() as cur:  # one snapshot: rows and shard names agree
                generation = int(cur.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
                rows = cur.execute(
                    f"SELECT path, vec_id, shard, row, {self._time} FROM files ORDER BY path, {self._time}"
                ).fetchall()
                shards = {sid: (name, n) for sid, name, n in cur.execute("SELECT id, name, rows FROM shards")}
            used: dict[int, int] = {}
            for r in rows:
                used[r[2]] = used.get(r[2], 0) + 1
            problems = []
            for sid in sorted(used):
                name, n_rows = shards[sid]
                problem = shard_problem(self.root / SHARD_DIR / name, n_rows, embed_dim)
                if problem is not None:
                    problems.append((name, problem, used[sid]))
            if not problems:
                try:
                    return self._gather(generation, rows, {s: v[0] for s, v in shards.items()}, embed_dim)
                except FileNotFoundError:
                    continue  # a compaction replaced a shard after the check: read the new state
            if self.generation() == generation:
                break  # nothing is moving: the damage is real
        if not problems:
            raise RuntimeError(f"index {str(self.root)!r} kept changing while being read; try again")
        shown = ", ".join(f"{name} {problem} ({n} images)" for name, problem, n in problems)
        raise DamagedIndexError(
            f"index {str(self.root)!r} is damaged: shard {shown}; run `clip index PHOTOS --index {self.root}` "
            "to repair it (the images those shards held are embedded again)"
        )

    def _gather(self, generation: int, rows: list, names: dict[int, str], dim: int) -> Snapshot:
        n = len(rows)
        paths = [py_path(r[0]) for r in rows]
        vec_ids = np.fromiter((r[1] for r in rows), dtype=np.int64, count=n)
        shard_of = np.fromiter((r[2] for r in rows), dtype=np.int64, count=n)
        row_of = np.fromiter((r[3] for r in rows), dtype=np.int64, count=n)
        times = np.fromiter((np.nan if r[4] is None else r[4] for r in rows), dtype=np.float64, count=n)
        vectors = np.empty((n, dim), dtype=np.float16)
        for sid in np.unique(shard_of):
            where = np.flatnonzero(shard_of == sid)
            data = np.load(self.root / SHARD_DIR / names[int(sid)], mmap_mode="r")  # checked by the caller
            vectors[where] = data[row_of[where]]
        return Snapshot(generation, paths, vec_ids, vectors, times)

    # ------------------------------------------------------------------------------------------- writing

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the index's write lock (one writer at a time) and delete orphaned files first."""
        self._require_writable()
        if not self._writer.acquire(blocking=False):
            raise IndexLockedError(f"index {str(self.root)!r} is already being written by this process")
        try:
            try:
                lock_file = open(self.root / LOCK_NAME, "a+")
            except PermissionError as err:
                raise ReadOnlyIndexError(
                    f"index {str(self.root)!r} is read-only ({err.strerror}): make it writable "
                    f"(chmod -R u+w {self.root}) or index into another folder"
                ) from None
            with lock_file:
                _lock_exclusive(lock_file.fileno(), self.root)
                self.remove_orphans()
                yield
        finally:
            self._writer.release()

    def remove_orphans(self) -> list[str]:
        """Delete shard / ANN files that no committed transaction refers to (left by a killed writer)."""
        live = {r[0] for r in self._rows("SELECT name FROM shards")}
        ann = json.loads(self.get_meta("ann") or "null")
        removed = []
        # A deleted shards/ folder is damage to repair (repair_shards), not a reason to fail here.
        (self.root / SHARD_DIR).mkdir(exist_ok=True)
        for f in (self.root / SHARD_DIR).iterdir():
            if f.name not in live:
                f.unlink(missing_ok=True)
                removed.append(f.name)
        for f in self.root.glob("*ann-*.faiss*"):
            if ann is None or f.name != ann["file"]:
                f.unlink(missing_ok=True)
                removed.append(f.name)
        return removed

    def repair_shards(self, dim: int) -> list[tuple[str, str, list[str]]]:
        """Drop every shard that is missing, truncated or of the wrong dtype / shape, with the rows it held.

        Call while `writing()`.  Returns (shard name, problem, paths whose embeddings were dropped): a sync
        then sees those files as new and embeds them again.  A video with frames in the shard loses all its
        frames (a compaction may have spread them over shards), so it is embedded again whole.
        """
        repaired: list[tuple[str, str, list[str]]] = []
        if dim <= 0:
            return repaired  # no model recorded yet, so no shard either
        for sid, name, n in self._rows("SELECT id, name, rows FROM shards ORDER BY id"):
            problem = shard_problem(self.root / SHARD_DIR / name, n, dim)
            if problem is None:
                continue
            with self._transaction() as cur:
                stored = list(
                    dict.fromkeys(r[0] for r in cur.execute("SELECT path FROM files WHERE shard = ?", (sid,)))
                )
                paths = [py_path(p) for p in stored]
                cur.execute("DELETE FROM files WHERE shard = ?", (sid,))
                cur.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in stored])
                cur.execute("DELETE FROM shards WHERE id = ?", (sid,))
                self._bump(cur)
            (self.root / SHARD_DIR / name).unlink(missing_ok=True)
            repaired.append((name, problem, paths))
        return repaired

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

        vectors: float16 [len(records), D], row i embedding records[i] (every frame of a video in one commit:
        they replace all its earlier frames); errors: files that failed (their old
        embedding, if any, is dropped); touched: (path, size, mtime_ns) of files whose stat changed but whose
        content hash did not (only the stat is updated).
        """
        if len(vectors) != len(records):
            raise ValueError(f"{len(vectors)} vectors for {len(records)} records")
        name = None
        try:
            name = self._write_shard(vectors) if records else None
            self._record(cur_name=name, records=records, errors=errors, touched=touched)
        except (OSError, sqlite3.OperationalError) as err:
            if name is not None:  # written but never recorded: not part of the index
                (self.root / SHARD_DIR / name).unlink(missing_ok=True)
            raise IndexWriteError(
                f"cannot write to index {str(self.root)!r}: {err} (disk full or quota?). This batch was not "
                "recorded; the index holds every earlier batch. Free space and run clip index again to continue"
            ) from None

    def _record(
        self, cur_name: str | None, records: list[FileRecord], errors: Iterable[ErrorRecord],
        touched: Iterable[tuple[str, int, int]],
    ) -> None:  # fmt: skip
        """The SQLite half of `commit`: one transaction recording the shard `cur_name` and its rows."""
        name = cur_name
        with self._transaction() as cur:
            if name is not None:
                cur.execute("INSERT INTO shards (name, rows) VALUES (?, ?)", (name, len(records)))
                shard_id = cur.lastrowid
                first = int(cur.execute("SELECT value FROM meta WHERE key = 'next_vec_id'").fetchone()[0])
                stored = dict.fromkeys(db_path(r.path) for r in records)
                cur.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in stored])  # earlier frames
                cur.executemany(
                    "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (db_path(r.path), *_stat_fields(r), first + i, shard_id, i, r.time)
                        for i, r in enumerate(records)
                    ],
                )
                cur.executemany("DELETE FROM errors WHERE path = ?", [(p,) for p in stored])
                cur.execute(
                    "UPDATE meta SET value = ? WHERE key = 'next_vec_id'", (str(first + len(records)),)
                )
            errors = list(errors)
            cur.executemany(
                "INSERT OR REPLACE INTO errors VALUES (?, ?, ?, ?)",
                [(db_path(e.path), e.size, e.mtime_ns, e.message) for e in errors],
            )
            cur.executemany("DELETE FROM files WHERE path = ?", [(db_path(e.path),) for e in errors])
            cur.executemany(
                "UPDATE files SET size = ?, mtime_ns = ? WHERE path = ?",
                [(s, m, db_path(p)) for p, s, m in touched],
            )
            self._bump(cur)

    def delete(self, paths: Iterable[str]) -> int:
        """Forget `paths` (embeddings and error entries); returns how many embeddings were dropped."""
        paths = [(db_path(p),) for p in paths]
        with self._transaction() as cur:
            before = cur.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            cur.executemany("DELETE FROM files WHERE path = ?", paths)
            cur.executemany("DELETE FROM errors WHERE path = ?", paths)
            dropped = before - cur.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            self._bump(cur)
        return int(dropped)

    def compact(self, target_rows: int = SHARD_TARGET_ROWS) -> int:
        """Merge small shards and rewrite mostly-dead ones; returns the number of shards rewritten."""
        shards = self._rows(
            "SELECT s.id, s.name, s.rows, COUNT(f.path) FROM shards s LEFT JOIN files f ON f.shard = s.id "
            "GROUP BY s.id"
        )
        redo = [s for s in shards if s[3] < target_rows // 2 or s[3] < s[2] // 2]
        if len(redo) < 2 and not any(s[3] < s[2] for s in redo):
            return 0  # one small shard without dead rows: nothing to gain
        ids = [s[0] for s in redo]
        marks = ",".join("?" * len(ids))
        # Rows are re-pointed by vec_id (unique; a video has many rows per path).
        rows = self._rows(
            f"SELECT f.vec_id, s.name, f.row FROM files f JOIN shards s ON f.shard = s.id "
            f"WHERE f.shard IN ({marks}) ORDER BY f.path, f.time",
            ids,
        )
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
                    "UPDATE files SET shard = ?, row = ? WHERE vec_id = ?",
                    [(sid, i, p[0]) for i, p in enumerate(part)],
                )
            cur.execute(f"DELETE FROM shards WHERE id IN ({marks})", ids)
            self._bump(cur)
        del loaded
        for s in redo:
            (self.root / SHARD_DIR / s[1]).unlink(missing_ok=True)
        return len(redo)
