"""`clip train` under misuse and failure: two runs into one folder (real processes), SIGKILL during a save,
bad checkpoints and output folders, a full disk, non-finite flags, another batch size on resume, a dangling
latest.pt; each ends in one clear line or goes on correctly."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_train_e2e import PYTHON, ROOT, base_args, cli, make_color_data

import clip.cli
from clip.train import DataConfig, ModelSpec, OptimConfig, RunConfig, TrainConfig, train
from clip.train import checkpoint as ckpt_io

pytestmark = pytest.mark.usefixtures("one_thread")


def unprivileged() -> list[str]:
    """Command prefix under which permission bits bind: root (as on CI) would ignore them otherwise, so drop
    its override capabilities from the bounding set (util-linux `setpriv`)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "testing permissions as root needs setpriv (util-linux)"
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def one_error_line(stderr: str, *needles: str) -> str:
    """The `clip train: error:` line of stderr; there is one, with no traceback, holding every needle."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("clip train: error:")]
    assert len(lines) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_color_data(tmp_path_factory.mktemp("colors"))  # 64 pairs: 4 steps of 16 per epoch


def config(data: Path, out: Path, **run) -> TrainConfig:
    """Like `base_args` (6 steps of 16, a checkpoint every 3; warmup 1 so short runs reach the peak lr), in process."""
    batch = run.pop("batch_size", 16)
    return TrainConfig(
        data=DataConfig(train_data=str(data), batch_size=batch, workers=0),
        model=ModelSpec(name=None, config_path=str(data.parent / "tiny.json")),
        optim=OptimConfig(lr=1e-3, warmup=1),
        run=RunConfig(**{"output_dir": str(out), "steps": 6, "save_every": 3, "seed": 7, "log_every": 1,
                         "progress": False, **run}),
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A finished 6-step run: checkpoints step_000003.pt, step_000006.pt, latest.pt -> step 6."""
    out = tmp_path_factory.mktemp("trained")
    train(config(data, out))
    return out


@pytest.fixture
def in_process(monkeypatch, capsys):
    """`clip train ARGS` in this process (only the train command registered) -> (exit code, stderr)."""
    monkeypatch.setattr(clip.cli, "COMMAND_MODULES", ("clip.commands.train",))

    def run(args: list[str]) -> tuple[int, str]:
        code = clip.cli.main(["train", *args])
        return code, capsys.readouterr().err

    return run


# ------------------------------------------------------------------------------------- 5: one run per folder


