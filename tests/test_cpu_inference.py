"""clip.optimize_for_cpu: bf16 and int8 copies agree with fp32 on realistic inputs, keep the encode API and
openai/CLIP's attention call, and `clip embed --precision bf16|int8` records its measured agreement."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

import clip
from clip.cli import main
from clip.config import get_config
from clip.cpu_inference import (
    CPUInferenceModel,
    InferenceSelfAttention,
    Int8Linear,
    MixedLayerNorm,
    feature_agreement,
    optimize_for_cpu,
)
from clip.model import CLIP
from clip.model.layers import Attention, LayerNorm, QuickGELU, ResidualAttentionBlock
from clip.preprocess import image_transform

CAPTIONS = ["a photo of a dog", "a red square on a blue background", "two cats asleep on a sofa",
            "a diagram of a transformer", "sunset over the sea", "a bowl of fruit"]  # fmt: skip


def photo_like(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """Images with photo statistics: smooth colour gradients, a few solid shapes, mild sensor noise."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(n):
        base = np.stack([rng.uniform(0, 1) + rng.uniform(-0.5, 0.5) * xx + rng.uniform(-0.5, 0.5) * yy
                         for _ in range(3)], -1)  # fmt: skip
        img = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.integers(0, size - 8, 2)
            box = [int(x0), int(y0), int(x0 + rng.integers(6, 30)), int(y0 + rng.integers(6, 30))]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        arr = np.asarray(img).astype(np.float32) + rng.normal(0, 4, (size, size, 3))
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


@pytest.fixture
def inputs(tiny_model):
    preprocess = image_transform(tiny_model.visual.input_resolution)
    pixels = torch.stack([preprocess(im) for im in photo_like(16)])
    return pixels, clip.tokenize(CAPTIONS)


@pytest.fixture
def trained_like_model():
    """A tiny model whose weights carry what trained CLIP weights have and random init lacks: a few outlier
    channels in the residual stream (large LayerNorm gains) that per-tensor int8 must survive."""
    torch.manual_seed(1)
    model = CLIP(get_config("ViT-Tiny/8@32px")).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerNorm):
                m.weight[:2] *= 8.0
    return model


@pytest.mark.parametrize("precision,floor", [("bf16", 0.999), ("int8", 0.99)])
def test_agreement_with_fp32(tiny_model, trained_like_model, inputs, precision, floor, one_thread):
    pixels, tokens = inputs
    for model in (tiny_model, trained_like_model):
        fast = optimize_for_cpu(model, precision)
        agree = feature_agreement(model, fast, images=pixels, texts=tokens)
        assert set(agree) == {"image_cosine_mean", "image_cosine_min", "text_cosine_mean", "text_cosine_min"}
        assert agree["image_cosine_min"] >= floor and agree["text_cosine_min"] >= floor, agree
        with torch.no_grad():
            ref = model.encode_image(pixels)
        assert not torch.equal(fast.encode_image(pixels), ref)  # the low precision really ran
        # Search survives: the nearest neighbour the fast features pick is (within rounding) fp32's nearest.
        a, b = F.normalize(ref, dim=-1), F.normalize(fast.encode_image(pixels), dim=-1)
        sim_a, sim_b = a @ a.t() - 2 * torch.eye(16), b @ b.t() - 2 * torch.eye(16)
        picked = sim_a.gather(1, sim_b.argmax(1, keepdim=True))[:, 0]
        assert (picked >= sim_a.max(1).values - 2 * (1 - floor)).all()


def test_int8_replaces_every_block_linear(tiny_model):
    fast = optimize_for_cpu(tiny_model, "int8").model
    blocks = [m for m in fast.modules() if isinstance(m, ResidualAttentionBlock)]
    assert len(blocks) == tiny_model.config.vision.layers + tiny_model.config.text.layers
    for block in blocks:
        assert isinstance(block.attn, InferenceSelfAttention)
        assert isinstance(block.attn.in_proj, Int8Linear) and isinstance(block.attn.out_proj, Int8Linear)
        assert isinstance(block.mlp.c_fc, Int8Linear) and isinstance(block.mlp.c_proj, Int8Linear)
        assert isinstance(block.mlp.gelu, nn.SiLU)  # QuickGELU folded into the matmuls' scales
    assert not any(isinstance(m, Attention) for m in fast.modules())


