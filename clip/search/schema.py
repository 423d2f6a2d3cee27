"""The SQLite side of an index folder (`clip.search.store`): its tables, opening the database, and the
migration of an index made before videos.

`files` holds one row per embedding: an image's, or one frame's of a video (`time`: the frame's presentation
time in seconds, NULL for an image).  An index made before videos keyed `files` by path alone and had no `time`
column; the first process that opens it for writing rebuilds the table in one write transaction (the same rows,
each an image), and a process that cannot write it reads it as it is, every row an image.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

FORMAT_VERSION = 1

FILES_COLUMNS = """path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL, vec_id INTEGER NOT NULL UNIQUE,
    shard INTEGER NOT NULL, row INTEGER NOT NULL, time REAL"""
# One row per image, one per (video, time): NULL times are distinct in a UNIQUE index, so key on ifnull.
FILES_KEY = "CREATE UNIQUE INDEX IF NOT EXISTS files_key ON files (path, ifnull(time, -1.0))"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, rows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS files ({FILES_COLUMNS});
CREATE INDEX IF NOT EXISTS files_shard ON files (shard);
CREATE TABLE IF NOT EXISTS errors (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, message TEXT NOT NULL);
"""


def db_path(path: str) -> str | bytes:
    """How `path` is stored: itself when it is valid UTF-8, else the file name's bytes (lossless)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a name that was not UTF-8 on disk: Python holds it with surrogate escapes
        return os.fsencode(path)
    return path


def py_path(value: str | bytes) -> str:
    """The Python path of a stored value (inverse of `db_path`)."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def migrate(con: sqlite3.Connection) -> None:
    """Give an index made before videos the current `files` table, inside the caller's write transaction."""
    if not has_time_column(con):
        con.execute(f"CREATE TABLE files_v2 ({FILES_COLUMNS})")
        con.execute(
            "INSERT INTO files_v2 SELECT path, size, mtime_ns, sha256, width, height, vec_id, shard, row, NULL "
            "FROM files"
        )
        con.execute("DROP TABLE files")
        con.execute("ALTER TABLE files_v2 RENAME TO files")
        con.execute("CREATE INDEX IF NOT EXISTS files_shard ON files (shard)")
    con.execute(FILES_KEY)


def has_time_column(con: sqlite3.Connection) -> bool:
    return any(r[1] == "time" for r in con.execute("PRAGMA table_info(files)"))


def _use_wal(con: sqlite3.Connection, wait_s: float = 60.0) -> None:
    """Switch the database to WAL (a lasting property of the file) unless it is already.

    Changing the journal mode needs the database to itself, and SQLite answers "database is locked" at once,
    without waiting out the busy timeout, while another process is creating the same index: wait and retry.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def connect(db: Path) -> tuple[sqlite3.Connection, bool]:
    """(connection, read_only) to the index database `db`, created, initialised and migrated when writable.

    Raises sqlite3.Error for a database that cannot be read (the caller names the damage).
    """
    con = sqlite3.connect(db, isolation_level=None, check_same_thread=False, timeout=60)
    try:
        _use_wal(con)
        con.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss, not just SIGKILL
        con.executescript(SCHEMA)
        # INSERT OR IGNORE in one transaction: two processes creating one index cannot reset each other's
        # counters (a second writer resetting next_vec_id would reuse ids and replace rows).
        con.execute("BEGIN IMMEDIATE")
        con.executemany(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
            [("format_version", str(FORMAT_VERSION)), ("generation", "0"), ("next_vec_id", "0")],
        )
        migrate(con)
        con.execute("COMMIT")
        return con, False
    except sqlite3.OperationalError:
        con.close()
        if os.access(db, os.W_OK) and os.access(db.parent, os.W_OK):
            raise
    # A folder this process cannot write (read-only media, another user's index): read without writing.
    uri = "file:" + quote(os.fsencode(db.resolve()), safe="/")
    try:  # mode=ro still sees a live writer's WAL, if the -shm file exists and can be read
        con = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
        con.execute("SELECT COUNT(*) FROM meta").fetchone()
        return con, True
    except sqlite3.OperationalError:
        con.close()
    # No -shm and no right to create one: nobody can be writing it, so read the file as it is.
    return sqlite3.connect(
        f"{uri}?immutable=1", uri=True, check_same_thread=False, isolation_level=None
    ), True
