"""`clip index` / `clip search` against hostile or damaged inputs: a race between two creating processes,
file names that are not UTF-8, damaged and read-only indexes, folders that cannot be listed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip
from clip import cli
from clip.config import get_config
from clip.model import CLIP
from clip.search.encoder import Encoder
from clip.search.index import Index
from clip.search.store import DB_NAME, SHARD_DIR

REPO = str(Path(clip.__file__).resolve().parents[1])
ODD = b"caf\xe9 \xff.png"  # Latin-1 bytes: not valid UTF-8


def make_photos(folder: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((40, 32), Image.Resampling.NEAREST).save(folder / f"img{i:02d}.png")
    return sorted(str(p) for p in folder.iterdir())


def write_checkpoint(path: Path, seed: int) -> str:
    from clip.loading import save_model

    torch.manual_seed(seed)
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), path)
    return str(path)


def run(*argv) -> int:
    return cli.main([os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in argv])


def run_utf8(*argv) -> tuple[int, bytes]:
    """`run`, with stdout as Python sets it up under a UTF-8 locale (strict errors); returns its bytes."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    saved, sys.stdout = sys.stdout, out
    try:
        code = run(*argv)
        out.flush()
        return code, raw.getvalue()
    finally:
        sys.stdout = saved


def assert_vectors_are_the_models(idx_dir: Path, expected: dict[str, dict[str, np.ndarray]]) -> None:
    """Every stored vector is the embedding, by the model the index records, of its own file.

    expected: model identity -> {path: that model's embedding of the file}.
    """
    with Index.open(idx_dir) as idx:
        vectors = expected[idx.model_identity]
        snap = idx._load().snap
    assert snap.paths == sorted(vectors)
    fresh = np.stack([vectors[p] for p in snap.paths])
    np.testing.assert_allclose(snap.vectors.astype(np.float32), fresh, atol=2e-3)


# Each of two processes, once per round: wait for the go signal, then create the same new index with its own
# model and fill it.  A busy machine is imitated by a pause right after reading "no model yet", the window
# in which the other process could record its model.
RACER = r"""
import json, os, sys, time
from clip.search.encoder import Encoder
from clip.search.index import Index, ModelMismatchError
from clip.search.store import IndexLockedError, Store

root, ckpt, photos, rounds, tag = sys.argv[1:]
encoder = Encoder.load(ckpt, "cpu")
get_meta = Store.get_meta
def slow_get_meta(self, key):
    value = get_meta(self, key)
    if key == "model_identity" and value is None:
        time.sleep(0.05)
    return value
Store.get_meta = slow_get_meta
results = []
for r in range(int(rounds)):
    open(os.path.join(root, f"ready{r}-{tag}"), "w").close()
    while not os.path.exists(os.path.join(root, f"go{r}")):
        time.sleep(0.001)
    try:
        with Index.open(os.path.join(root, f"idx{r}"), model=encoder) as idx:
            idx.sync(photos, num_workers=0)
        results.append("ok")
    except ModelMismatchError:
        results.append("mismatch")
    except IndexLockedError:
        results.append("locked")
print(json.dumps(results))
"""


def test_two_processes_creating_one_index_never_mix_models(tmp_path):
    from clip.preprocess import load_image

    photos = tmp_path / "photos"
    paths = make_photos(photos, 3)
    ckpts = [write_checkpoint(tmp_path / f"m{s}.pt", s) for s in (0, 1)]
    rounds = 5
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path), ckpt, str(photos), str(rounds), str(tag)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for tag, ckpt in enumerate(ckpts)
    ]
    try:
        # While the processes start: each model's own embedding of each photo.
        images = [load_image(p, exif=True) for p in paths]
        expected = {}
        for encoder in (Encoder.load(c, "cpu") for c in ckpts):
            expected[encoder.identity] = dict(zip(paths, encoder.encode_images(images).numpy(), strict=True))
        for r in range(rounds):  # release both processes at the same instant, round after round
            deadline = time.monotonic() + 120
            while not all((tmp_path / f"ready{r}-{t}").exists() for t in (0, 1)):
                for p in procs:
                    assert p.poll() is None, p.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.005)
            (tmp_path / f"go{r}").touch()
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    results = []
    for (out, err), p in zip(outputs, procs):
        assert p.returncode == 0, err.decode()[-3000:]
        results.append(json.loads(out))
    for r in range(rounds):
        # Exactly one model wins each new index; the other process is told so.
        assert sorted(res[r] for res in results) == ["mismatch", "ok"], (r, results)
        assert_vectors_are_the_models(tmp_path / f"idx{r}", expected)


