"""Atomic file writes: a reader sees either the old file or the whole new one, never a half.

Every file this project writes (checkpoints, caches, indexes, reports) goes through
`atomic_path`: write to a temporary file in the same folder, flush to disk, then
`os.replace` it over the destination.  A crash leaves at most a stray `.NAME.tmp-*` file
(`TMP_INFIX` names the pattern, so cleanup code can find them).  The finished file gets the
mode a plain `open(path, "w")` would give it (0666 minus the umask), not mkstemp's 0600, so
shared run folders and indexes stay readable to the people the umask allows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_INFIX = ".tmp-"  # temporary files are named f".{name}{TMP_INFIX}{random}"

# Serialises the os.umask(0)/os.umask(old) fallback, so two of our own threads never both read 0 back.
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the system tells it (Linux /proc), else set-and-reset.

    The fallback sets the umask for an instant (to 0o022), which another thread creating a file in that instant
    would see; it runs under a lock so at least our own writers never race each other.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 without the umask bits."""
    return 0o666 & ~current_umask()


def temp_pattern(name: str) -> re.Pattern[str]:
    """Regex matching the temporary files `atomic_path` leaves for destination file names matching `name`
    (a regex without anchors, e.g. r"step_\\d+\\.pt")."""
    return re.compile(rf"^\.(?:{name}){re.escape(TMP_INFIX)}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on clean exit fsync it and move it into place.

    On an exception (disk full, a kill signal turned into an exception, ...) the temporary file is removed and
    `path` is left as it was. The new file has the default mode of a plain `open()` (see `default_file_mode`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_INFIX}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fchmod(f.fileno(), default_file_mode())  # mkstemp made it 0600
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Fail at once, in one line naming `flag`, when `path` cannot become a file (it is a folder, or its
    parent is a file), before any long job runs only to fail at the end. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{flag} {str(path)!r} is a folder; give a file path, e.g. {str(path / 'results.json')!r}"
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(
            f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder; choose another path"
        )
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
