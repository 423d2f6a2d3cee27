"""Data under misuse: bad WebDataset captions and truncated shards are skipped and counted (not fatal, not
silent); every command sees a photo upright (EXIF); training-time recall counts ties against the model; `clip
eval` checks --output before working and reports folders it could not read."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_datasets import make_folder
from test_hardening_train import unprivileged
from test_train_data import TINY_CONFIG, write_shards

import clip.cli
from clip.evaluation import metrics
from clip.evaluation.datasets import ImageDataset
from clip.preprocess import RandomResizedCrop, image_transform, load_image
from clip.train.data import PairDataset
from clip.train.validate import retrieval_recall
from clip.train.wds import WebDatasetEpoch, decode_sample

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format="PNG")
    return buf.getvalue()


def json_shard(path: Path, captions: list[bytes]) -> str:
    """A shard of png + json samples, sample i captioned by the raw bytes captions[i]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            for ext, data in (("png", _png((30 * i % 255, 90, 40))), ("json", caption)):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def epoch_of(urls: list[str], batch: int = 4) -> WebDatasetEpoch:
    return WebDatasetEpoch([urls], [1.0], epoch=0, seed=3, rank=0, world=1, batch_size=batch, shuffle_buffer=2,
                           resampled=False, resolution=16, context_length=16)  # fmt: skip


