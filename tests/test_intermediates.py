"""Hidden states and intermediates: equal to HF's `output_hidden_states` and open_clip's `forward_intermediates`.

Tiny random peers are built in the test (no downloads): an HF `CLIPModel` saved with `save_pretrained` and read
back with `clip.load`, and an open_clip `CLIP` whose state dict loads into ours unchanged.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
import transformers
from torch.testing import assert_close

import clip
from clip.config import CLIPConfig, TextConfig, VisionConfig
from clip.convert import normalize_openai_state_dict
from clip.loading import model_from_state_dict


def token_rows(n: int, context: int = 77, seed: int = 0) -> torch.Tensor:
    """Token rows as the tokenizer writes them: start, body, end-of-text, zero padding; lengths differ."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, context, dtype=torch.long)
    for i in range(n):
        length = 3 + 11 * i
        out[i, 0] = 49406
        out[i, 1 : 1 + length] = torch.randint(1, 49406, (length,), generator=g)
        out[i, 1 + length] = 49407
    return out


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(HF CLIPModel, our model read from its save_pretrained folder)."""
    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=48,
                bos_token_id=49406, eos_token_id=49407)  # fmt: skip
    vision = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=3,
                  image_size=64, patch_size=16, hidden_act="quick_gelu", projection_dim=48)  # fmt: skip
    hf = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=48)
    )
    folder = tmp_path_factory.mktemp("hf")
    hf.eval().save_pretrained(folder)
    model, _ = clip.load(str(folder), device="cpu")
    return hf, model


def test_hidden_states_equal_hugging_face(hf_pair):
    hf, model = hf_pair
    torch.manual_seed(1)
    image, ids = torch.randn(2, 3, 64, 64), token_rows(3)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=image.repeat(2, 1, 1, 1)[:3], output_hidden_states=True)
        ours = model.forward_intermediates(image, ids, image_output_fmt="NLC", image_output_extra_tokens=True)
        text = model.text_intermediates(ids)
    v_hs, t_hs = ref.vision_model_output.hidden_states, ref.text_model_output.hidden_states
    assert len(ours["image_intermediates"]) == len(v_hs) - 1 == 3
    assert_close(ours["image_embeddings"], v_hs[0][:2])
    for i, (prefix, patches) in enumerate(
        zip(ours["image_intermediates_prefix"], ours["image_intermediates"])
    ):
        assert patches.shape == (2, 16, 96)
        assert_close(torch.cat([prefix, patches], dim=1), v_hs[i + 1][:2])
    assert_close(text["text_embeddings"], t_hs[0])
    assert len(text["text_intermediates"]) == len(t_hs) - 1
    for i, hidden in enumerate(text["text_intermediates"]):
        assert_close(hidden, t_hs[i + 1])
    assert_close(text["text_tokens"], ref.text_model_output.last_hidden_state)
    assert_close(text["text_features"], hf.get_text_features(input_ids=ids).pooler_output)
    # open_clip's defaults: final features L2-normalised, as HF's image_embeds / text_embeds
    assert_close(ours["text_features"], ref.text_embeds)
    assert_close(ours["image_features"], ref.image_embeds[:2])


def test_clip_skip_one_liner_equals_hugging_face_penultimate_layer(hf_pair):
    """Diffusion pipelines' "clip skip 1": final LayerNorm of hidden_states[-2]."""
    hf, model = hf_pair
    ids = token_rows(2)
    with torch.no_grad():
        out = hf.text_model(input_ids=ids, output_hidden_states=True)
        ref = hf.text_model.final_layer_norm(out.hidden_states[-2])
        ours = model.ln_final(model.text_intermediates(ids, [-2])["text_intermediates"][0])
        early = model.text_intermediates(ids, [-2], stop_early=True)
    assert_close(ours, ref)
    assert set(early) == {"text_embeddings", "text_intermediates"}  # stopped: no features of a cut tower
    assert_close(model.ln_final(early["text_intermediates"][0]), ref)


