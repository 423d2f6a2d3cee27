"""Training data: batch slicing over ranks, mixing, CSV/folder sources, bad samples, and WebDataset shards
(every sample once per epoch over ranks x workers, no hang with fewer shards than workers, exact resume)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip.train.data import (
    BatchPlan,
    EpochBatchSampler,
    MixedDataset,
    default_order,
    open_map_source,
    require_readable,
)
from clip.train.wds import WdsStream, WebDatasetEpoch, is_webdataset

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and immune to a busy machine (OpenMP threads spin-wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _png(color: tuple[int, int, int], size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int, per_shard: int, bad: dict[str, str] | None = None) -> list[str]:
    """Shards shard-000000.tar ... with samples '<shard>_<i>' (png + txt); `bad` maps key -> 'image'|'caption'."""
    bad = bad or {}
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(n_shards):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:02d}_{i:03d}"
                image = b"not a png" if bad.get(key) == "image" else _png((s * 40 % 255, i * 20 % 255, 90))
                caption = b" " if bad.get(key) == "caption" else f"sample {key}".encode()
                for ext, data in (("png", image), ("txt", caption)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def _epoch(urls, rank=0, world=1, batch=4, epoch=0, skip=(), shift=0, resampled=False):
    return WebDatasetEpoch([urls], [1.0], epoch=epoch, seed=3, rank=rank, world=world, batch_size=batch,
                           shuffle_buffer=8, resampled=resampled, resolution=16, context_length=16,
                           skip=skip, shift=shift)  # fmt: skip


def _keys(dataset, workers: int) -> list[str]:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, collate_fn=lambda b: b
    )
    return [k for batch in loader for k in batch.keys]


@pytest.mark.parametrize("n_shards", [3, 5])
def test_wds_every_sample_once_per_epoch_over_two_ranks_and_two_workers(tmp_path, n_shards):
    urls = write_shards(tmp_path, n_shards, 6)
    seen = _keys(_epoch(urls, rank=0, world=2), 2) + _keys(_epoch(urls, rank=1, world=2), 2)
    expected = {f"{s:02d}_{i:03d}" for s in range(n_shards) for i in range(6)}
    assert Counter(seen) == Counter(expected)  # each exactly once, even with 3 shards for 4 workers
    # another epoch reshuffles the shards over workers and the samples in the buffer
    again = _keys(_epoch(urls, rank=0, world=2, epoch=1), 2) + _keys(
        _epoch(urls, rank=1, world=2, epoch=1), 2
    )
    assert Counter(again) == Counter(expected) and again != seen


def test_wds_bad_samples_are_skipped_and_counted(tmp_path):
    urls = write_shards(tmp_path, 2, 5, bad={"00_001": "image", "01_002": "caption"})
    loader = torch.utils.data.DataLoader(_epoch(urls), batch_size=None, num_workers=0, collate_fn=lambda b: b)
    batches = list(loader)
    skipped = Counter()
    for b in batches:
        skipped.update(b.skipped)
    assert skipped == {"unreadable_image": 1, "empty_caption": 1}
    assert sum(b.size for b in batches) == 8
    assert all(b.images.shape[1:] == (3, 16, 16) for b in batches if b.size)


def _stream(urls, position=None, workers=2, accum=1):
    def make(epoch, skip, shift):
        return _epoch(urls, epoch=epoch, skip=skip, shift=shift, batch=3)

    return WdsStream(make, accum=accum, workers=workers, world=1, pin_memory=False, steps_per_epoch=None,
                     position=position)  # fmt: skip


def _drain(stream, steps):
    out = []
    for _ in range(steps):
        batches = stream.next_step()
        if not batches:
            stream.end_epoch()
            continue
        out.append([(b.keys, b.images) for b in batches])
    return out


@pytest.mark.parametrize("cut", [2, 5])
def test_wds_resume_continues_the_same_batches(tmp_path, cut):
    # 3 shards of uneven use over 2 workers: one worker runs dry before the other, then the epoch rolls over.
    urls = write_shards(tmp_path, 3, 7)
    full = _drain(_stream(urls), 14)
    first = _stream(urls)
    head = _drain(first, cut)
    position = json.loads(json.dumps(first.position()))  # a checkpoint round trip keeps plain values
    first.close()
    tail = _drain(_stream(urls, position=position), 14 - cut)
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full, strict=True):
        assert [k for k, _ in got] == [k for k, _ in want]
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert torch.equal(a, b)


def test_wds_resume_with_other_worker_count_is_refused(tmp_path):
    urls = write_shards(tmp_path, 2, 3)
    s = _stream(urls)
    s.next_step()
    with pytest.raises(ValueError, match="same --workers"):
        _stream(urls, position=s.position(), workers=1)


def test_is_webdataset():
    assert is_webdataset("shards/{000000..000009}.tar")
    assert is_webdataset("a/{0..3}.tar::pipe:curl -s http://x/b.tar")
    assert not is_webdataset("data.csv::images/")
    with pytest.raises(ValueError, match="mixes"):
        is_webdataset("a.tar::data.csv")


def test_sampler_slices_global_batches_so_two_ranks_equal_one():
    order = default_order(40, seed=1)
    one = EpochBatchSampler(order, BatchPlan(micro=8, accum=1, rank=0, world=1))
    ranks = [EpochBatchSampler(order, BatchPlan(micro=4, accum=1, rank=r, world=2)) for r in range(2)]
    it1, its = iter(one), [iter(s) for s in ranks]
    for _ in range(12):  # crosses epoch boundaries (5 steps per epoch)
        assert next(it1) == next(its[0]) + next(its[1])
    # resuming at (epoch 1, step 2) gives the same batches as running on
    run_on = iter(EpochBatchSampler(order, BatchPlan(8, 1, 0, 1)))
    for _ in range(7):
        next(run_on)
    resumed = iter(EpochBatchSampler(order, BatchPlan(8, 1, 0, 1), start_epoch=1, start_batch=2))
    assert [next(resumed) for _ in range(6)] == [next(run_on) for _ in range(6)]


def test_mixed_dataset_follows_weights_without_repeats():
    mixed = MixedDataset([list(range(100)), list(range(1000))], [3.0, 1.0], seed=0, length=400)
    order = mixed.order(0)
    first = order[order < 100]
    assert 270 < len(first) < 330  # 3/4 of 400 from the small source
    assert len(set(first.tolist())) == 100  # its permutations run back to back: every item before repeats
    assert np.array_equal(order, mixed.order(0)) and not np.array_equal(order, mixed.order(1))
    assert mixed.locate(150) == (1, 50)


def _csv(tmp_path: Path, rows: list[tuple[str, str]], sep: str = ",") -> Path:
    path = tmp_path / ("data.tsv" if sep == "\t" else "data.csv")
    lines = [f"filepath{sep}caption"] + [f"{a}{sep}{b}" for a, b in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_and_folder_sources(tmp_path):
    (tmp_path / "img").mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "a.txt").write_text("a red thing")
    Image.new("RGB", (30, 20), (10, 10, 200)).save(tmp_path / "img" / "b.jpg")  # no caption file
    kw = dict(resolution=16, context_length=16, seed=0, crop_scale=(0.5, 1.0))
    tsv = open_map_source(str(_csv(tmp_path, [("img/a.png", "a red thing")], "\t")), **kw)
    image, tokens = tsv.get(0, epoch=0)
    assert image.shape == (3, 16, 16) and tokens.shape == (16,)
    assert not torch.equal(image, tsv.get(0, epoch=1)[0])  # augmentation depends on the epoch...
    assert torch.equal(image, tsv.get(0, epoch=0)[0])  # ...and on nothing else
    folder = open_map_source(str(tmp_path / "img"), **kw)
    assert len(folder) == 2
    with pytest.raises(ValueError, match="caption"):
        folder.get(1, 0)
    with pytest.raises(ValueError, match="--csv-img-key"):
        open_map_source(str(_csv(tmp_path, [("x.png", "y")])), img_key="path", **kw)


def test_no_readable_sample_fails_at_once_with_reasons(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    ds = open_map_source(str(_csv(tmp_path, [("missing.png", "a"), ("broken.png", "b")])), resolution=16,
                         context_length=16, seed=0, crop_scale=(0.9, 1.0))  # fmt: skip
    with pytest.raises(ValueError, match=r"no readable sample.*missing_image: 1.*unreadable_image: 1"):
        require_readable(ds, "data.csv")


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from clip.train import DataConfig, ModelSpec, OptimConfig, RunConfig, TrainConfig, train
    shards, out, cfg_path = sys.argv[1:4]
    seen = []
    cfg = TrainConfig(
        data=DataConfig(train_data=shards, batch_size=4, workers=2, shuffle_buffer=8),
        model=ModelSpec(name=None, config_path=cfg_path),
        optim=OptimConfig(lr=1e-3, warmup=1),
        run=RunConfig(output_dir=out, steps=9, log_every=1, save_every=100, progress=False, seed=1),
    )
    result = train(cfg, on_step=lambda r: seen.append((r["epoch"], r["keys"])))
    with open(os.path.join(out, f"seen.{os.environ['RANK']}.json"), "w") as f:
        json.dump({"seen": seen, "skipped": result.skipped, "step": result.step}, f)
    """
)

