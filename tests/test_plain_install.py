"""A plain install in a clean virtual environment: the project's wheel with no extras, beside only its core
dependencies (read from pyproject.toml; torch is the CPU wheel on local disk). `clip train` must train, save
and exit 0 without matplotlib (skipping curves.png with a note naming the extra), and commands that need an
extra must name it at once.

CI runs this (never skipped: a venv that cannot be built fails it). The venv is cached in `.venv-plain` (git
ignores `.venv*/`) and rebuilt when the core dependency list changes; the project itself is rebuilt and
reinstalled from the working tree every run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib  # Python >= 3.11, as the test venv
from test_train_e2e import make_color_data

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-plain"
TORCH = "torch==2.13.0"  # the CPU wheel that lies on this machine's disk (installs in seconds)
EXTRA_MODULES = ("matplotlib", "webdataset", "starlette", "uvicorn", "faiss", "tensorboard", "cairosvg")

pytestmark = pytest.mark.plain_install


def core_requirements() -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [TORCH if d.replace(" ", "").startswith("torch") else d for d in deps]


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=400, **kw)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def plain_venv() -> Path:
    """.venv-plain with exactly the core requirements (reused while they are unchanged), no extras."""
    python, stamp = VENV / "bin" / "python", VENV / "core-requirements.txt"
    wanted = "\n".join(core_requirements()) + "\n"
    if not (python.exists() and stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(VENV, ignore_errors=True)
        _ok(_run([sys.executable, "-m", "venv", VENV]))
        _ok(_run([python, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check",
                  *core_requirements()]))  # fmt: skip
        stamp.write_text(wanted)
    return VENV


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    venv = plain_venv()
    # Build the project's wheel from a copy of the tree (no stray build/ in the shared checkout), then install
    # it with --no-deps: what `pip install clipforge` puts on disk, minus the dependency resolution.
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "clip", src / "clip", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _ok(_run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
              "--disable-pip-version-check", "-w", src / "dist", src]))  # fmt: skip
    wheel = next((src / "dist").glob("clipforge-*.whl"))
    _ok(_run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
              "--disable-pip-version-check", wheel]))  # fmt: skip
    probe = "import importlib.util, json, clip; print(json.dumps([clip.__file__, [m for m in {} if importlib.util.find_spec(m)]]))"
    where, extras = json.loads(
        _ok(_run([venv / "bin" / "python", "-c", probe.format(EXTRA_MODULES)], cwd=src / "dist")).stdout
    )
    assert where.startswith(str(venv)) and extras == []  # our wheel, and no extra's package in sight
    return venv


def test_plain_install_trains_saves_and_exits_zero(venv, tmp_path):
    data = make_color_data(tmp_path / "data", n=16)
    out = tmp_path / "run"
    proc = _ok(_run([venv / "bin" / "clip", "train", "--train-data", data, "--model-config",
                     data.parent / "tiny.json", "--steps", "2", "--save-every", "2", "--batch-size", "8",
                     "--warmup", "1", "--workers", "0", "--output-dir", out, "--no-progress"], cwd=tmp_path))  # fmt: skip
    assert (out / "checkpoints" / "step_000002.pt").is_file() and (out / "metrics.jsonl").is_file()
    assert not (out / "curves.png").exists()
    assert "curves.png skipped: it needs matplotlib, which the training extra installs: " \
           "pip install 'clipforge[train]'" in proc.stderr  # fmt: skip
    assert "Traceback" not in proc.stderr and proc.stdout.strip().endswith("step_000002.pt")


def test_plain_install_evaluates_and_names_the_extra_for_the_picture(venv, tiny_checkpoint, tmp_path):
    from test_eval_datasets import make_folder

    data = make_folder(tmp_path / "imgs")
    out = tmp_path / "r.json"
    proc = _ok(_run([venv / "bin" / "clip", "eval", "zeroshot", "--model", tiny_checkpoint, "--data", data,
                     "--output", out, "--templates", "a photo of a {}.", "--no-progress"], cwd=tmp_path))  # fmt: skip
    assert json.loads(out.read_text())["n_images"] == 3
    assert "confusion-matrix PNG skipped: it needs matplotlib, which the evaluation extra installs: " \
           "pip install 'clipforge[eval]'" in proc.stderr  # fmt: skip


@pytest.mark.parametrize(
    "args, extra",
    [
        (["serve", "{tmp}/idx"], "search"),
        (["demo", "--output-dir", "{tmp}/demo", "--steps", "1"], "demo"),
        (
            ["train", "--train-data", "{tmp}/s-{{0..1}}.tar", "--steps", "1", "--output-dir", "{tmp}/o"],
            "train",
        ),
    ],
    ids=["serve", "demo", "train-webdataset"],
)
def test_commands_that_need_an_extra_name_it_at_once(venv, tmp_path, args, extra):
    start = time.monotonic()
    proc = _run([venv / "bin" / "clip", *(a.format(tmp=tmp_path) for a in args)], cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert f"pip install 'clipforge[{extra}]'" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60  # at once: nothing was trained or built first
