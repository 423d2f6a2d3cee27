"""benchmarks/bench_embed.py at a tiny size: every path runs and each JSON line carries the fields the README
table is built from (the timings themselves are never asserted)."""

from __future__ import annotations

import datetime
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")  # clip embed's metadata (the `embed` extra, in the test environment)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_embed.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_embed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_embed_tiny_run_prints_one_line_per_measurement(tmp_path, capsys, one_thread):
    bench = load_bench()
    argv = ["--images", "8", "--queries", "3", "--model", "ViT-Tiny/8@32px", "--precisions", "int8",
            "--workers", "1", "--threads", "1", "--dir", str(tmp_path)]  # fmt: skip
    rows = bench.main(argv)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == rows
    got = [(r["method"].split(",")[0].split(" (")[0], r["precision"], r["batch_size"]) for r in rows]
    loop = "plain loop: clip.load + preprocess(Image.open) + encode_image"
    assert got == [(loop, "fp32", 32), (loop, "fp32", 1), (loop, "int8", 32), (loop, "int8", 1),
                   ("clip embed", "int8", 32), ("clip index", "int8", 32)]  # fmt: skip
    assert "optimize_for_cpu(model, 'int8')" in rows[2]["method"] and "optimize" not in rows[0]["method"]
    for r in rows:
        assert r["images"] == 8 and r["threads"] == 1 and r["model"] == "ViT-Tiny/8@32px (random init)"
        assert set(r["machine"]) == {"cpu", "cores", "torch"} and r["machine"]["cores"] >= 1
        assert r["images_per_second"] > 0 and r["seconds"] >= 0
        assert r["vs_plain_fp32_loop_batched"] > 0 and r["vs_plain_fp32_loop_one_at_a_time"] > 0
        assert isinstance(r["load_1min_before"], float) and isinstance(r["load_1min_after"], float)
        assert datetime.datetime.fromisoformat(r["date"]).tzinfo is not None
        assert r["workers"] == (1 if r["method"].startswith("clip") else 0)
        agree = r["agreement_with_fp32"]
        assert (
            set(agree) == {"cosine_mean", "cosine_min", "recall_at_10", "queries"} and agree["queries"] == 3
        )
        assert 0.99 <= agree["cosine_min"] <= agree["cosine_mean"] <= 1.0 and 0 <= agree["recall_at_10"] <= 1
    assert rows[0]["vs_plain_fp32_loop_batched"] == pytest.approx(1.0, abs=0.01)  # the baseline itself
    assert rows[0]["agreement_with_fp32"] == {"cosine_mean": 1.0, "cosine_min": 1.0, "recall_at_10": 1.0,
                                              "queries": 3}  # fmt: skip
    assert rows[2]["agreement_with_fp32"]["cosine_min"] < 1.0  # int8 really ran
    # What the commands themselves measured and reported, beside the benchmark's own figures.
    assert rows[4]["embed_agreement_reported"]["image_cosine_min"] >= 0.99
    assert rows[5]["index_agreement_reported"]["precision"] == "int8"
    assert list(tmp_path.iterdir()) == []  # the work folder is removed


def test_bench_embed_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        load_bench().main(["--images", "0"])
    assert "--images and --queries must be at least 1" in capsys.readouterr().err


def test_bench_embed_docstring_has_the_command():
    assert "python benchmarks/bench_embed.py --images 1000 --queries 100" in load_bench().__doc__
