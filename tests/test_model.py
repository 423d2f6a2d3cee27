"""The model, its configs, and loading: API shape, formats, and clear errors for bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import clip
from clip.cli import main as cli_main
from clip.config import CLIPConfig, get_config, registry
from clip.loading import read_checkpoint, save_model
from clip.model import CLIP, Attention, LayerNorm

SMALL = [name for name, cfg in registry().items() if cfg.vision.image_size <= 64]


@pytest.mark.parametrize("name", list(registry()))
def test_config_json_round_trip(name):
    cfg = get_config(name)
    assert CLIPConfig.from_json(cfg.to_json()) == cfg


def test_config_rejects_unknown_keys_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown key"):
        CLIPConfig.from_dict({"embed_dim": 8, "quick_gelue": True})
    with pytest.raises(ValueError, match="patch_size"):
        CLIPConfig.from_dict({"vision": {"image_size": 30, "patch_size": 8}})
    with pytest.raises(ValueError, match="unknown model"):
        get_config("ViT-B/33")


def test_from_openai_args_matches_registry():
    args = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12)  # fmt: skip
    assert CLIPConfig.from_openai_args(args) == get_config("ViT-B/32")
    rn = dict(args, embed_dim=1024, vision_layers=[3, 4, 6, 3], vision_width=64, vision_patch_size=None)
    assert CLIPConfig.from_openai_args(rn) == get_config("RN50")


@pytest.mark.parametrize("name", SMALL)
def test_small_configs_forward_backward(name):
    torch.manual_seed(0)
    model = CLIP(get_config(name))
    size = model.visual.input_resolution
    image = torch.randn(3, 3, size, size)
    text = torch.randint(1, 49000, (3, model.context_length))
    logits_i, logits_t = model(image, text)
    assert logits_i.shape == (3, 3) and torch.equal(logits_t, logits_i.t())
    loss = F.cross_entropy(logits_i, torch.arange(3)) + F.cross_entropy(logits_t, torch.arange(3))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_openai_attributes(tiny_model):
    assert tiny_model.dtype == torch.float32
    assert tiny_model.visual.input_resolution == 32
    assert tiny_model.context_length == 32 and tiny_model.vocab_size == 49408
    assert math.isclose(tiny_model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_transformer_takes_openai_sequence_first_layout(tiny_model):
    """Prompt learners (CoOp) call model.transformer on [L, N, D] tensors, as in openai/CLIP."""
    x = torch.randn(3, 32, 64)  # [N, L, D]
    with torch.no_grad():
        lnd = tiny_model.transformer(x.permute(1, 0, 2))
        ref = x.permute(1, 0, 2)
        for block in tiny_model.transformer.resblocks:
            ref = block(ref)
    assert lnd.shape == (32, 3, 64)
    torch.testing.assert_close(lnd, ref)


def test_sdpa_attention_equals_plain_math():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(7, 2, 32)  # [L, N, D]
    for causal in (False, True):
        q, k, v = F.linear(x.transpose(0, 1), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.view(2, 7, 4, 8).transpose(1, 2)  # noqa: E731  [N, H, L, hd]
        w = split(q) @ split(k).transpose(-1, -2) / math.sqrt(8)
        if causal:
            w = w.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        ref = attn.out_proj((w.softmax(-1) @ split(v)).transpose(1, 2).reshape(2, 7, 32)).transpose(0, 1)
        mask = clip.model.causal_mask(7) if causal else None
        out, weights = attn(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)
        assert weights is None
        torch.testing.assert_close(out, ref)


def test_multihead_attention_equivalence():
    """Our Attention is an nn.MultiheadAttention: same parameters, same results on every path."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4)
    ours = Attention(32, 4)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    ours.load_state_dict(mha.state_dict())
    x, y = torch.randn(5, 2, 32), torch.randn(3, 2, 32)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0])
    out, w = ours(x, x, x)  # need_weights defaults to True, as in PyTorch
    ref_out, ref_w = mha(x, x, x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(ours(y, x, x)[0], mha(y, x, x)[0])  # cross-attention: PyTorch's own path


def test_layernorm_runs_in_fp32_for_half_inputs():
    ln = LayerNorm(16)
    x = torch.randn(4, 16) * 300
    out = ln(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), F.layer_norm(x.to(torch.bfloat16).float(), (16,)), atol=1e-2, rtol=1e-2
    )


def test_grad_checkpointing_gives_the_same_gradients(tiny_model):
    image, text = torch.randn(2, 3, 32, 32), torch.randint(1, 49000, (2, 32))
    grads = []
    for enable in (False, True):
        tiny_model.train().zero_grad()
        tiny_model.set_grad_checkpointing(enable)
        tiny_model(image, text)[0].sum().backward()
        grads.append([p.grad.clone() for p in tiny_model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_load_own_checkpoint_and_preprocess(tiny_checkpoint, tiny_model):
    model, preprocess = clip.load(str(tiny_checkpoint), device="cpu")
    assert not model.training
    from PIL import Image

    x = preprocess(Image.new("RGB", (50, 40), (200, 10, 10))).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), tiny_model.encode_image(x), rtol=0, atol=0)