@pytest.fixture(scope="module")
def open_clip_pair():
    torch.manual_seed(0)
    ref = open_clip.CLIP(
        embed_dim=48, quick_gelu=True,
        vision_cfg=dict(image_size=64, patch_size=16, width=96, layers=3, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=3),
    ).eval()  # fmt: skip
    cfg = CLIPConfig(
        embed_dim=48, vision=VisionConfig("vit", 64, 96, 3, 3, 16), text=TextConfig(77, 49408, 64, 2, 3)
    )
    return ref, model_from_state_dict(cfg, normalize_openai_state_dict(ref.state_dict()))


OPEN_CLIP_CALLS = [
    {},
    {"image_output_fmt": "NLC", "image_output_extra_tokens": True},
    {"image_indices": 1, "text_indices": 2},
    {"image_indices": [0, -1], "text_indices": [-2], "normalize_intermediates": True},
    {"intermediates_only": True, "image_indices": [1]},
    {"normalize": False, "output_logits": True, "output_logit_scale_bias": True},
]


@pytest.mark.parametrize("kwargs", OPEN_CLIP_CALLS, ids=lambda k: ",".join(k) or "defaults")
def test_forward_intermediates_equals_open_clip(open_clip_pair, kwargs):
    """Same arguments and defaults -> the same keys (ours may add some) and values."""
    ref, model = open_clip_pair
    torch.manual_seed(2)
    image, ids = torch.randn(2, 3, 64, 64), token_rows(3)
    with torch.no_grad():
        theirs = ref.forward_intermediates(image, ids, **kwargs)
        ours = model.forward_intermediates(image, ids, **kwargs)
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    if not kwargs.get("normalize", True):
        # open_clip then scales dot products of unnormalised features; ours are always cosine logits
        img, txt = (
            torch.nn.functional.normalize(theirs[k], dim=-1) for k in ("image_features", "text_features")
        )
        theirs["image_logits"] = ref.logit_scale.exp() * img @ txt.t()
        theirs["text_logits"] = theirs["image_logits"].t()
    for key, value in theirs.items():
        if isinstance(value, list):
            assert len(ours[key]) == len(value), key
            for a, b in zip(ours[key], value):
                assert a.shape == b.shape, key
                assert_close(a, b, msg=key)
        else:
            assert_close(ours[key], value, msg=key)


def test_vision_tower_intermediates_equal_open_clip_and_stop_early(open_clip_pair):
    ref, model = open_clip_pair
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        theirs = ref.visual.forward_intermediates(image, indices=[0], output_fmt="NCHW")
        ours = model.visual.forward_intermediates(image, indices=[0])
        early = model.visual.forward_intermediates(
            image, indices=[0], stop_early=True, intermediates_only=True
        )
        full_features = model.encode_image(image)
        late = model.visual.forward_intermediates(image, indices=[0], stop_early=True)
    assert ours["image_intermediates"][0].shape == (1, 96, 4, 4)
    assert_close(ours["image_intermediates"][0], theirs["image_intermediates"][0])
    assert_close(ours["image_features"], theirs["image_features"])
    assert_close(early["image_intermediates"][0], theirs["image_intermediates"][0])
    assert "image_features" not in early
    # stop_early without intermediates_only still returns the whole tower's features
    assert_close(late["image_features"], full_features)


@pytest.mark.parametrize("indices,match", [(4, "last 4 blocks of 3"), ([3], "block index 3"), (0, "last 0")])
def test_bad_indices_name_the_index(open_clip_pair, indices, match):
    _, model = open_clip_pair
    with pytest.raises(ValueError, match=match):
        model.forward_intermediates(text=token_rows(1), text_indices=indices)


def test_resnet_intermediates_are_a_clear_error():
    model = clip.CLIP(clip.get_config("RN-Tiny@32px"))
    with pytest.raises(ValueError, match="ResNet"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32))
