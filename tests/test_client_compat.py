"""Code written for openai/CLIP, run unchanged against our modules and against openai/CLIP's semantics.

The reference is openai/CLIP's ViT CLIP restated with `torch.nn` parts (tests/openai_reference.py); both
get the same random weights.  Each test is the calls of one kind of public client code: prompt learning
(CoOp's TextEncoder and PromptLearner), a cache-model adapter (Tip-Adapter), attention surgery on the
last vision block (MaskCLIP / SCLIP style: per-block loops, `attn(x, x, x, ...)`, hooks), CLIP-guided
pixel optimisation through `preprocess.transforms`.  Forward and backward must agree to < 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from openai_reference import RefCLIP
from torch import nn

import clip
import clip.model
from clip import clip as openai_clip_module

# openai/CLIP's CLIP(...) arguments: a small ViT (2 heads in both towers by openai/CLIP's width // 64 rule)
ARGS = dict(embed_dim=48, image_resolution=32, vision_layers=3, vision_width=128, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
            transformer_layers=3)  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def pair():
    """(ours, reference) with the same weights; ours built through openai/CLIP's constructor signature."""
    torch.manual_seed(0)
    ours = clip.model.CLIP(*ARGS.values()).eval()
    ref = RefCLIP(**ARGS).eval()
    ref.load_state_dict(ours.state_dict())  # same keys and shapes, strictly
    return ours, ref


def captions() -> torch.Tensor:
    return clip.tokenize(
        ["a photo of a dog", "a diagram", "an oil painting of a red fox in the snow at dusk"]
    )


def test_top_level_calls_agree(pair):
    ours, ref = pair
    image, text = torch.randn(2, 3, 32, 32), captions()
    with torch.no_grad():
        assert rel(ours.encode_image(image), ref.encode_image(image)) < 1e-5
        assert rel(ours.encode_text(text), ref.encode_text(text)) < 1e-5
        assert rel(ours(image, text)[0], ref(image, text)[0]) < 1e-5


def test_openai_module_surface_imports():
    from clip.simple_tokenizer import SimpleTokenizer

    assert set(openai_clip_module._MODELS) == set(clip.available_models())
    assert openai_clip_module._MODELS["ViT-B/32"].endswith("/ViT-B-32.pt")
    assert openai_clip_module._tokenizer.encode("a cat") == SimpleTokenizer().encode("a cat")
    assert openai_clip_module.tokenize is clip.tokenize and openai_clip_module.load is clip.load
    t = openai_clip_module._transform(224)
    assert [type(s).__name__ for s in t.transforms][:2] == ["Resize", "CenterCrop"]
    for name in ("CLIP", "build_model", "convert_weights", "VisionTransformer", "ModifiedResNet", "Transformer",
                 "ResidualAttentionBlock", "AttentionPool2d", "LayerNorm", "QuickGELU", "Bottleneck"):  # fmt: skip
        assert hasattr(clip.model, name), name


def test_openai_constructor_signatures():
    mask = torch.empty(5, 5).fill_(float("-inf")).triu_(1)
    tf = clip.model.Transformer(32, 2, 4, attn_mask=mask)
    block = clip.model.ResidualAttentionBlock(32, 4, mask)
    assert tf.resblocks[0].attn_mask is mask and block.attn_mask is mask
    vit = clip.model.VisionTransformer(32, 8, 64, 2, 2, 16)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 16)
    assert clip.model.AttentionPool2d(2, 64, 4).c_proj.out_features == 64  # output_dim defaults to embed_dim
    assert clip.model.ModifiedResNet((1, 1, 1, 1), 16, 4, 64, 8)(torch.randn(1, 3, 64, 64)).shape == (1, 16)


def test_build_model_and_convert_weights_behave_as_openai(pair):
    ours, _ = pair
    model = clip.model.build_model(dict(ours.state_dict()))
    assert not model.training and model.dtype == torch.float16  # openai/CLIP's build_model returns fp16
    assert model.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float16
    assert (
        model.ln_final.weight.dtype == torch.float32 and model.token_embedding.weight.dtype == torch.float32
    )
    assert model.float().config == ours.config


