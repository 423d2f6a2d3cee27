"""What can go wrong with an index folder, as one-line errors: locked, damaged, read-only, unwritable.

`shard_problem` and `database_error` diagnose; `clip.search.store` raises these (and re-exports them).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np

DB_NAME = "index.sqlite"


class IndexLockedError(RuntimeError):
    pass


class DamagedIndexError(ValueError):
    """index.sqlite or a shard file is unreadable or not what the database says; the message names the fix."""


class IndexWriteError(RuntimeError):
    """A batch could not be written (disk full, quota, I/O error); the index keeps every earlier batch."""


class ReadOnlyIndexError(RuntimeError):
    """A write was asked of an index this process cannot write."""


def shard_problem(path: Path, rows: int, dim: int) -> str | None:
    """Why the shard file `path` cannot be float16 [rows, dim] (missing, truncated, ...), or None if it can.

    Reads only the .npy header and the file size, so checking every shard costs next to nothing.
    """
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return f"has unsupported .npy version {version}"
            offset, size = f.tell(), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError, EOFError) as err:
        return f"is unreadable ({type(err).__name__}: {err})"
    if dtype != np.float16:
        return f"holds {dtype}, not float16"
    if tuple(shape) != (rows, dim) or fortran:
        return f"has shape {tuple(shape)}, expected ({rows}, {dim})"
    if size != offset + rows * dim * 2:
        return f"is truncated ({size} bytes, expected {offset + rows * dim * 2})"
    return None


def database_error(root: Path, err: sqlite3.Error) -> Exception:
    """The one-line error for a failing SQLite call: read-only, damaged, or (busy, ...) the error itself."""
    text = str(err)
    if "readonly" in text or "read-only" in text:
        return ReadOnlyIndexError(
            f"index {str(root)!r} is read-only ({text}): make it writable (chmod -R u+w {root}) "
            "or index into another folder"
        )
    if isinstance(err, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text):
        return DamagedIndexError(
            f"index {str(root)!r} is damaged: {DB_NAME} is not a readable SQLite database ({text}); "
            f"rebuild it: mv {root / DB_NAME} {root / DB_NAME}.damaged, then "
            f"`clip index PHOTOS --index {root} --model M`"
        )
    return err
