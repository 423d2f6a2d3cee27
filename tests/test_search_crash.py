"""A process killed (SIGKILL) while indexing leaves a consistent index that the next run completes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from clip.config import get_config
from clip.model import CLIP
from clip.search.index import Index
from clip.search.store import DB_NAME, SHARD_DIR

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

# Runs in a child process: index slowly (a short sleep per batch, committing every batch) until killed.
CHILD = """
import sys, time
from clip.search import encoder
from clip.search.index import Index

encode = encoder.Encoder.encode_pixels
def slow(self, pixels):
    time.sleep(0.05)
    return encode(self, pixels)
encoder.Encoder.encode_pixels = slow
idx = Index.open(sys.argv[1], model=sys.argv[2])
idx.sync(sys.argv[3], batch_size=4, num_workers=1, commit_seconds=0)
"""


def make_images(folder, n):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((32, 32), Image.Resampling.NEAREST).save(folder / f"{i:03d}.png")
    return sorted(str(p) for p in folder.iterdir())


def committed(idx_dir) -> int:
    db = idx_dir / DB_NAME
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # schema not created yet


def kill_when(idx_dir, args, at_least, timeout=120):
    """Start the child, SIGKILL it once `at_least` embeddings are committed; return the count then."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while committed(idx_dir) < at_least:
            assert proc.poll() is None, (
                f"indexer ended before being killed: {proc.stderr.read().decode()[-2000:]}"
            )
            assert time.monotonic() < deadline, "indexer too slow"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return committed(idx_dir)


def check_consistent(idx_dir, paths, model):
    """Every committed row's vector is the file's own embedding; every referenced shard exists."""
    idx = Index.open(idx_dir)
    loaded = idx._load()
    snap = loaded.snap
    assert len(snap.paths) == len(idx) and set(snap.paths) <= set(paths)
    fresh = idx_encode(model, snap.paths)
    np.testing.assert_allclose(snap.vectors.astype(np.float32), fresh, atol=2e-3)
    idx.close()
    return len(snap.paths)


def idx_encode(model, paths):
    from clip.preprocess import image_transform, load_image
    from clip.search.encoder import Encoder

    enc = Encoder(model, image_transform(32))
    return enc.encode_images([load_image(p, exif=True) for p in paths]).numpy()


def test_sigkill_mid_index_then_resume(tmp_path):
    from clip.loading import save_model

    torch.manual_seed(0)
    model = CLIP(get_config("ViT-Tiny/8@32px")).eval()
    ckpt = tmp_path / "tiny.pt"
    save_model(model, ckpt)
    paths = make_images(tmp_path / "photos", 80)
    idx_dir = tmp_path / "idx"
    args = [str(idx_dir), str(ckpt), str(tmp_path / "photos")]

    # Two kills at different points, then a run that finishes.
    n1 = kill_when(idx_dir, args, 12)
    assert 12 <= n1 < 80 and check_consistent(idx_dir, paths, model) == n1
    n2 = kill_when(idx_dir, args, n1 + 16)
    assert n1 + 16 <= n2 < 80 and check_consistent(idx_dir, paths, model) == n2

    idx = Index.open(idx_dir)
    report = idx.sync(tmp_path / "photos", batch_size=8, num_workers=1)
    # Finished batches are not redone, and nothing is lost or doubled.
    assert (report.added, report.updated, report.skipped) == (80 - n2, 0, n2)
    assert len(idx) == 80 and check_consistent(idx_dir, paths, model) == 80
    # Orphaned shards of the killed runs were removed; only committed ones remain.
    with sqlite3.connect(idx_dir / DB_NAME) as con:
        live = {r[0] for r in con.execute("SELECT name FROM shards")}
    assert {f.name for f in (idx_dir / SHARD_DIR).iterdir()} == live
    assert idx.search_image(paths[5], k=1)[0].path == paths[5]


def test_interrupted_commit_and_compaction_leave_last_state(tmp_path, monkeypatch):
    """Deterministic versions of the two crash windows: after a shard file is written, before its commit."""
    from clip.search.store import FileRecord, Store

    store = Store(tmp_path / "idx", create=True)
    vecs = np.eye(4, 8, dtype=np.float16)
    records = [FileRecord(f"/p/{i}.png", 1, 1, "h", 1, 1) for i in range(4)]
    store.commit(vecs[:2], records[:2])
    store.commit(vecs[2:], records[2:])
    before = store.snapshot(8)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(store, "_transaction", crash)
    with pytest.raises(KeyboardInterrupt):
        store.commit(vecs[:1], [FileRecord("/p/new.png", 1, 1, "h", 1, 1)])
    with pytest.raises(KeyboardInterrupt):
        store.compact()  # would merge the two small shards
    monkeypatch.undo()
    shard_files = {f.name for f in (tmp_path / "idx" / SHARD_DIR).iterdir()}
    assert len(shard_files) == 4  # two committed, two orphans
    after = store.snapshot(8)
    assert after.paths == before.paths and np.array_equal(after.vectors, before.vectors)
    with store.writing():
        pass
    assert len(list((tmp_path / "idx" / SHARD_DIR).iterdir())) == 2
    assert store.compact() == 2 and len(list((tmp_path / "idx" / SHARD_DIR).iterdir())) == 1
    assert np.array_equal(store.snapshot(8).vectors, before.vectors)