def test_second_run_into_a_busy_output_dir_is_refused_and_a_killed_run_frees_it(data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    long_run = base_args(data, out, **{"--steps": "100000", "--save-every": "100000", "--max-seconds": "120"})
    first = subprocess.Popen([PYTHON, "-m", "clip", "train", *long_run], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not (out / "config.json").exists():  # written once the run holds the folder and trains
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not get going"
            time.sleep(0.2)
        second = cli(base_args(data, out), check=False)
        assert second.returncode == 2
        one_error_line(second.stderr, "another `clip train`", f"pid {first.pid}", str(out))
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the lock with the killed process: the folder is usable at once.
    again = cli(base_args(data, out, **{"--steps": "1", "--save-every": "1"}))
    assert "done: step 1" in again.stderr


# ------------------------------------------------------------------------ 6: partial files of a killed save

DIE_IN_SECOND_SAVE = textwrap.dedent(
    """
    import io, os, signal, sys
    import torch
    real, calls = torch.save, []
    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the step-6 save: half the bytes are on disk when the kill comes
            buf = io.BytesIO()
            real(obj, buf)
            with open(f, "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *args, **kwargs)
    torch.save = save
    from clip.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_partial_checkpoint_of_a_sigkilled_save_is_removed_on_resume(data, tmp_path):
    out, ckpts = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    script = tmp_path / "die.py"
    script.write_text(DIE_IN_SECOND_SAVE)
    proc = cli(base_args(data, out), prefix=[PYTHON, str(script)], check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    partial = [p for p in ckpts.iterdir() if p.name.startswith(".step_000006.pt.tmp-")]
    assert len(partial) == 1 and partial[0].stat().st_size > 1000
    assert os.readlink(ckpts / "latest.pt") == "step_000003.pt"
    (out / ".config.json.tmp-x1y2").write_text("{")  # ours too: an interrupted config write
    foreign = [ckpts / ".notes.tmp-1", ckpts / "step_000006.pt.tmp-kept", out / ".other.json.tmp-2"]
    for path in foreign:
        path.write_text("not ours")
    resumed = cli(base_args(data, out, **{"--resume": "latest"}))
    assert "removed 2 partial file(s)" in resumed.stderr
    assert not [
        p for p in (*ckpts.iterdir(), *out.iterdir()) if p.name.startswith((".step_", ".config.json"))
    ]
    assert all(p.exists() for p in foreign)  # only our own patterns are touched
    assert ckpt_io.load_checkpoint(ckpts / "latest.pt")["step"] == 6


# ---------------------------------------------------------------------- 11: bad inputs get one clear line


def test_resume_of_a_refused_pickle_says_what_the_file_is(in_process, data, tmp_path):
    bad = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1.0)}, bad)
    code, err = in_process(base_args(data, tmp_path / "out", **{"--resume": str(bad)}))
    assert code == 2
    line = one_error_line(err, str(bad), "argparse.Namespace", "not a checkpoint written by `clip train`")
    assert "weights_only" not in line and "--pretrained" in line


def test_resume_of_a_truncated_a_folder_or_a_weights_file_is_one_line(in_process, data, trained, tmp_path):
    cut = tmp_path / "cut.pt"
    whole = (trained / "checkpoints" / "step_000003.pt").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    weights = tmp_path / "weights.pt"
    torch.save({"visual.proj": torch.zeros(2)}, weights)
    for target, needle in ((cut, "is truncated or corrupt"), (tmp_path, "is a folder"),
                           (weights, "to start from its weights use --pretrained")):  # fmt: skip
        code, err = in_process(base_args(data, tmp_path / "out", **{"--resume": str(target)}))
        assert code == 2
        one_error_line(err, needle)


def test_unreadable_checkpoint_is_one_line(data, trained, tmp_path):
    locked = tmp_path / "locked.pt"
    shutil.copy(trained / "checkpoints" / "step_000003.pt", locked)
    locked.chmod(0)
    proc = cli(base_args(data, tmp_path / "out", **{"--resume": str(locked)}),
               prefix=[*unprivileged(), PYTHON, "-m", "clip"], check=False)  # fmt: skip
    assert proc.returncode == 2
    one_error_line(proc.stderr, f"cannot read checkpoint {locked}", "Permission denied")


def test_output_dir_that_is_a_file_or_under_a_file(in_process, data, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, needle in ((afile, "is a file, not a folder"), (afile / "run", "a part of that path is a file")):
        code, err = in_process(base_args(data, out))
        assert code == 2
        one_error_line(err, "--output-dir", needle)


def test_read_only_output_dir_is_one_line(data, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        proc = cli(base_args(data, out), prefix=[*unprivileged(), PYTHON, "-m", "clip"], check=False)
    finally:
        out.chmod(0o755)
    assert proc.returncode == 2
    one_error_line(
        proc.stderr, f"--output-dir {str(out)!r}", "Permission denied", "choose a folder you can write"
    )
    assert list(out.iterdir()) == []


# Disk full at the second save, for real: the kernel refuses writes past a file-size limit set after the
# first save (RLIMIT_FSIZE; SIGXFSZ ignored so the write fails instead of killing the process).
DISK_FULL_AT_SECOND_SAVE = textwrap.dedent(
    """
    import resource, signal, sys
    import clip.train.checkpoint as ckpt
    real, calls = ckpt.atomic_torch_save, []
    def save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        return real(obj, path)
    ckpt.atomic_torch_save = save
    from clip.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(data, tmp_path):
    out, ckpts = tmp_path / "full", tmp_path / "full" / "checkpoints"
    script = tmp_path / "full.py"
    script.write_text(DISK_FULL_AT_SECOND_SAVE)
    proc = cli(base_args(data, out), prefix=[PYTHON, str(script)], check=False)
    assert proc.returncode == 2
    one_error_line(proc.stderr, "could not write checkpoint", "step_000006.pt",
                   "step_000003.pt is intact", "--resume latest")  # fmt: skip
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.pt", "step_000003.pt"]  # nothing half-written
    assert ckpt_io.load_checkpoint(ckpts / "latest.pt")["step"] == 3


@pytest.mark.parametrize("flag", ["--lr", "--wd", "--max-seconds", "--eps"])
@pytest.mark.parametrize("value", ["inf", "nan", "1e999"])  # 1e999 overflows to inf
def test_non_finite_numbers_are_refused_at_parsing(in_process, capsys, data, tmp_path, flag, value):
    with pytest.raises(SystemExit) as exc:
        in_process(base_args(data, tmp_path / "out", **{flag: value}))
    assert exc.value.code == 2
    assert f"argument {flag}: must be a finite number, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_non_finite_numbers_are_refused_by_the_config():
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lr must be a finite number"):
            OptimConfig(lr=bad)
        with pytest.raises(ValueError, match="must be a finite number"):
            OptimConfig(grad_clip_norm=bad)
        with pytest.raises(ValueError, match="max_seconds must be a finite number"):
            RunConfig(steps=1, max_seconds=bad)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        OptimConfig(beta2=1.0)


def test_resume_with_another_batch_size_warns_and_keeps_the_sample_position(data, tmp_path):
    out = tmp_path / "run"
    train(config(data, out, steps=2, save_every=2))  # epoch 0 at batch 2 of 16: 32 samples seen
    with pytest.warns(UserWarning, match="global batch of 8 samples .* checkpoint used 16: epoch 0 goes on "
                                         "from sample 32 .* from step 2") as record:  # fmt: skip
        result = train(config(data, out, steps=4, save_every=2, batch_size=8, resume="latest"))
    assert len([w for w in record if "global batch" in str(w.message)]) == 1
    assert result.step == 4
    position = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["data_position"]["ranks"][0]
    assert position == {"kind": "map", "epoch": 0, "batch": 6}  # 32 / 8 = batch 4, then two steps


def test_dangling_latest_resumes_from_the_newest_step_file(data, trained, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained, out, symlinks=True)
    (out / "checkpoints" / "step_000006.pt").unlink()  # latest.pt -> step_000006.pt now dangles
    with pytest.warns(UserWarning, match="latest.pt points to 'step_000006.pt', which is gone; resuming from "
                                         "the newest step file, step_000003.pt"):  # fmt: skip
        path = ckpt_io.resolve_resume("latest", out)
    assert path == (out / "checkpoints" / "step_000003.pt").resolve()
    with pytest.warns(UserWarning, match="which is gone"):
        result = train(config(data, out, resume="latest"))
    assert result.step == 6
    assert ckpt_io.load_checkpoint(out / "checkpoints" / "latest.pt")["step"] == 6


def test_latest_without_any_checkpoint_says_to_start_fresh(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint was written there yet"):
        ckpt_io.resolve_resume("latest", tmp_path)


# -------------------------------------------------------------------- 14: no matplotlib, a finished run


def test_curves_are_skipped_with_a_note_without_matplotlib(monkeypatch, data, tmp_path):
    monkeypatch.setitem(
        sys.modules, "matplotlib", None
    )  # `import matplotlib` now fails, as on a plain install
    result = train(config(data, tmp_path / "run", steps=2, save_every=2))
    assert result.checkpoint is not None and result.checkpoint.exists() and result.curves_path is None
    assert not (tmp_path / "run" / "curves.png").exists()
    assert result.notes == [
        "curves.png skipped: it needs matplotlib, which the training extra installs: pip install 'clipforge[train]'"
    ]


def test_demo_says_at_once_that_it_needs_the_demo_extra(monkeypatch, tmp_path):
    from clip.demo import DemoConfig, run_demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"pip install 'clipforge\[demo\]'"):
        run_demo(DemoConfig(output_dir=str(tmp_path / "demo"), steps=1))
    assert time.monotonic() - start < 5 and not (tmp_path / "demo").exists()
