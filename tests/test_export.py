"""`clip export MODEL OUT/ --format onnx`: both graphs, dynamic batch and text length, onnxruntime parity."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import clip
from clip.cli import main
from clip.export import export_onnx

CAPTIONS = ["a cat", "a photo of a small dog on the grass", " ".join(["a red car and a blue bus"] * 4)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model (32 px, 32 text positions) exported once through the command line."""
    from clip.config import get_config
    from clip.loading import save_model
    from clip.model import CLIP

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = CLIP(get_config("ViT-Tiny/8@32px")).eval()
    save_model(model, root / "tiny.pt")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["export", str(root / "tiny.pt"), str(root / "onnx"), "--format", "onnx"])
    return model, root / "onnx", code, buf.getvalue()


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def rel(a: np.ndarray, b: torch.Tensor) -> float:
    return float((torch.from_numpy(a) - b).abs().max() / b.abs().max())


def test_command_writes_graphs_and_prints_the_parity_it_measured(exported):
    _, out, code, printed = exported
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "image.onnx", "text.onnx"]
    assert "text length dynamic" in printed
    manifest = json.loads((out / "export.json").read_text())
    parity = manifest["parity"]
    assert {(p["graph"], p["batch"], p["length"]) for p in parity} == {
        ("image", 1, None), ("image", 7, None),
        *{("text", n, length) for n in (1, 7) for length in (8, 16, 32)},
    }  # fmt: skip
    assert all(p["rel"] < 1e-4 for p in parity)
    assert printed.count(" rel ") == len(parity)
    assert manifest["text"]["dynamic_length"] and manifest["text"]["max_length"] == 32


@pytest.mark.parametrize("batch", [1, 7])
def test_image_graph_equals_pytorch_at_dynamic_batch(exported, batch):
    model, out, _, _ = exported
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        ref = model.encode_image(x)
    assert rel(session(out / "image.onnx").run(None, {"pixel_values": x.numpy()})[0], ref) < 1e-4


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("caption", CAPTIONS, ids=["short", "middle", "long"])
def test_text_graph_takes_ids_cut_after_the_end_of_text(exported, batch, caption):
    """Tokenizer rows cut after the batch's last end-of-text token give the features of the full rows."""
    model, out, _, _ = exported
    ids = clip.tokenize([caption] + CAPTIONS[: batch - 1] * 3, context_length=32)[:batch].long()
    cut = ids[:, : int(ids.argmax(dim=-1).max()) + 1]
    assert cut.shape[1] < 32  # the graph really runs shorter rows
    with torch.no_grad():
        ref = model.encode_text(ids)
    got = session(out / "text.onnx").run(None, {"input_ids": cut.numpy()})[0]
    assert got.shape == (batch, model.config.embed_dim)
    assert rel(got, ref) < 1e-4


def test_missing_exporter_names_the_extra(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(RuntimeError, match=r"clipforge\[export\]"):
        export_onnx(tiny_model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_is_refused(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "taken").write_text("")
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "taken")]) == 2
    assert "is a file" in capsys.readouterr().err
