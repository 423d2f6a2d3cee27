"""ONNX export of both towers, checked with onnxruntime.

`export_onnx(model, out_dir)` writes

    image.onnx   pixel_values [N, 3, S, S] float32 -> image_features [N, embed_dim]   (N dynamic)
    text.onnx    input_ids [N, L] int64         -> text_features [N, embed_dim]    (N dynamic; L dynamic,
                 1 <= L <= context_length, where the end-of-text cut allows it, else L = context_length)
    export.json  the model config, the graphs' inputs and outputs, and the parity measured

Features are not normalised (as `encode_image` / `encode_text`).  A causal text tower pooled at its
end-of-text token (OpenAI's) reads nothing after that token, so the text graph takes ids cut after the
batch's last end-of-text token (`ids[:, : ids.argmax(-1).max() + 1]` for OpenAI's tokenizer) and gives
the features of the full row.  Graphs come from PyTorch's dynamo-based exporter (`torch.onnx.export(...,
dynamo=True)`, which needs onnxscript); parity is measured with onnxruntime on random inputs at
batch 1 and 7 and three text lengths.  Needs the `export` extra: pip install 'clipforge[export]'.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip.model import CLIP

PARITY_BATCHES = (1, 7)


@dataclass
class Parity:
    """One comparison of onnxruntime against PyTorch: max |ort - torch| and that over max |torch|."""

    graph: str
    batch: int
    length: int | None
    max_abs: float
    rel: float


@dataclass
class ExportResult:
    files: list[str]
    dynamic_text_length: bool
    parity: list[Parity] = field(default_factory=list)

    @property
    def worst_rel(self) -> float:
        return max((p.rel for p in self.parity), default=0.0)


class ImageGraph(nn.Module):
    """pixel_values [N, 3, S, S] -> image_features [N, embed_dim]."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class TextGraph(nn.Module):
    """input_ids [N, L] -> text_features [N, embed_dim] (no host-side cut: the exporter traces all of L)."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(
            f"ONNX export needs {module}: pip install 'clipforge[export]' (onnx, onnxruntime, onnxscript)"
        ) from None


def example_ids(model: CLIP, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token rows [batch, length] shaped like tokenizer output for this model's pooling: a body of
    random length ending in the end-of-text token (the highest id, or `eos_id`), then zero padding.
    Row 0 fills all `length` positions."""
    t = model.config.text
    eot = t.eos_id if t.pool_type == "eos" else t.vocab_size - 1
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        n = length if i == 0 else int(torch.randint(2, length + 1, (1,), generator=g))
        body = torch.randint(1, t.vocab_size - 1, (n - 1,), generator=g)  # below the highest id
        body[body == eot] = eot + 1 if eot + 1 < t.vocab_size - 1 else eot - 1  # one end-of-text per row
        ids[i, : n - 1], ids[i, n - 1] = body, eot
    return ids