def test_attn_is_a_multihead_attention_with_its_attributes(pair):
    ours, ref = pair
    blk, rblk = ours.visual.transformer.resblocks[-1], ref.visual.transformer.resblocks[-1]
    assert isinstance(blk.attn, nn.MultiheadAttention)
    for name in ("num_heads", "embed_dim", "head_dim", "batch_first", "dropout", "_qkv_same_embed_dim"):
        assert getattr(blk.attn, name) == getattr(rblk.attn, name), name
    assert blk.attn_mask is None
    assert torch.equal(ours.transformer.resblocks[0].attn_mask, ours.build_attention_mask())
    assert torch.equal(ours.build_attention_mask(), ref.build_attention_mask())


def test_per_block_loops_and_attention_surgery(pair):
    """MaskCLIP / SCLIP style: run the visual blocks by hand, then rewrite the last block's attention."""
    results = []
    for model in pair:
        v = model.visual
        img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        x = v.conv1(img)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat(
            [v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x], 1
        )
        x = v.ln_pre(x + v.positional_embedding.to(x.dtype))
        x = x.permute(1, 0, 2)  # NLD -> LND
        for blk in v.transformer.resblocks[:-1]:
            x = blk(x)
        blk = v.transformer.resblocks[-1]
        h = blk.ln_1(x)
        plain = blk.attention(h)
        called = blk.attn(h, h, h, need_weights=False, attn_mask=blk.attn_mask)[0]
        out, weights = blk.attn(h, h, h, need_weights=True)  # attention maps, averaged over heads
        q, k, val = F.linear(h, blk.attn.in_proj_weight, blk.attn.in_proj_bias).tensor_split(3, dim=-1)
        value_value = blk.attn.out_proj(val)  # MaskCLIP's value path
        dense = x + value_value
        dense = dense + blk.mlp(blk.ln_2(dense))
        patch = v.ln_post(dense.permute(1, 0, 2)[:, 1:]) @ v.proj
        results.append([x, plain, called, out, weights, value_value, patch])
    for a, b in zip(*results):
        assert a.shape == b.shape and rel(a, b) < 1e-5


def test_text_blocks_called_directly_are_causal(pair):
    results = []
    for model in pair:
        text = captions()
        x = (model.token_embedding(text) + model.positional_embedding).permute(1, 0, 2)
        for blk in model.transformer.resblocks:
            x = blk(x)
        results.append(x)
    assert rel(results[0], results[1]) < 1e-5


def _recorder(got: dict, key: str, what):
    return lambda module, inputs, output: got.__setitem__(key, what(inputs, output))


def test_forward_hooks_see_openai_layouts(pair):
    seen = []
    for model in pair:
        got: dict = {}
        blk = model.visual.transformer.resblocks[1]
        hooks = [
            model.visual.transformer.register_forward_hook(_recorder(got, "vt", lambda i, o: o.shape)),
            model.transformer.register_forward_hook(_recorder(got, "tt", lambda i, o: o.shape)),
            blk.attn.register_forward_hook(
                _recorder(got, "attn", lambda i, o: (len(i), i[0].shape, o[0].shape, o[1]))
            ),
            blk.ln_1.register_forward_hook(_recorder(got, "ln_1", lambda i, o: o.shape)),
        ]
        with torch.no_grad():
            model.encode_image(torch.randn(2, 3, 32, 32))
            model.encode_text(clip.tokenize(["a cat"]))
        for h in hooks:
            h.remove()
        seen.append(got)
    assert seen[0]["vt"] == (17, 2, 128)  # [L, N, D]
    assert seen[0]["attn"] == (3, (17, 2, 128), (17, 2, 128), None)  # (q, k, v) in, (out, no weights) out
    assert seen[0] == {**seen[1], "tt": seen[0]["tt"]}
    # Text: ours stops after the end-of-text token on CPU; the layout is still [L, N, D].
    assert seen[0]["tt"][1:] == seen[1]["tt"][1:] and seen[1]["tt"][0] == 77