def test_bf16_casts_weights_and_keeps_layernorm_fp32(tiny_model):
    fast = optimize_for_cpu(tiny_model, "bf16")
    assert fast.dtype == torch.bfloat16 and fast.model.visual.conv1.weight.dtype == torch.bfloat16
    norms = [m for m in fast.model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(isinstance(m, MixedLayerNorm) and m.weight.dtype == torch.float32 for m in norms)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    ln = norms[0]
    # Same numbers as this project's fp32-computing LayerNorm, rounded to bf16.
    ref = LayerNorm(64)
    ref.load_state_dict(ln.state_dict())
    torch.testing.assert_close(ln(x), ref(x.float()).to(torch.bfloat16), atol=1e-2, rtol=1e-2)
    assert ln(x).dtype == torch.bfloat16


def test_int8_linear_is_the_quantised_matmul():
    torch.manual_seed(0)
    lin = nn.Linear(48, 96)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(7, 5, 48)  # leading dims kept, as [L, N, D]
    y = q(x)
    assert y.shape == (7, 5, 96) and y.dtype == torch.float32
    w, b = q.dequantized()
    # Weights: symmetric per-channel int8 (error at most half a step of each row's scale).
    step = lin.weight.abs().amax(1, keepdim=True) / 127
    assert ((w - lin.weight).abs() <= step / 2 + 1e-6).all()
    # Activations: one scale per call over the tensor's range, full 8 bits; the matmul is exact in int32.
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255
    zero = round(-lo / scale)
    xq = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
    torch.testing.assert_close(y, F.linear(xq, w, b), atol=2e-4, rtol=1e-4)
    assert (y - lin(x)).abs().max() < 0.05 * lin(x).abs().max()


@pytest.mark.parametrize("act", [QuickGELU(), nn.GELU(), nn.GELU(approximate="tanh")])
@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_is_the_block_mlp(act, onednn, dtype, monkeypatch):
    """The activation fused into c_fc (QuickGELU as swish(1.702 x) / 1.702) computes the same MLP, through
    oneDNN's fused matmul and through the plain fallback."""
    import clip.cpu_inference as ci

    monkeypatch.setattr(ci, "_onednn_linear_available", lambda: onednn)
    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4)
    block.mlp.gelu = act
    block.to(dtype)
    fused = ci._fused_mlp(block.mlp)
    assert isinstance(fused.c_fc, ci.OneDNNLinear) and (fused.c_fc._packed is not None) == onednn
    x = torch.randn(6, 3, 32, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block.mlp(x), atol=tol, rtol=tol)


def test_fp32_blocks_run_through_onednn(tiny_model):
    import clip.cpu_inference as ci

    fast = optimize_for_cpu(tiny_model, "fp32").model
    blocks = [m for m in fast.modules() if isinstance(m, ResidualAttentionBlock)]
    assert blocks and all(isinstance(b.attn.in_proj, ci.OneDNNLinear) for b in blocks)
    assert all(b.mlp.c_fc.activation == "swish" and isinstance(b.mlp.gelu, nn.Identity) for b in blocks)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask", ["none", "causal", "additive"])
