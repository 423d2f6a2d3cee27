"""`clip filter`: the kept set equals an exact NumPy computation on the same vectors, the greedy near-duplicate
pass on hand-made vectors, every output format, and the filtered pairs train with `clip train`."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

import clip
from clip.cli import main
from clip.collection import shards
from clip.collection.filter import near_duplicates

pq = pytest.importorskip("pyarrow.parquet")

WORDS = ["red", "dog", "beach", "house", "a cat", "sky", "car", "tree", "blue", "night", "river", "bird"]
TINY_TRAIN = {
    "embed_dim": 32,
    "vision": {"kind": "vit", "image_size": 16, "width": 32, "layers": 1, "heads": 2, "patch_size": 8},
    "text": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_near_duplicates_is_greedy_in_input_order():
    # x1 is a near copy of x0; x2 is near x1 but not x0 (x1 is dropped, so x2 stays); x3 repeats x2; x4 unrelated
    c = np.cos(np.radians(10.0)), np.sin(np.radians(10.0))
    x = np.array([[1, 0, 0], [c[0], c[1], 0], [np.cos(np.radians(20.0)), np.sin(np.radians(20.0)), 0],
                  [np.cos(np.radians(20.0)), np.sin(np.radians(20.0)), 0], [0, 0, 1]])  # fmt: skip
    threshold = float(np.cos(np.radians(15.0)))
    everyone = np.ones(5, dtype=bool)
    np.testing.assert_array_equal(near_duplicates(x, everyone, threshold), [False, True, False, True, False])
    # Non-candidates neither count as keepers nor get marked.
    np.testing.assert_array_equal(near_duplicates(x, np.array([False, True, True, True, True]), threshold),
                                  [False, False, True, True, False])  # fmt: skip
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 8))
    v = np.concatenate([base, base[::3] + 0.05 * rng.normal(size=base[::3].shape)])[rng.permutation(54)]
    mask = rng.random(54) < 0.8
    whole = near_duplicates(v, mask, 0.9, block=4096)
    assert whole.sum() >= 5
    for block in (1, 3, 7):  # block edges change nothing
        np.testing.assert_array_equal(near_duplicates(v, mask, 0.9, block=block), whole)


def make_pairs(root: Path, n: int = 24, seed: int = 0) -> None:
    """n images with captions: random ones, exact copies and slightly brightened copies; two empty captions."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    originals = []
    for i in range(n):
        if i >= 6 and i % 5 == 0:
            img = originals[i // 5]  # an exact copy
        elif i >= 6 and i % 5 == 2:
            img = ImageEnhance.Brightness(originals[i // 5 + 1]).enhance(1.1)  # a near copy
        else:
            img = Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8))
        originals.append(img)
        img.save(root / f"p{i:03d}.png")
        caption = "" if i in (4, 17) else " ".join(rng.choice(WORDS, size=3))
        (root / f"p{i:03d}.txt").write_text(caption)


def between(values: np.ndarray, q: float) -> float:
    """A threshold at quantile q lying half-way between two distinct values (no ties at the boundary)."""
    v = np.unique(values)
    k = min(int(q * (len(v) - 1)), len(v) - 2)
    return float((v[k] + v[k + 1]) / 2)


def numpy_oracle(img, txt, captions, t_sim, exclude, t_ex, keep, t_keep, t_dup) -> list[str]:
    """The filter, pair by pair in float64."""
    unit = lambda a: a.astype(np.float64) / np.linalg.norm(a.astype(np.float64), axis=-1, keepdims=True)  # noqa: E731
    img, txt, exclude, keep = unit(img), unit(txt), unit(exclude), unit(keep)
    reasons, kept = [], []
    for i in range(len(img)):
        if not captions[i].strip():
            reasons.append("empty_caption")
        elif img[i] @ txt[i] < t_sim:
            reasons.append("low_similarity")
        elif (exclude @ img[i]).max() >= t_ex:
            reasons.append("excluded")
        elif (keep @ img[i]).max() < t_keep:
            reasons.append("not_kept")
        elif kept and (np.array(kept) @ img[i]).max() >= t_dup:
            reasons.append("duplicate")
        else:
            reasons.append("kept")
            kept.append(img[i])
    return reasons


@pytest.fixture
def embedded(tmp_path, tiny_checkpoint):
    make_pairs(tmp_path / "pairs")
    out = tmp_path / "emb"
    assert main(["embed", str(tmp_path / "pairs"), "--model", str(tiny_checkpoint), "--output", str(out),
                 "--text", "--shard-size", "5", "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    return out


def test_kept_set_equals_numpy_on_the_same_vectors(embedded, tmp_path, tiny_checkpoint, one_thread):
    meta = shards.load_metadata(embedded)
    img, txt = shards.load_embeddings(embedded), shards.text_embeddings(meta)
    captions = meta.column("caption").to_pylist()
    keys = meta.column("key").to_pylist()
    model, _ = clip.load(str(tiny_checkpoint), device="cpu")
    from clip.score import encode_captions

    exclude_q, keep_q = ["a dog", "a watermark"], ["a photo", "noise", "a car"]
    ex, kp = encode_captions(model, exclude_q).numpy(), encode_captions(model, keep_q).numpy()
    u = img.astype(np.float64) / np.linalg.norm(img.astype(np.float64), axis=1, keepdims=True)
    t_sim = between((u * (txt / np.linalg.norm(txt.astype(np.float64), axis=1, keepdims=True))).sum(1), 0.15)
    t_ex = between((u @ ex.T.astype(np.float64)).max(1), 0.9)
    t_keep = between((u @ kp.T.astype(np.float64)).max(1), 0.1)
    t_dup = between((u @ u.T)[np.triu_indices(len(u), 1)], 0.97)
    expected = numpy_oracle(img, txt, captions, t_sim, ex, t_ex, kp, t_keep, t_dup)
    for r in ("empty_caption", "low_similarity", "excluded", "not_kept", "duplicate", "kept"):
        assert r in expected, f"the data must exercise {r}"

    out = tmp_path / "filtered"
    args = ["filter", str(embedded), "--output", str(out), "--min-similarity", str(t_sim), "--dedup-threshold",
            str(t_dup), "--exclude-threshold", str(t_ex), "--keep-threshold", str(t_keep), "--no-progress"]  # fmt: skip
    for q in exclude_q:
        args += ["--exclude", q]
    for q in keep_q:
        args += ["--keep", q]
    assert main(args) == 0
    decisions = pq.read_table(out / "decisions.parquet")
    assert decisions.column("key").to_pylist() == keys
    assert decisions.column("reason").to_pylist() == expected
    with open(out / "kept.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == [k for k, r in zip(keys, expected) if r == "kept"]
    assert rows[0]["filepath"] == str(embedded.parent / "pairs" / rows[0]["key"])
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["total"] == 24 and report["counts"]["kept"] == expected.count("kept")
    assert report["counts"]["duplicate"] == expected.count("duplicate")
    assert sum(report["similarity"]["histogram"]["counts"]) == 24
    assert Image.open(out / "similarity.png").size[0] > 100


def test_filtered_output_trains(embedded, tmp_path, one_thread):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_TRAIN))
    for fmt in ("csv", "wds"):
        out = tmp_path / f"f-{fmt}"
        assert main(["filter", str(embedded), "--output", str(out), "--format", fmt, "--min-similarity", "-1",
                     "--dedup-threshold", "0.9999", "--samples-per-shard", "6", "--no-progress"]) == 0  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        kept = report["counts"]["kept"]
        assert report["counts"]["duplicate"] >= 2 and kept == 24 - 2 - report["counts"]["duplicate"]
        assert report["output"]["pairs"] == kept
        if fmt == "wds":
            tars = sorted((out / "shards").glob("*.tar"))
            assert len(tars) == -(-kept // 6)
            with tarfile.open(tars[0]) as tar:
                names = tar.getnames()
                meta = json.loads(tar.extractfile("000000000.json").read())
                png = tar.extractfile("000000000.png").read()
            assert names[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
            assert (
                png == (embedded.parent / "pairs" / meta["key"]).read_bytes()
            )  # bytes copied, not re-encoded
        run = tmp_path / f"run-{fmt}"
        argv = ["train", "--train-data", report["output"]["train_data"], "--model-config", str(tmp_path / "tiny.json"),
                "--steps", "3", "--batch-size", "4", "--warmup", "1", "--workers", "0", "--output-dir", str(run),
                "--save-every", "3", "--log-every", "1", "--device", "cpu", "--no-progress"]  # fmt: skip
        if fmt == "wds":
            argv += ["--train-num-samples", str(kept)]
        assert main(argv) == 0
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [s["loss"] for s in steps if "loss" in s]
        assert len(losses) == 3 and all(np.isfinite(losses))
        assert (run / "checkpoints" / "latest.pt").is_file()


def test_raw_inputs_are_embedded_first_and_tars_stay_tars(
    tmp_path, tiny_checkpoint, embedded, one_thread, capsys
):
    out = tmp_path / "direct"
    assert main(["filter", str(tmp_path / "pairs"), "--model", str(tiny_checkpoint), "--output", str(out),
                 "--shard-size", "5", "--workers", "0", "--min-similarity", "0", "--format", "parquet",
                 "--no-progress"]) == 0  # fmt: skip
    np.testing.assert_array_equal(
        shards.load_embeddings(out / "embeddings"), shards.load_embeddings(embedded)
    )
    kept = pq.read_table(out / "kept.parquet")
    sims = kept.column("similarity").to_numpy()
    assert len(kept) > 0 and (sims >= 0).all()

    # WebDataset in, WebDataset out: the kept samples' bytes come from the source tar.
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tar:
        for i in range(8):
            for ext, data in (("png", (tmp_path / "pairs" / f"p{i:03d}.png").read_bytes()),
                              ("txt", (tmp_path / "pairs" / f"p{i:03d}.txt").read_bytes())):  # fmt: skip
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "wds"
    assert main(["filter", str(src / "00000.tar"), "--model", str(tiny_checkpoint), "--output", str(out),
                 "--workers", "0", "--min-similarity", "-1", "--format", "wds", "--no-progress"]) == 0  # fmt: skip
    with tarfile.open(out / "shards" / "00000.tar") as tar:
        metas = [json.loads(tar.extractfile(n).read()) for n in tar.getnames() if n.endswith(".json")]
        first = tar.extractfile("000000000.png").read()
    assert [m["key"] for m in metas] == [f"s{i:03d}" for i in range(8) if i != 4]  # p004 has an empty caption
    assert first == (tmp_path / "pairs" / "p000.png").read_bytes()
    again = tmp_path / "again"  # --embeddings: an existing embedding of the same input is reused, not redone
    assert main(["filter", str(src / "00000.tar"), "--output", str(again), "--model", str(tiny_checkpoint),
                 "--embeddings", str(out / "embeddings"), "--format", "parquet", "--min-similarity", "-1", "--workers", "0",
                 "--no-progress"]) == 0  # fmt: skip
    assert json.loads((out / "embeddings" / "report.json").read_text())["last_run"]["rows"] == 0
    assert pq.read_table(again / "kept.parquet").column("tar").to_pylist()[0] == str(src / "00000.tar")
    assert main(["filter", str(out / "embeddings"), "--output", str(tmp_path / "y"), "--format", "csv",
                 "--min-similarity", "-1"]) == 2  # fmt: skip
    assert "--format wds" in capsys.readouterr().err


def test_similarity_filter_needs_caption_embeddings(tmp_path, tiny_checkpoint, capsys):
    make_pairs(tmp_path / "pairs", n=3)
    assert main(["embed", str(tmp_path / "pairs"), "--model", str(tiny_checkpoint), "--output", str(tmp_path / "e"),
                 "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["filter", str(tmp_path / "e"), "--output", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--text" in err[0]