TINY_CONFIG = {
    "embed_dim": 16,
    "vision": {"kind": "vit", "image_size": 16, "width": 16, "layers": 1, "heads": 2, "patch_size": 8},
    "text": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def test_wds_training_two_ranks_two_workers_sees_each_sample_once(tmp_path):
    # 3 shards for 2 ranks x 2 workers: one worker has nothing and rank 1 runs dry first; nothing may hang.
    write_shards(tmp_path / "shards", 3, 5, bad={"02_004": "image"})
    script, cfg = tmp_path / "run.py", tmp_path / "tiny.json"
    script.write_text(TRAIN_SCRIPT)
    cfg.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "shards" / "shard-{000000..000002}.tar"), str(out), str(cfg)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"seen.{r}.json").read_text()) for r in range(2)]
    epoch0 = [k for r in ranks for epoch, keys in r["seen"] if epoch == 0 for k in keys]
    expected = {f"{s:02d}_{i:03d}" for s in range(3) for i in range(5)} - {"02_004"}
    assert Counter(epoch0) == Counter(expected)
    assert any(epoch == 1 for epoch, _ in ranks[0]["seen"])  # the run went on into the next epoch
    assert ranks[0]["step"] == 9 and ranks[0]["skipped"] == ranks[1]["skipped"]
    assert ranks[0]["skipped"]["unreadable_image"] >= 1  # counted over all ranks, every epoch it is met


def test_wds_training_resume_equals_uninterrupted(tmp_path):
    from clip.train import DataConfig, ModelSpec, OptimConfig, RunConfig, TrainConfig, train

    write_shards(tmp_path / "shards", 3, 7)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))

    def cfg(out: str, **run) -> TrainConfig:
        return TrainConfig(
            data=DataConfig(
                train_data=str(tmp_path / "shards" / "shard-{000000..000002}.tar"),
                batch_size=3,
                workers=2,
                shuffle_buffer=4,
            ),  # fmt: skip
            model=ModelSpec(name=None, config_path=str(tmp_path / "tiny.json")),
            optim=OptimConfig(lr=1e-3, warmup=1),
            run=RunConfig(output_dir=str(tmp_path / out), steps=10, save_every=4, progress=False, **run),
        )

    full = train(cfg("full"))
    # resume mid-epoch (workers partly consumed); the resumed run then rolls over into epoch 1
    resumed = train(cfg("again", resume=str(tmp_path / "full" / "checkpoints" / "step_000004.pt")))
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert full.epoch == resumed.epoch == 1
