"""End-to-end training on a tiny config: torchrun 2 x batch 8 == 1 process x batch 16, SIGKILL + resume ==
uninterrupted, the same run for any number of workers, loss falls, bad samples are skipped and counted,
a time budget stops cleanly, and `clip.load` reads the checkpoints."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
COLORS = {
    "red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
    "purple": (150, 40, 170), "cyan": (30, 210, 210), "orange": (240, 140, 20), "gray": (128, 128, 128),
}  # fmt: skip
TINY = {
    "embed_dim": 32,
    "vision": {"kind": "vit", "image_size": 16, "width": 32, "layers": 1, "heads": 2, "patch_size": 8},
    "text": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_color_data(folder: Path, n: int = 64) -> Path:
    """n noisy solid-colour images with captions naming the colour (learnable), as a CSV."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = list(COLORS)[i % len(COLORS)]
        pixels = np.clip(np.array(COLORS[name]) + rng.normal(0, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "img" / f"{i:03d}.png")
        rows.append((f"img/{i:03d}.png", f"a photo of the colour {name}"))
    path = folder / "data.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        w.writerows(rows)
    (folder / "tiny.json").write_text(json.dumps(TINY))
    return path


def cli(args: list[str], *, nproc: int = 0, prefix: list[str] | None = None, check: bool = True):
    """Run `clip train ...` (under torchrun when nproc > 0) in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    if nproc:
        cmd = [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "clip",
        ]
    else:
        cmd = prefix or [PYTHON, "-m", "clip"]
    proc = subprocess.run([*cmd, "train", *args], env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def base_args(data: Path, out: Path, **extra: str) -> list[str]:
    flags = {"--train-data": str(data), "--model-config": str(data.parent / "tiny.json"), "--steps": "6",
             "--save-every": "3", "--warmup": "2", "--lr": "1e-3", "--seed": "7", "--log-every": "1",
             "--output-dir": str(out), "--workers": "0", "--batch-size": "16", **extra}  # fmt: skip
    return [x for kv in flags.items() for x in kv] + ["--no-progress"]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_color_data(tmp_path_factory.mktemp("colors"))


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory) -> Path:
    """One process, batch 16, 6 steps, uninterrupted."""
    out = tmp_path_factory.mktemp("baseline")
    cli(base_args(data, out))
    return out


def _without_key_bias(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the K third of each in_proj_bias: its gradient is exactly zero (softmax ignores a shift of all
    logits), so AdamW turns rounding noise into full-size steps that differ between any two runs."""
    out = {}
    for name, t in sd.items():
        if name.endswith("in_proj_bias"):
            d = t.shape[0] // 3
            t = torch.cat([t[:d], t[2 * d :]])
        out[name] = t
    return out


def test_two_ranks_batch_8_equal_one_process_batch_16(data, baseline, tmp_path):
    out = tmp_path / "ddp"
    cli(base_args(data, out, **{"--batch-size": "8", "--workers": "1"}), nproc=2)
    a, b = _without_key_bias(weights(baseline)), _without_key_bias(weights(out))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    initial = _without_key_bias(_initial_weights())
    assert max((a[k] - initial[k]).abs().max().item() for k in a) > 1e-3  # the runs did train
    start = json.loads((out / "config.json").read_text())
    assert start["world_size"] == 2 and start["global_batch"] == 16
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line)["loss"] for line in (baseline / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses, ref, rtol=1e-4)


def _initial_weights() -> dict[str, torch.Tensor]:
    from clip.config import CLIPConfig
    from clip.model import CLIP

    torch.manual_seed(7)  # the run's --seed: the loop seeds before building the model
    return CLIP(CLIPConfig.from_dict(TINY)).state_dict()