def _export(module: nn.Module, example: torch.Tensor, path: Path, name_in: str, name_out: str,
            dims: dict[int, Any], opset: int) -> None:  # fmt: skip
    """Export `module` to `path`, atomically: saved in a temporary folder beside it, then moved in
    (external weight data first, the .onnx that names it last)."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    with warnings.catch_warnings():
        # The exporter warns (and logs) about openai/CLIP's mask attributes: constants, not weights.
        warnings.simplefilter("ignore")
        log.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                module, (example,), input_names=[name_in], output_names=[name_out], dynamic_shapes=(dims,),
                opset_version=opset, dynamo=True, verbose=False,
            )  # fmt: skip
        finally:
            log.setLevel(level)
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > 1.5 * 2**30  # protobuf: 2 GiB
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        program.save(str(Path(tmp) / path.name), external_data=big)
        names = sorted(os.listdir(tmp), key=lambda n: n == path.name)
        for n in names:
            os.replace(Path(tmp) / n, path.parent / n)


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a - b).abs().max().item()
    return diff, diff / max(b.abs().max().item(), 1e-30)


def check_parity(model: CLIP, out_dir: Path, dynamic_length: bool) -> list[Parity]:
    """onnxruntime vs PyTorch on the written graphs: images at batch 1 and 7; text at batch 1 and 7 and
    three lengths (short, middle, full context) when the length is dynamic, the full context otherwise."""
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    results = []
    size = model.visual.input_resolution
    image = ort.InferenceSession(str(out_dir / "image.onnx"), opts, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for n in PARITY_BATCHES:
        x = torch.randn(n, 3, size, size, generator=g)
        with torch.no_grad():
            ref = model.encode_image(x)
        got = torch.from_numpy(image.run(None, {"pixel_values": x.numpy()})[0])
        results.append(Parity("image", n, None, *_rel(got, ref)))
    text = ort.InferenceSession(str(out_dir / "text.onnx"), opts, providers=["CPUExecutionProvider"])
    ctx = model.context_length
    lengths = sorted({min(8, ctx), max(2, ctx // 2), ctx}) if dynamic_length else [ctx]
    for n in PARITY_BATCHES:
        for length in lengths:
            ids = example_ids(model, n, length, seed=n * 1000 + length)
            with torch.no_grad():
                ref = model.encode_text(ids)
            got = torch.from_numpy(text.run(None, {"input_ids": ids.numpy()})[0])
            results.append(Parity("text", n, length, *_rel(got, ref)))
    return results


def export_onnx(model: CLIP, out_dir: str | os.PathLike, opset: int = 18, check: bool = True) -> ExportResult:
    """Write image.onnx, text.onnx and export.json into `out_dir` (see the module docstring); with
    `check`, measure their parity with onnxruntime.  The model is exported in fp32 on the CPU (a copy)."""
    _require("onnxscript")
    _require("onnx")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} is a file; give a folder for image.onnx and text.onnx")
    out.mkdir(parents=True, exist_ok=True)
    model = _fp32_cpu_copy(model)
    cfg = model.config
    batch = torch.export.Dim("batch", min=1, max=65536)
    size = model.visual.input_resolution
    _export(ImageGraph(model).eval(), torch.zeros(2, 3, size, size), out / "image.onnx", "pixel_values",
            "image_features", {0: batch}, opset)  # fmt: skip
    dynamic = cfg.text.cut_after_eot
    ctx = model.context_length
    text_dims: dict[int, Any] = {0: batch}
    if dynamic:
        text_dims[1] = torch.export.Dim("length", min=2, max=ctx)  # 1 token is a start token alone
    example = example_ids(model, 2, max(2, ctx - 1) if dynamic else ctx)  # not at the bound: no specialising
    _export(
        TextGraph(model).eval(), example, out / "text.onnx", "input_ids", "text_features", text_dims, opset
    )
    result = ExportResult(["image.onnx", "text.onnx", "export.json"], dynamic)
    if check:
        result.parity = check_parity(model, out, dynamic)
    from clip.io import atomic_write_json

    atomic_write_json(out / "export.json", _manifest(model, result, opset))
    return result


def _fp32_cpu_copy(model: CLIP) -> CLIP:
    from clip.loading import model_from_state_dict

    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return model_from_state_dict(model.config, sd, source="model to export")


def _manifest(model: CLIP, result: ExportResult, opset: int) -> dict[str, Any]:
    cfg = model.config
    size = model.visual.input_resolution
    length = "L" if result.dynamic_text_length else model.context_length
    return {
        "format": "onnx",
        "opset": opset,
        "config": json.loads(cfg.to_json()),
        "image": {"file": "image.onnx", "input": {"pixel_values": ["N", 3, size, size]},
                  "output": {"image_features": ["N", cfg.embed_dim]}, "mean": list(cfg.mean), "std": list(cfg.std)},
        "text": {"file": "text.onnx", "input": {"input_ids": ["N", length]},
                 "output": {"text_features": ["N", cfg.embed_dim]}, "max_length": model.context_length,
                 "dynamic_length": result.dynamic_text_length},
        "logit_scale": float(model.logit_scale.detach().exp()),
        "parity": [asdict(p) for p in result.parity],
    }  # fmt: skip