def read_all(dataset: WebDatasetEpoch) -> tuple[int, Counter]:
    """(samples delivered, skip counts) of one pass in this process."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0, collate_fn=lambda b: b)
    skipped: Counter = Counter()
    n = 0
    for batch in loader:
        skipped.update(batch.skipped)
        n += batch.size
    return n, skipped


def tiny_wds_config(tmp_path: Path, shards: str, **data):
    from clip.train import DataConfig, ModelSpec, OptimConfig, RunConfig, TrainConfig

    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    return TrainConfig(
        data=DataConfig(train_data=shards, batch_size=3, workers=0, shuffle_buffer=4, **data),
        model=ModelSpec(name=None, config_path=str(tmp_path / "tiny.json")),
        optim=OptimConfig(lr=1e-3, warmup=1),
        run=RunConfig(output_dir=str(tmp_path / "out"), steps=3, save_every=3, progress=False),
    )


# --------------------------------------------------------------------------------- 9: WebDataset captions

GOOD = b'{"caption": "a small square"}'


def test_bad_json_captions_are_skipped_and_counted(tmp_path):
    captions = [
        GOOD,
        b"{not json",
        GOOD,
        b"[1, 2]",
        b'{"caption": ["a", "list"]}',
        b"\xff\xfe\x00",
        GOOD,
        GOOD,
    ]
    url = json_shard(tmp_path / "s" / "shard-000000.tar", captions)
    n, skipped = read_all(epoch_of([url]))
    assert n == 4 and skipped == {"unreadable_caption": 4}


def test_training_goes_on_past_bad_json_captions(tmp_path):
    from clip.train import train

    captions = [GOOD, b"{not json", GOOD, b"[1, 2]", GOOD, GOOD, GOOD, GOOD]
    json_shard(tmp_path / "s" / "shard-000000.tar", captions)
    result = train(tiny_wds_config(tmp_path, str(tmp_path / "s" / "shard-000000.tar")))
    assert result.step == 3 and result.checkpoint.exists()
    assert result.skipped["unreadable_caption"] >= 2  # met again in each epoch the run reaches


def test_truncated_shard_is_counted_not_silent(tmp_path):
    urls = write_shards(tmp_path / "s", 2, 5)
    whole = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(whole[: 2 * 2048])  # two whole samples, then nothing: the tar reader just stops
    n, skipped = read_all(epoch_of(urls))
    assert n == 7 and skipped == {"truncated_shard": 1}
    Path(urls[1]).write_bytes(whole[: 2 * 2048 + 700])  # cut inside the third sample's image
    n, skipped = read_all(epoch_of(urls))
    assert n == 7 and skipped["truncated_shard"] == 1 and skipped["unreadable_shard_entry"] == 1
    n, skipped = read_all(epoch_of([urls[0]]))  # a whole shard counts nothing
    assert n == 5 and not skipped


def test_clip_train_reports_a_truncated_shard(tmp_path):
    urls = write_shards(tmp_path / "s", 2, 6)
    whole = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(whole[: 3 * 2048])
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["--train-data", str(tmp_path / "s" / "shard-{000000..000001}.tar"), "--model-config",
            str(tmp_path / "tiny.json"), "--batch-size", "3", "--steps", "2", "--workers", "0",
            "--shuffle-buffer", "4", "--output-dir", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    proc = subprocess.run([PYTHON, "-m", "clip", "train", *args], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped samples: truncated_shard: 1" in proc.stderr


# -------------------------------------------------------------------------- 13: one image, one orientation


@pytest.fixture
def rotated_jpeg(tmp_path) -> Path:
    """A 24 x 12 gradient JPEG whose EXIF says 'rotate 90 degrees clockwise to view' (orientation 6)."""
    pixels = np.zeros((12, 24, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, 24, dtype=np.uint8)[None, :]
    pixels[..., 1] = np.linspace(0, 255, 12, dtype=np.uint8)[:, None]
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    assert load_image(path, exif=True).size == (12, 24)  # upright it is tall
    return path


def test_training_sees_photos_upright_like_index_and_eval(rotated_jpeg):
    transform = image_transform(16)
    upright = transform(load_image(rotated_jpeg, exif=True))
    assert not torch.equal(upright, transform(load_image(rotated_jpeg)))  # the test can tell them apart
    pairs = PairDataset([str(rotated_jpeg)], ["a gradient"], resolution=16, context_length=16, augment=False)
    torch.testing.assert_close(pairs.get(0, 0)[0], upright, rtol=0, atol=0)
    # evaluation (and `clip classify`, which shares its loader) sees the same pixels
    _, image, error = ImageDataset([str(rotated_jpeg)], transform)[0]
    assert error is None
    torch.testing.assert_close(image, upright, rtol=0, atol=0)
    # augmented file samples and WebDataset samples crop the upright image too
    crop = RandomResizedCrop(16)
    expected = crop(load_image(rotated_jpeg, exif=True), np.random.default_rng([0, 0, 0]))
    torch.testing.assert_close(PairDataset([str(rotated_jpeg)], ["x"], 16, 16).get(0, 0)[0], expected)
    raw = {"__key__": "k", "jpg": rotated_jpeg.read_bytes(), "txt": b"a gradient"}
    key, image, _ = decode_sample(raw, crop, np.random.default_rng(5), 16)
    torch.testing.assert_close(image, crop(load_image(rotated_jpeg, exif=True), np.random.default_rng(5)))


def test_validation_recall_counts_ties_against_the_model():
    collapsed = torch.ones(6, 6)  # a collapsed model: every image-text pair scores alike
    assert retrieval_recall(collapsed) == {
        "image_to_text_R@1": 0.0, "text_to_image_R@1": 0.0, "image_to_text_R@5": 0.0, "text_to_image_R@5": 0.0,
    }  # fmt: skip
    sim = torch.randint(0, 3, (9, 9)).float()  # many ties, against the evaluation package's definition
    pairs = torch.arange(9)
    i2t, t2i = metrics.image_to_text_ranks(sim, pairs), metrics.text_to_image_ranks(sim, pairs)
    got = retrieval_recall(sim, ks=(1, 5))
    for k in (1, 5):
        assert got[f"image_to_text_R@{k}"] == metrics.recall_at_k(i2t, (k,))[k]
        assert got[f"text_to_image_R@{k}"] == metrics.recall_at_k(t2i, (k,))[k]
    assert retrieval_recall(torch.eye(6))["image_to_text_R@1"] == 1.0


# ----------------------------------------------------------------------------------- 11: clip eval inputs


@pytest.fixture
def eval_cli(monkeypatch, capsys):
    monkeypatch.setattr(clip.cli, "COMMAND_MODULES", ("clip.commands.eval",))

    def run(*argv) -> tuple[int, str, str]:
        code = clip.cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.mark.parametrize("task", ["zeroshot", "retrieval", "linear-probe"])
def test_eval_output_naming_a_folder_fails_before_any_work(eval_cli, tmp_path, task):
    data = make_folder(tmp_path / "imgs")
    inputs = {"zeroshot": ["--data", data], "retrieval": ["--data", tmp_path / "pairs.csv"],
              "linear-probe": ["--train", data, "--test", data]}[task]  # fmt: skip
    # The model does not exist: an error about it would mean work started before --output was checked.
    code, _, err = eval_cli("eval", task, "--model", tmp_path / "missing.pt", *inputs, "--output", tmp_path)
    assert code == 2
    assert f"--output {str(tmp_path)!r} is a folder; give a file path" in err and "Traceback" not in err


def test_eval_reports_unreadable_folders(tiny_checkpoint, tmp_path):
    data = make_folder(tmp_path / "imgs")
    hidden = data / "cat" / "locked"
    hidden.mkdir()
    Image.new("RGB", (8, 8), (20, 20, 20)).save(hidden / "d.png")
    hidden.chmod(0)
    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(
            [*unprivileged(), PYTHON, "-m", "clip", "eval", "zeroshot", "--model", str(tiny_checkpoint),
             "--data", str(data), "--output", str(out), "--templates", "a photo of a {}.", "--no-progress"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        hidden.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["unreadable_folders"] == [{"folder": str(hidden), "error": "Permission denied"}]
    assert f"1 unreadable folder(s) left out, e.g. {hidden}" in proc.stdout
    assert results["n_images"] == 3  # the readable ones are still scored