def test_load_torchscript_archive(tmp_path, tiny_model):
    image, text = torch.randn(1, 3, 32, 32), torch.randint(1, 49000, (1, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; OpenAI's files use it
        torch.jit.trace(tiny_model, (image, text), check_trace=False).save(str(tmp_path / "jit.pt"))
        # Shapes cannot tell head counts: an archive that is not one of OpenAI's nine needs arch=.
        with pytest.raises(ValueError, match="arch="):
            read_checkpoint(tmp_path / "jit.pt")
        cfg, sd = read_checkpoint(tmp_path / "jit.pt", arch="ViT-Tiny/8@32px")
    assert cfg == tiny_model.config
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_unknown_model_name_lists_available():
    with pytest.raises(ValueError, match="ViT-B/32"):
        clip.load("ViT-B/99", device="cpu")


def test_truncated_and_foreign_files_are_named(tmp_path, tiny_checkpoint):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(tiny_checkpoint.read_bytes()[:2000])
    with pytest.raises(ValueError, match="cut.pt"):
        clip.load(str(cut), device="cpu")
    text = tmp_path / "notes.bin"
    text.write_text("hello, not a checkpoint")
    with pytest.raises(ValueError, match="notes.bin"):
        clip.load(str(text), device="cpu")
    st = tmp_path / "m.safetensors"
    save_model(CLIP(get_config("ViT-Tiny/8@32px")), st)
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ValueError, match="m.safetensors"):
        clip.load(str(st), device="cpu")


def test_refuses_pickled_code(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused for safety"):
        clip.load(str(tmp_path / "evil.pt"), device="cpu")


class _Evil:
    pass


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_model):
    sd = dict(tiny_model.state_dict())
    sd.pop("ln_final.weight")
    sd["visual.extra"] = torch.zeros(1)
    torch.save({"config": tiny_model.config.to_dict(), "state_dict": sd}, tmp_path / "bad.pt")
    with pytest.raises(
        ValueError, match=r"missing keys \[ln_final.weight\].*unexpected keys \[visual.extra\]"
    ):
        clip.load(str(tmp_path / "bad.pt"), device="cpu")


def test_cli_convert_round_trip(tmp_path, tiny_checkpoint, tiny_model, capsys):
    assert cli_main(["convert", str(tiny_checkpoint), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (
        cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.safetensors"), "--to", "safetensors"])
        == 0
    )
    assert (
        cli_main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back.pt"), "--to", "openai"])
        == 0
    )
    cfg, sd = read_checkpoint(tmp_path / "back.pt")
    assert cfg == tiny_model.config
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, sd[k])
    assert cli_main(["convert", str(tmp_path / "nope.pt"), str(tmp_path / "x.pt"), "--to", "openai"]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_traced_text_tower_is_not_frozen_to_the_example_length(tiny_model):
    """The CPU end-of-text cut is skipped while tracing, so a trace works for any text length."""
    short = torch.zeros(2, 32, dtype=torch.long)
    short[:, 0], short[:, 1], short[:, 2] = 49406, 320, 49407
    long = torch.randint(1, 49000, (2, 32))
    long[:, 25] = 49407
    long[:, 26:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(tiny_model, {"encode_text": (short,)}).encode_text
    with torch.no_grad():
        torch.testing.assert_close(traced(long), tiny_model.encode_text(long))


def test_bad_model_configs_are_one_clear_line(tmp_path):
    """heads 0, a string width, a list, missing keys, patch 0, a bool embed_dim: each a ValueError naming it."""
    from clip.train.build import check_vocab_fits_tokenizer, load_model_config

    cases = {
        "heads0": ({"vision": {"heads": 0}}, "vision heads"),
        "strwidth": ({"text": {"width": "512"}}, "text width"),
        "list": ([1, 2], "JSON object"),
        "patch0": (
            {
                "embed_dim": 512,
                "image_resolution": 224,
                "vision_layers": 12,
                "vision_width": 768,
                "vision_patch_size": 0,
                "transformer_width": 512,
                "transformer_heads": 8,
                "transformer_layers": 12,
            },
            "patch_size",
        ),  # fmt: skip
        "missing": ({"embed_dim": 512, "image_resolution": 224}, "missing"),
        "booldim": ({"embed_dim": True}, "embed_dim"),
        "badpool": ({"text": {"pool_type": "mean"}}, "pool_type"),
    }
    for name, (obj, needle) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(__import__("json").dumps(obj))
        with pytest.raises(ValueError, match=needle):
            load_model_config(str(path))
    small = {"vocab_size": 1000}
    with pytest.raises(ValueError, match="vocab_size 1000"):
        check_vocab_fits_tokenizer(get_config("ViT-Tiny/8@32px").replace(text=small), "x.json")


def test_safetensors_with_bad_config_metadata_names_the_file(tmp_path, tiny_model):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    save_file(sd, str(path), metadata={"clip_config": "{not json", "format": "pt"})
    with pytest.raises(ValueError, match=r"m\.safetensors.*not valid JSON"):
        read_checkpoint(path)
    save_file(sd, str(path), metadata={"clip_config": '{"vision": {"heads": 0}}', "format": "pt"})
    with pytest.raises(ValueError, match=r"m\.safetensors.*vision heads"):
        read_checkpoint(path)