def test_inference_attention_equals_multihead_attention(batch_first, mask):
    """With float projections it computes exactly what nn.MultiheadAttention does, for CLIP's calls."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    in_proj = nn.Linear(32, 96)
    in_proj.weight.data, in_proj.bias.data = mha.in_proj_weight.data, mha.in_proj_bias.data
    attn = InferenceSelfAttention(in_proj, mha.out_proj, 4, 32, batch_first)
    x = torch.randn(2, 6, 32) if batch_first else torch.randn(6, 2, 32)
    causal = mask == "causal"
    m = None if mask == "none" else torch.full((6, 6), float("-inf")).triu_(1)
    if mask == "additive":
        m = torch.randn(6, 6)
    out, weights = attn(x, x, x, need_weights=False, attn_mask=m, is_causal=causal)
    expected = mha(x, x, x, need_weights=False, attn_mask=m, is_causal=causal)[0]
    assert weights is None
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="use the fp32 model"):
        attn(x, x, x)  # need_weights=True: attention maps are the fp32 model's job


def test_api_round_trip(tiny_model, inputs):
    pixels, tokens = inputs
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    for precision in ("fp32", "bf16", "int8"):
        fast = clip.optimize_for_cpu(tiny_model, precision=precision)
        assert isinstance(fast, CPUInferenceModel) and fast.precision == precision
        assert fast.config == tiny_model.config and fast.context_length == tiny_model.context_length
        img, txt = fast.encode_image(pixels), fast.encode_text(tokens)
        assert img.shape == (16, 64) and txt.shape == (6, 64)
        assert img.dtype == txt.dtype == torch.float32
        per_image, per_text = fast(pixels, tokens)
        assert per_image.shape == (16, 6) and torch.equal(per_text, per_image.t())
        torch.testing.assert_close(per_image, fast.logits(img, txt))
        assert not any(p.requires_grad for p in fast.parameters())
    with torch.no_grad():  # fp32 through oneDNN: the same function up to float rounding
        torch.testing.assert_close(clip.optimize_for_cpu(tiny_model, "fp32").encode_image(pixels),
                                   tiny_model.encode_image(pixels), atol=1e-5, rtol=1e-5)  # fmt: skip
        torch.testing.assert_close(clip.optimize_for_cpu(tiny_model, "fp32").encode_text(tokens),
                                   tiny_model.encode_text(tokens), atol=1e-5, rtol=1e-5)  # fmt: skip
    # The original model is untouched: fp32, trainable, same weights and module types.
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert isinstance(tiny_model.transformer.resblocks[0].attn, Attention)
    assert clip.feature_agreement is feature_agreement


def test_bad_requests_say_what_to_do(tiny_model):
    with pytest.raises(ValueError, match="unknown CPU precision 'int4'; use one of fp32, bf16, int8"):
        optimize_for_cpu(tiny_model, "int4")
    with pytest.raises(ValueError, match="pass the fp32 model"):
        optimize_for_cpu(optimize_for_cpu(tiny_model, "bf16"), "int8")
    with pytest.raises(ValueError, match="needs images or texts"):
        feature_agreement(tiny_model, tiny_model)


def test_resnet_image_tower_bf16_and_int8_text(one_thread):
    torch.manual_seed(0)
    model = CLIP(get_config("RN-Tiny@32px")).eval()
    pixels = torch.stack([image_transform(32)(im) for im in photo_like(4)])
    tokens = clip.tokenize(CAPTIONS[:4])
    assert (
        feature_agreement(model, optimize_for_cpu(model, "bf16"), images=pixels)["image_cosine_min"] > 0.999
    )
    int8 = optimize_for_cpu(model, "int8")
    assert feature_agreement(model, int8, texts=tokens)["text_cosine_min"] > 0.99
    # The ResNet's convolutions and attention pool stay fp32: its image features are unchanged.
    torch.testing.assert_close(int8.encode_image(pixels), model.encode_image(pixels).detach(), atol=0, rtol=0)


@pytest.mark.parametrize("precision,floor", [("bf16", 0.999), ("int8", 0.99)])
def test_embed_records_agreement(tmp_path, tiny_checkpoint, precision, floor, one_thread):
    pytest.importorskip("pyarrow")
    from clip.collection import shards

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(photo_like(6, seed=3)):
        im.save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(CAPTIONS[i])
    common = [str(folder), "--model", str(tiny_checkpoint), "--workers", "0", "--device", "cpu", "--text",
              "--batch-size", "4", "--no-progress"]  # fmt: skip
    assert main(["embed", *common, "--output", str(tmp_path / "fp32")]) == 0
    assert main(["embed", *common, "--output", str(tmp_path / precision), "--precision", precision]) == 0
    report = json.loads((tmp_path / precision / "report.json").read_text())
    [agree] = report["last_run"]["agreement_with_fp32"]
    assert agree["batch_size"] == 4  # the job's first batch
    assert agree["image_cosine_min"] >= floor and agree["text_cosine_min"] >= floor
    a = shards.load_embeddings(tmp_path / "fp32").astype(np.float32)
    b = shards.load_embeddings(tmp_path / precision).astype(np.float32)
    assert not np.array_equal(a, b) and (a * b).sum(1).min() >= floor
    assert shards.read_job(tmp_path / precision)["precision"] == precision
    fp32_report = json.loads((tmp_path / "fp32" / "report.json").read_text())
    assert fp32_report["last_run"]["agreement_with_fp32"] == []


def test_embed_int8_on_gpu_is_refused(tmp_path, tiny_checkpoint, capsys):
    code = main(["embed", str(tmp_path), "--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"),
                 "--precision", "int8", "--device", "cuda"])  # fmt: skip
    assert code == 2
    assert "int8 is a CPU precision" in capsys.readouterr().err