class TextEncoder(nn.Module):
    """CoOp's text encoder, verbatim in its calls."""

    def __init__(self, clip_model):
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, prompts, tokenized_prompts):
        x = prompts + self.positional_embedding.type(self.dtype)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_final(x).type(self.dtype)
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection


class PromptLearner(nn.Module):
    """CoOp's learnable context: [SOS] + n_ctx vectors + class tokens + [EOS]."""

    def __init__(self, classnames, clip_model, n_ctx=4):
        super().__init__()
        dtype = clip_model.dtype
        ctx_dim = clip_model.ln_final.weight.shape[0]
        self.ctx = nn.Parameter(
            torch.randn(n_ctx, ctx_dim, generator=torch.Generator().manual_seed(3)) * 0.02
        )
        prompt_prefix = " ".join(["X"] * n_ctx)
        prompts = [prompt_prefix + " " + name + "." for name in classnames]
        tokenized = torch.cat([clip.tokenize(p) for p in prompts])
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokenized).type(dtype)
        self.register_buffer("token_prefix", embedding[:, :1, :])
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :, :])
        self.tokenized_prompts = tokenized

    def forward(self):
        ctx = self.ctx.unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)


def test_coop_prompt_learning_forward_and_backward(pair):
    classes = ["dog", "cat", "golden retriever", "oil painting"]
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    outs = []
    for model in pair:
        learner, encoder = PromptLearner(classes, model), TextEncoder(model)
        text_features = encoder(learner(), learner.tokenized_prompts)
        with torch.no_grad():
            image_features = model.encode_image(image)
        logits = 100 * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
        F.cross_entropy(logits, torch.tensor([0, 2])).backward()
        outs.append((logits.detach(), learner.ctx.grad.clone()))
    assert rel(outs[0][0], outs[1][0]) < 1e-5
    assert rel(outs[0][1], outs[1][1]) < 1e-5


def test_tip_adapter_cache_model(pair):
    """Tip-Adapter: few-shot image features as keys, one-hot labels as values, beside zero-shot weights."""
    g = torch.Generator().manual_seed(4)
    train, test = torch.randn(6, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    values = F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2])).float()
    outs = []
    for model in pair:
        with torch.no_grad():
            keys = F.normalize(model.encode_image(train), dim=-1).t()
            weights = F.normalize(model.encode_text(clip.tokenize(["a dog", "a cat", "a car"])), dim=-1).t()
            feats = F.normalize(model.encode_image(test), dim=-1)
            cache_logits = ((-1) * (5.5 - 5.5 * (feats @ keys))).exp() @ values
            outs.append(100.0 * feats @ weights + 1.0 * cache_logits)
    assert rel(outs[0], outs[1]) < 1e-5


def test_clip_guided_pixel_optimisation_gradients(pair):
    """CLIP guidance: gradients of a text-image cosine with respect to the input pixels."""
    text = clip.tokenize(["a red apple"])
    grads = []
    for model in pair:
        norm = openai_clip_module._transform(32).transforms[-1]  # Normalize, applied to tensors
        pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)).requires_grad_()
        with torch.no_grad():
            target = F.normalize(model.encode_text(text), dim=-1)
        loss = -(F.normalize(model.encode_image(norm(pixels)), dim=-1) * target).sum()
        loss.backward()
        grads.append(pixels.grad.clone())
    assert grads[0].abs().sum() > 0
    assert rel(grads[0], grads[1]) < 1e-5


def test_unprojected_features_with_proj_none(pair):
    """Clients set `visual.proj = None` for width-sized features, as openai/CLIP's forward allows."""
    ours, ref = pair
    image = torch.randn(1, 3, 32, 32)
    saved = ours.visual.proj, ref.visual.proj
    try:
        ours.visual.proj = None
        ref.visual.proj = None
        with torch.no_grad():
            a, b = ours.visual(image), ref.visual(image)
    finally:
        ours.visual.proj, ref.visual.proj = saved
    assert a.shape == (1, 128) and rel(a, b) < 1e-5
