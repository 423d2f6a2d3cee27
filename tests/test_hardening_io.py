"""clip.io: files written atomically get the mode a plain open() gives them under any umask (not mkstemp's
0600), with the umask read from /proc and from the set-and-reset fallback; output-path checks fail at once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clip.io import check_output_file, temp_pattern

ROOT = Path(__file__).resolve().parents[1]

UMASKS = (0o022, 0o077, 0o002, 0o027)
# Runs in a fresh process (the umask is process-wide), one umask after another: clip.io's writers vs open().
SCRIPT = textwrap.dedent(
    """
    import json, os, stat, sys
    import torch
    import clip.io as io

    root, fallback = sys.argv[1], sys.argv[2] == "1"
    if fallback:  # no /proc: clip.io must read the umask by setting and resetting it
        def no_proc(path, *a, **k):
            if str(path).startswith("/proc"):
                raise OSError("no /proc here")
            return open(path, *a, **k)
        io.open = no_proc
    result = {}
    for umask in map(int, sys.argv[3:]):
        folder = os.path.join(root, oct(umask))
        os.umask(umask)
        with open(os.path.join(root, oct(umask) + "-plain"), "w") as f:
            f.write("x")
        io.atomic_write_bytes(os.path.join(folder, "bytes"), b"x")
        io.atomic_write_json(os.path.join(folder, "sub", "json"), {"a": 1})
        io.atomic_torch_save({"t": torch.zeros(2)}, os.path.join(folder, "ckpt.pt"))
        names = ("bytes", "sub/json", "ckpt.pt")
        modes = {n: stat.S_IMODE(os.stat(os.path.join(folder, n)).st_mode) for n in names}
        modes["plain"] = stat.S_IMODE(os.stat(os.path.join(root, oct(umask) + "-plain")).st_mode)
        result[umask] = {"modes": modes, "read": io.current_umask(), "after": os.umask(umask)}
    print(json.dumps(result))
    """
)


@pytest.mark.parametrize("fallback", [False, True], ids=["proc", "fallback"])
def test_atomic_files_get_the_mode_open_gives_under_any_umask(tmp_path, fallback):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(int(fallback)), *map(str, UMASKS)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {int(k): v for k, v in json.loads(proc.stdout).items()}
    for umask in UMASKS:
        expected = 0o666 & ~umask
        assert out[umask]["modes"] == dict.fromkeys(("bytes", "sub/json", "ckpt.pt", "plain"), expected), (
            umask
        )
        assert out[umask]["read"] == out[umask]["after"] == umask  # read right, and left as it was
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_current_umask_reads_the_process_umask():
    import os

    from clip.io import current_umask

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # unchanged by the read
    finally:
        os.umask(old)


def test_temp_pattern_matches_only_our_temporary_files():
    pat = temp_pattern(r"step_\d+\.pt")
    assert pat.match(".step_000003.pt.tmp-ab12_x")
    assert not pat.match("step_000003.pt")
    assert not pat.match(".step_000003.pt.bak")
    assert not pat.match(".other.pt.tmp-1")


def test_check_output_file_refuses_a_folder_and_a_file_parent(tmp_path):
    with pytest.raises(ValueError, match=r"--output .* is a folder; give a file path"):
        check_output_file(tmp_path, "--output")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_file(tmp_path / "f" / "r.json", "--output")
    assert check_output_file(tmp_path / "new" / "r.json", "--output") == tmp_path / "new" / "r.json"