def test_non_utf8_file_names_are_indexed_searched_and_printed(tmp_path):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from clip.search.server import create_app

    photos = tmp_path / "photos"
    make_photos(photos, 3)
    odd = os.path.join(os.fsencode(photos), ODD)
    Image.new("RGB", (40, 32), (250, 20, 20)).save(odd, format="PNG")
    ckpt = write_checkpoint(tmp_path / "tiny.pt", 0)
    idx_dir = tmp_path / "idx"
    code, out = run_utf8(
        "index", photos, "--index", idx_dir, "--model", ckpt, "--workers", "0", "--no-progress"
    )
    assert code == 0 and b"embedded 4 new" in out and b"0 unreadable" in out
    odd_str = os.fsdecode(odd)
    with Index.open(idx_dir) as idx:
        assert len(idx) == 4 and odd_str in idx and idx.search_image(odd_str, k=1)[0].path == odd_str
        # Run again: nothing to redo, and the name still round-trips.
        assert idx.sync(photos, num_workers=0).skipped == 4

    # Printed under a UTF-8 locale: the name's own bytes, after every other result, nothing lost.
    code, out = run_utf8("search", idx_dir, "a red square", "--image", odd_str, "-k", "4")
    assert code == 0 and out.startswith(b"# a red square\n") and out.count(b"\t") == 8
    assert (b"\n# " + odd + b"\n" + odd + b"\t") in out  # the query, then its own file first
    code, out = run_utf8("search", idx_dir, "--image", odd_str, "-k", "1", "--json")
    line = json.loads(out)
    assert code == 0 and line["results"][0]["path"] == odd_str and line["query"] == odd_str

    # clip classify prints its results too.
    code, out = run_utf8("classify", odd_str, "--labels", "a dog,a cat", "--model", ckpt, "--no-progress")
    assert code == 0 and out.startswith(odd + b"\n  ")

    # The server's JSON carries it (shown with U+FFFD), and its thumbnail URL finds the file.
    with Index.open(idx_dir) as idx:
        client = TestClient(create_app(idx, allowed_hosts=["testserver"]))
        res = client.post("/api/search/image?k=1", content=open(odd, "rb").read())
        assert res.status_code == 200
        hit = res.json()["results"][0]
        assert hit["name"] == "caf\ufffd \ufffd.png"
        assert client.get("/" + hit["thumb"]).status_code == 200
        assert client.get("/" + hit["image"]).content == open(odd, "rb").read()


@pytest.fixture
def small_index(tmp_path):
    """An index of 6 images (one shard); returns (photos folder, index folder, checkpoint, paths)."""
    photos = tmp_path / "photos"
    paths = make_photos(photos, 6)
    ckpt = write_checkpoint(tmp_path / "tiny.pt", 0)
    with Index.open(tmp_path / "idx", model=ckpt) as idx:
        idx.sync(photos, num_workers=0, batch_size=4)
    return photos, tmp_path / "idx", ckpt, paths


def only_shard(idx_dir: Path) -> Path:
    (shard,) = (idx_dir / SHARD_DIR).iterdir()
    return shard


