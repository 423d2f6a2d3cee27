"""The run folder (`--output-dir`): checked, locked for one run at a time, and cleared of our stale temp files.

Two runs writing one folder would interleave their checkpoints, config and metrics, so the main process holds
an exclusive `flock` on `OUT/.train.lock` for the whole run; a second run fails at once, naming the holder's
pid. The kernel drops the lock when the holder exits in any way (SIGKILL included), so a killed run never
leaves the folder locked. While the lock is held nobody else writes here, so any partial file an earlier,
interrupted save left (`.step_NNNNNN.pt.tmp-*`, `.config.json.tmp-*`, ...) is stale and is removed; only names
matching our own writers' patterns are touched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from clip.io import temp_pattern

LOCK_FILE = ".train.lock"
# folder (relative to OUT) -> names of the files we write there atomically
OUR_FILES = {
    ".": r"config\.json|metrics\.jsonl|curves\.png",
    "checkpoints": r"step_\d{6,}\.pt|latest\.pt",
}


class RunDirError(ValueError):
    """The run folder cannot be used: not a folder, not writable, or in use by another run."""


def prepare(output_dir: str | os.PathLike) -> Path:
    """Create OUT and OUT/checkpoints, failing in one line when OUT is a file or cannot be written."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {str(out)!r} is a file, not a folder; give a folder path")
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunDirError(
            f"--output-dir {str(out)!r}: a part of that path is a file, not a folder; give another path"
        ) from None
    except OSError as err:
        raise RunDirError(
            f"cannot create --output-dir {str(out)!r}: {err.strerror}; choose a folder you can write"
        ) from None
    for folder in (out, out / "checkpoints"):
        try:  # os.access says yes to root on a read-only mount; a real file creation is the true test
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise RunDirError(
                f"cannot write in --output-dir {str(folder)!r}: {err.strerror}; choose a folder you can "
                "write, or fix its permissions"
            ) from None
    return out


def remove_stale_temps(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the partial files interrupted saves left in OUT (our own name patterns only); returns them."""
    removed = []
    for sub, names in OUR_FILES.items():
        folder = Path(output_dir) / sub
        if not folder.is_dir():
            continue
        pattern = temp_pattern(names)
        for path in folder.iterdir():
            if pattern.match(path.name) and (path.is_file() or path.is_symlink()):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _lock(out: Path) -> int | None:
    """Take the exclusive lock (non-blocking); the fd holds it until closed. None where flock does not exist."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: run unlocked rather than not at all
        return None
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: somebody holds it
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(
            f"another `clip train` (pid {holder}) is writing to --output-dir {str(out)!r}; wait for it to "
            "finish or give another --output-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def claim(output_dir: str | os.PathLike, *, enabled: bool = True) -> Iterator[list[Path]]:
    """Check and lock OUT for this run and remove stale partial files; yields the paths removed.

    `enabled=False` (ranks other than 0, which write nothing) does nothing.
    """
    if not enabled:
        yield []
        return
    out = prepare(output_dir)
    fd = _lock(out)
    try:
        yield remove_stale_temps(out)
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock; the file stays (deleting it would race a run just opening it)
