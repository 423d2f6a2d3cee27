"""`clip embed`: shards equal to direct encoding, the same for 1 process and `torchrun --nproc_per_node 2`
(vector for vector), every input kind (folder, CSV/TSV/Parquet, WebDataset tars), and a SIGKILLed job that
resumes to every input embedded exactly once."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip
from clip.cli import main
from clip.collection import shards
from clip.preprocess import load_image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def make_folder(root: Path, n: int = 10, size: int = 40, seed: int = 0) -> list[str]:
    """n random images with captions (image 3 has none), plus one corrupt file; returns the good keys."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(n):
        name = f"sub/im{i:03d}.png" if i % 4 == 1 else f"im{i:03d}.png"
        (root / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size - 10 + i % 7, size, 3), dtype=np.uint8)).save(root / name)
        if i != 3:
            (root / name).with_suffix(".txt").write_text(f"a photo number {i}")
        keys.append(name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return sorted(keys + ["broken.png"]), keys


def embed(args: list[str]) -> None:
    assert main(["embed", *args, "--no-progress"]) == 0


def subprocess_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    return env


def expected_embeddings(checkpoint: Path, paths: list[Path]) -> np.ndarray:
    model, preprocess = clip.load(str(checkpoint), device="cpu")
    pixels = torch.stack([preprocess(load_image(p, exif=True)) for p in paths])
    with torch.no_grad():
        return F.normalize(model.encode_image(pixels), dim=-1).numpy()


def test_folder_shards_match_direct_encoding(tmp_path, tiny_checkpoint, one_thread):
    listed, good = make_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    embed([str(tmp_path / "imgs"), "--model", str(tiny_checkpoint), "--output", str(out), "--shard-size", "4",
           "--batch-size", "3", "--workers", "0", "--text"])  # fmt: skip
    assert shards.complete_chunks(out) == [f"part-{u:06d}-000" for u in range(3)]  # 11 rows in slices of 4
    meta = shards.load_metadata(out)
    keys = meta.column("key").to_pylist()
    assert keys == [k for k in listed if k != "broken.png"]
    emb = shards.load_embeddings(out)
    assert emb.dtype == np.float16 and emb.shape == (10, 64)
    np.testing.assert_allclose(emb, expected_embeddings(tiny_checkpoint, [tmp_path / "imgs" / k for k in keys]),
                               atol=1e-3)  # fmt: skip
    captions = meta.column("caption").to_pylist()
    assert captions[keys.index("im003.png")] == ""  # no .txt: an empty caption, still embedded
    assert captions[keys.index("im000.png")] == "a photo number 0"
    sizes = {
        k: (w, h)
        for k, w, h in zip(keys, meta.column("width").to_pylist(), meta.column("height").to_pylist())
    }
    assert sizes["im002.png"] == (40, 32)
    model, _ = clip.load(str(tiny_checkpoint), device="cpu")
    with torch.no_grad():
        text = F.normalize(model.encode_text(clip.tokenize(captions, context_length=32)), dim=-1).numpy()
    np.testing.assert_allclose(shards.text_embeddings(meta), text, atol=1e-3)
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["rows"] == 11 and report["embedded"] == 10
    assert [e["key"] for e in report["errors"]] == ["broken.png"]


def test_torchrun_two_ranks_equal_one_process(tmp_path, tiny_checkpoint):
    make_folder(tmp_path / "imgs", n=13)
    args = [str(tmp_path / "imgs"), "--model", str(tiny_checkpoint), "--shard-size", "3", "--batch-size", "2",
            "--text", "--no-progress"]  # fmt: skip
    one = tmp_path / "one"
    assert main(["embed", *args, "--output", str(one), "--workers", "0"]) == 0
    two = tmp_path / "two"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clip", "embed",
           *args, "--output", str(two), "--workers", "2", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stdout
    names = shards.complete_chunks(one)
    assert names == shards.complete_chunks(two) and len(names) == 5  # 14 rows in slices of 3
    for name in names:  # vector for vector: the same bytes
        assert (one / "img_emb" / f"{name}.npy").read_bytes() == (
            two / "img_emb" / f"{name}.npy"
        ).read_bytes()
        assert pq.read_table(one / "metadata" / f"{name}.parquet").equals(
            pq.read_table(two / "metadata" / f"{name}.parquet")
        )
    report = json.loads((two / "report.json").read_text())
    assert report["complete"] and report["last_run"]["world_size"] == 2 and report["embedded"] == 13


def test_tables_and_tars_read_the_same_pairs(tmp_path, tiny_checkpoint, one_thread):
    _, good = make_folder(tmp_path / "imgs", n=7)
    rows = [(k, f"caption, {i}") for i, k in enumerate(good)] + [("missing.png", "gone")]
    (tmp_path / "imgs" / "pairs.csv").write_text(
        "filepath,caption\n" + "".join(f'{k},"{c}"\n' for k, c in rows)
    )  # fmt: skip
    (tmp_path / "imgs" / "pairs.tsv").write_text(
        "filepath\tcaption\n" + "".join(f"{k}\t{c}\n" for k, c in rows)
    )
    pq.write_table(pa.table({"filepath": [k for k, _ in rows], "caption": [c for _, c in rows]}),
                   tmp_path / "imgs" / "pairs.parquet")  # fmt: skip
    outs = {}
    for ext in ("csv", "tsv", "parquet"):
        outs[ext] = tmp_path / ext
        embed([str(tmp_path / "imgs" / f"pairs.{ext}"), "--model", str(tiny_checkpoint), "--output",
               str(outs[ext]), "--shard-size", "3", "--workers", "0"])  # fmt: skip
    ref = shards.load_embeddings(outs["csv"])
    meta = shards.load_metadata(outs["csv"])
    assert meta.column("key").to_pylist() == good and meta.column("caption").to_pylist()[1] == "caption, 1"
    for ext in ("tsv", "parquet"):
        np.testing.assert_array_equal(shards.load_embeddings(outs[ext]), ref)
        assert (
            shards.load_metadata(outs[ext]).column("caption").to_pylist()
            == meta.column("caption").to_pylist()
        )
    errors = json.loads((outs["parquet"] / "report.json").read_text())["errors"]
    assert [e["key"] for e in errors] == ["missing.png"] and "not found" in errors[0]["error"]

    # The same images as WebDataset shards (img2dataset's layout), one sample without an image, one cut shard.
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for s, part in enumerate((rows[:4], rows[4:7])):
        with tarfile.open(shard_dir / f"{s:05d}.tar", "w") as tar:
            for j, (k, c) in enumerate(part):
                key = f"{s:05d}{j:04d}"
                members = {"png": (tmp_path / "imgs" / k).read_bytes()}
                members["txt" if j % 2 else "json"] = (
                    c.encode() if j % 2 else json.dumps({"caption": c}).encode()
                )
                if s == 1 and j == 0:
                    members = {"txt": b"no image here"}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    data = (shard_dir / "00001.tar").read_bytes()
    (shard_dir / "00002.tar").write_bytes(data[: len(data) // 2 + 100])  # a download cut short
    tar_out = tmp_path / "tar"
    embed([str(shard_dir), "--model", str(tiny_checkpoint), "--output", str(tar_out), "--shard-size", "2",
           "--workers", "2"])  # fmt: skip
    tmeta = shards.load_metadata(tar_out)
    assert shards.complete_chunks(tar_out)[:3] == ["part-000000-000", "part-000000-001", "part-000001-000"]
    assert tmeta.column("caption").to_pylist()[:6] == [c for _, c in rows[:4]] + [c for _, c in rows[5:7]]
    assert tmeta.column("key").to_pylist()[:2] == ["000000000", "000000001"]
    assert tmeta.column("tar").to_pylist()[0] == str(shard_dir / "00000.tar")
    np.testing.assert_allclose(
        shards.load_embeddings(tar_out)[:6], np.concatenate([ref[:4], ref[5:7]]), atol=1e-3
    )
    report = json.loads((tar_out / "report.json").read_text())
    assert report["complete"] and report["units"] == 3
    messages = " | ".join(e["error"] for e in report["errors"])
    assert "no image" in messages and "00002.tar" in messages


def test_sigkill_mid_run_then_resume_embeds_every_input_exactly_once(tmp_path, tiny_checkpoint, one_thread):
    rng = np.random.default_rng(1)
    photos = tmp_path / "photos"
    photos.mkdir()
    n = 72
    for i in range(n):  # large JPEGs: decoding takes long enough to kill the job half-way
        Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(
            photos / f"p{i:03d}.jpg", quality=85
        )
    out = tmp_path / "out"
    args = [str(photos), "--model", str(tiny_checkpoint), "--output", str(out), "--shard-size", "4",
            "--batch-size", "2", "--workers", "0", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen([PYTHON, "-m", "clip", "embed", *args], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(shards.complete_chunks(out)) < 2 and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(shards.complete_chunks(out))
    assert 2 <= done_before < n // 4, f"the kill must land mid-run ({done_before} chunks done)"

    assert main(["embed", *args]) == 0  # resumes: finished chunks are not redone
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["last_run"]["rows"] == n - 4 * done_before
    keys = shards.load_metadata(out).column("key").to_pylist()
    assert keys == [f"p{i:03d}.jpg" for i in range(n)]  # every input once, in order
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    reference = tmp_path / "reference"
    embed([*args[:4], str(reference), *args[5:11]])
    np.testing.assert_array_equal(shards.load_embeddings(out), shards.load_embeddings(reference))


def test_a_different_job_in_the_same_folder_is_refused(tmp_path, tiny_checkpoint, capsys):
    make_folder(tmp_path / "imgs", n=4)
    args = [
        str(tmp_path / "imgs"),
        "--model",
        str(tiny_checkpoint),
        "--output",
        str(tmp_path / "out"),
        "--workers",
        "0",
    ]
    embed(args)
    assert main(["embed", *args, "--shard-size", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different job" in err[0] and "shard_size" in err[0]


def test_missing_pyarrow_names_the_extra(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    make_folder(tmp_path / "imgs", n=2)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    code = main(
        ["embed", str(tmp_path / "imgs"), "--model", str(tiny_checkpoint), "--output", str(tmp_path / "o")]
    )
    assert code == 2
    assert "pip install 'clipforge[embed]'" in capsys.readouterr().err


def test_bf16_autocast_agrees_with_fp32(tmp_path, tiny_checkpoint, one_thread):
    make_folder(tmp_path / "imgs", n=5)
    common = [str(tmp_path / "imgs"), "--model", str(tiny_checkpoint), "--workers", "0", "--device", "cpu"]
    embed([*common, "--output", str(tmp_path / "fp32")])
    embed([*common, "--output", str(tmp_path / "bf16"), "--precision", "bf16"])
    a = shards.load_embeddings(tmp_path / "fp32").astype(np.float32)
    b = shards.load_embeddings(tmp_path / "bf16").astype(np.float32)
    assert not np.array_equal(a, b)  # bf16 really ran
    assert (a * b).sum(1).min() > 0.99
    assert shards.read_job(tmp_path / "bf16")["precision"] == "bf16"