@pytest.mark.parametrize("damage", ["truncated", "deleted", "float32", "folder deleted"])
def test_damaged_shard_is_reported_then_repaired(small_index, damage, capsys):
    photos, idx_dir, _, paths = small_index
    shard = only_shard(idx_dir)
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "deleted":
        shard.unlink()
    elif damage == "float32":
        np.save(shard, np.load(shard).astype(np.float32))
    else:
        shutil.rmtree(idx_dir / SHARD_DIR)
    assert run("search", idx_dir, "a dog") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged" in err and f"clip index PHOTOS --index {idx_dir}" in err

    assert run("index", photos, "--index", idx_dir, "--workers", "0", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "repaired: shard" in out and "its 6 images are embedded again" in out
    assert "embedded 6 new" in out
    assert run("search", idx_dir, "--image", paths[2], "-k", "1") == 0
    assert capsys.readouterr().out.startswith(paths[2] + "\t")


def test_damaged_database_is_reported_with_its_fix(small_index, capsys):
    photos, idx_dir, ckpt, paths = small_index
    (idx_dir / DB_NAME).write_bytes(b"this is not sqlite " * 300)
    for wal in idx_dir.glob(DB_NAME + "-*"):
        wal.unlink()
    assert run("search", idx_dir, "a dog") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is damaged" in err and "--model M" in err
    # The fix the message gives: move the database away, then index again.
    os.replace(idx_dir / DB_NAME, idx_dir / (DB_NAME + ".damaged"))
    assert run("index", photos, "--index", idx_dir, "--model", ckpt, "--workers", "0", "--no-progress") == 0
    with Index.open(idx_dir) as idx:
        assert len(idx) == 6 and idx.search_image(paths[0], k=1)[0].path == paths[0]
    assert len(list((idx_dir / SHARD_DIR).iterdir())) == 1  # the old shard was an orphan, and removed


@contextlib.contextmanager
def read_only(folder: Path):
    """Make `folder` read-only for this process: mode bits, and for root (who ignores them) the immutable
    attribute."""
    items = [folder, *folder.rglob("*")]
    modes = {p: p.stat().st_mode for p in items}
    as_root = os.geteuid() == 0
    try:
        for p in items:
            p.chmod(modes[p] & ~0o222)
        if as_root:
            subprocess.run(["chattr", "+i", *map(str, items)], check=True)
        yield
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", *map(str, items)], check=True)
        for p in items:
            p.chmod(modes[p])


def test_read_only_index_is_searched_and_writes_say_why(small_index, capsys):
    photos, idx_dir, _, paths = small_index
    with read_only(idx_dir):
        assert run("search", idx_dir, "--image", paths[1], "-k", "1") == 0
        assert capsys.readouterr().out.startswith(paths[1] + "\t")
        (photos / "new.png").write_bytes((photos / "img00.png").read_bytes())
        assert run("index", photos, "--index", idx_dir, "--workers", "0", "--no-progress") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "read-only" in err and "chmod -R u+w" in err


def test_unreadable_folder_is_reported_and_its_files_kept(tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    make_photos(photos / "locked", 3, seed=1)
    make_photos(photos, 2)
    ckpt = write_checkpoint(tmp_path / "tiny.pt", 0)
    args = ["index", photos, "--index", tmp_path / "idx", "--model", ckpt, "--workers", "0", "--no-progress"]
    assert run(*args) == 0
    capsys.readouterr()
    locked = str(photos / "locked")
    real_scandir = os.scandir

    def scandir(path="."):  # what the system answers for a folder without read permission
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert run(*args) == 0
    out = capsys.readouterr().out
    assert "1 folders could not be read" in out and f"{locked}: Permission denied" in out
    report = json.loads((tmp_path / "idx" / "report.json").read_text())
    assert report["last_run"]["unreadable_folders"] == [{"path": locked, "error": "Permission denied"}]
    assert report["last_run"]["removed"] == 0 and report["count"] == 5  # not taken as deleted
