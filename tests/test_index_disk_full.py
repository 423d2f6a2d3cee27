"""`clip index` on a full disk: one clear line, nothing half-recorded, and the next run continues."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from clip.config import get_config
from clip.loading import save_model
from clip.model import CLIP
from clip.search.index import Index

# The kernel refuses writes past a file-size limit set just before the first shard is written
# (RLIMIT_FSIZE; SIGXFSZ ignored so that the write fails instead of killing the process).
FULL_AT_FIRST_SHARD = textwrap.dedent(
    """
    import resource, signal, sys
    import clip.search.store as store
    real = store.Store._write_shard
    def write(self, vectors):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))
        return real(self, vectors)
    store.Store._write_shard = write
    from clip.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_disk_full_during_an_index_write_is_one_line_and_recoverable(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{i}.png")
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), tmp_path / "m.pt")
    script = tmp_path / "full.py"
    script.write_text(FULL_AT_FIRST_SHARD)
    args = ["index", str(photos), "--index", str(tmp_path / "idx"), "--model", str(tmp_path / "m.pt"),
            "--workers", "0", "--no-progress"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write to index" in lines[0] and "run clip index again" in lines[0]
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "idx" / "shards").glob("*.npy")) == []  # no orphan shard
    # Space is back: the same command continues and the index is complete and searchable.
    done = subprocess.run([sys.executable, "-m", "clip", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Index.open(tmp_path / "idx", create=False) as idx:
        assert len(idx) == 6
        assert len(idx.search_text("a photo", k=3)) == 3