KILL_AFTER_STEP_4 = textwrap.dedent(
    """
    import os, signal, sys
    from clip.train.runlog import RunLog
    write = RunLog.add
    def add(self, record):
        write(self, record)
        if record["step"] == 4:  # after the step-3 checkpoint, with step 4 trained and logged
            os.kill(os.getpid(), signal.SIGKILL)
    RunLog.add = add
    from clip.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigkill_then_resume_latest_equals_uninterrupted(data, baseline, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_AFTER_STEP_4)
    proc = cli(base_args(data, out, **{"--workers": "2"}), prefix=[PYTHON, str(script)], check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert os.readlink(ckpts / "latest.pt") == "step_000003.pt"
    assert not (ckpts / "step_000006.pt").exists()
    cli(base_args(data, out, **{"--resume": "latest", "--workers": "1"}))
    a, b = weights(baseline), weights(out)
    for name in a:  # the same computation, so every tensor (key bias included) must agree
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed attempt's step-4 line was replaced, not duplicated
    full = torch.load(ckpts / "latest.pt", weights_only=True)
    ref = torch.load(baseline / "checkpoints" / "latest.pt", weights_only=True)
    for pid, state in ref["optimizer"]["state"].items():
        torch.testing.assert_close(
            full["optimizer"]["state"][pid]["exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=1e-9
        )
    assert full["data_position"] == ref["data_position"]


def test_checkpoint_layout_and_clip_load(baseline):
    import clip

    ckpt = torch.load(baseline / "checkpoints" / "step_000006.pt", weights_only=True)
    assert {"config", "state_dict", "optimizer", "scheduler", "step", "data_position", "rng", "args"} <= set(
        ckpt
    )
    assert ckpt["step"] == 6 and not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])
    assert sorted(p.name for p in (baseline / "checkpoints").iterdir()) == [
        "latest.pt", "step_000003.pt", "step_000006.pt"]  # fmt: skip
    model, preprocess = clip.load(str(baseline / "checkpoints" / "latest.pt"), device="cpu")
    for name, t in model.state_dict().items():
        assert torch.equal(t, ckpt["state_dict"][name]), name
    records = [json.loads(line) for line in (baseline / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]) >= {"step", "epoch", "loss", "lr", "logit_scale", "samples_per_s", "data_time"}
    assert (baseline / "curves.png").stat().st_size > 1000
    assert json.loads((baseline / "config.json").read_text())["train"]["optim"]["lr"] == 1e-3


def test_same_run_for_any_number_of_workers(data, baseline, tmp_path):
    out = tmp_path / "workers"
    cli(base_args(data, out, **{"--workers": "2", "--steps": "6"}))
    a, b = weights(baseline), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- in-process (Python API)


def _config(data: Path, out: Path, **run):
    from clip.train import DataConfig, ModelSpec, OptimConfig, RunConfig, TrainConfig

    run = {"output_dir": str(out), "steps": 6, "log_every": 1, "save_every": 100, "progress": False, **run}
    return TrainConfig(
        data=DataConfig(train_data=str(data), batch_size=16, workers=0),
        model=ModelSpec(name=None, config_path=str(data.parent / "tiny.json")),
        optim=OptimConfig(lr=2e-3, warmup=5),
        run=RunConfig(**run),
    )


def one_colour_each(epoch: int) -> np.ndarray:
    """An epoch order whose every run of 8 holds one image of each colour (no false negatives in a batch)."""
    rng = np.random.default_rng(epoch)
    return np.stack([rng.permutation(np.arange(c, 64, 8)) for c in range(8)], axis=1).reshape(-1)


def test_loss_falls_on_a_learnable_set(data, tmp_path):
    from clip.train import train

    cfg = _config(data, tmp_path, steps=40)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=8),
                              optim=dataclasses.replace(cfg.optim, lr=5e-3))  # fmt: skip
    result = train(cfg, order=one_colour_each)
    losses = [json.loads(line)["loss"] for line in result.metrics_path.read_text().splitlines()]
    assert len(losses) == 40
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.6 and last < 0.3 * first, (first, last)  # chance level is ln(8) ~ 2.08


def test_bad_samples_are_skipped_and_counted(data, tmp_path):
    from clip.train import train

    rows = list(csv.reader(open(data)))
    (data.parent / "img" / "truncated.png").write_bytes((data.parent / "img" / "000.png").read_bytes()[:60])
    rows += [["img/missing.png", "a photo"], ["img/truncated.png", "a photo"], ["img/001.png", ""]]
    bad = data.parent / "bad.csv"  # beside the images: relative paths resolve against the CSV's folder
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    cfg = _config(bad, tmp_path / "out", steps=8)
    result = train(cfg)  # 67 rows, 4 steps of 16 per epoch: two epochs meet most rows
    assert result.step == 8
    assert set(result.skipped) <= {"missing_image", "unreadable_image", "empty_caption"}
    assert sum(result.skipped.values()) >= 3
    last = json.loads(result.metrics_path.read_text().splitlines()[-1])
    assert last["skipped"] == sum(result.skipped.values())


def test_time_budget_stops_cleanly_with_outputs(data, tmp_path):
    from clip.train import train

    result = train(_config(data, tmp_path, steps=10_000, max_seconds=3.0))
    assert result.stopped_early and 0 < result.step < 10_000
    assert result.checkpoint is not None and result.checkpoint.name == f"step_{result.step:06d}.pt"
    assert (tmp_path / "curves.png").exists()
    assert len(result.metrics_path.read_text().splitlines()) == result.step


def _lrs(result) -> list[float]:
    return [json.loads(line)["lr"] for line in result.metrics_path.read_text().splitlines()]


@pytest.mark.parametrize("new_total", [9, 16])
def test_replan_changes_the_length_and_the_schedule(data, tmp_path, new_total):
    """A length returned by `replan` after step 4 ends the run there, the cosine now decaying to that step."""
    from clip.train import train
    from clip.train.optim import CosineSchedule

    calls = []

    def replan(step: int, seconds: float) -> int | None:
        calls.append((step, seconds))
        return new_total if step == 4 else None

    result = train(_config(data, tmp_path, steps=12), replan=replan)
    assert result.step == new_total and len(_lrs(result)) == new_total
    assert [s for s, _ in calls] == list(range(1, new_total + 1)) and all(t > 0 for _, t in calls)
    old, new = CosineSchedule(2e-3, 5, 12), CosineSchedule(2e-3, 5, new_total)
    want = [old.lr_at(s) for s in range(5)] + [new.lr_at(s) for s in range(5, new_total)]
    np.testing.assert_allclose(_lrs(result), want, rtol=1e-6)
    assert result.notes == [f"re-planned at step 4: 12 -> {new_total} steps"]
    saved = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert saved["scheduler"]["total_steps"] == new_total


def test_resuming_a_replanned_run_says_its_schedule_differs(data, tmp_path):
    from clip.train import train

    train(_config(data, tmp_path, steps=12), replan=lambda step, s: 8 if step == 2 else None)
    with pytest.warns(
        UserWarning, match=r"schedule ended at step 8 .*; this run follows its own length of 12 steps"
    ):
        result = train(_config(data, tmp_path, steps=12, resume="latest"))
    assert result.step == 12


def test_replan_never_ends_before_the_next_step(data, tmp_path):
    from clip.train import train

    result = train(_config(data, tmp_path, steps=12), replan=lambda step, s: 1 if step == 3 else None)
    assert result.step == 4  # asked for fewer steps than done: one more step, then the end


def test_replan_under_torchrun_reaches_every_rank(data, tmp_path):
    """Only rank 0 calls `replan`; both ranks must take its length (a rank left behind would hang the run)."""
    script = tmp_path / "replan.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train_e2e import _config
        from clip.train import train
        from pathlib import Path
        rank = int(os.environ["RANK"])
        calls = []
        def replan(step, seconds):
            calls.append(step)
            return 5 if step == 2 else None
        cfg = _config(Path({str(data)!r}), Path({str(tmp_path / "out")!r}), steps=10)
        result = train(cfg, replan=replan)
        Path({str(tmp_path)!r}, f"rank{{rank}}.json").write_text(json.dumps([result.step, calls]))
    """)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == [5, [1, 2, 3, 4, 5]] and rank1 == [5, []]


def test_unreadable_data_fails_at_once(tmp_path):
    from clip.train import train

    path = tmp_path / "none.csv"
    path.write_text("filepath,caption\nmissing1.png,a\nmissing2.png,b\n")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    with pytest.raises(ValueError, match="no readable sample.*missing_image: 2"):
        train(_config(path, tmp_path / "out"))
