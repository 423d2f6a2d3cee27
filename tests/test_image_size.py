"""Other image sizes: a 224-px model run at 336 (and smaller, and non-square) equals the peers.

Run time (`interpolate_pos_encoding=True`) follows Hugging Face's `interpolate_pos_encoding=True`; load time
(`clip.load(..., image_size=N)`) follows open_clip's `force_image_size=N`, whose resize antialiases: the two
agree when enlarging and differ when shrinking, and each is matched where it is the reference.
"""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import transformers
from PIL import Image
from torch.testing import assert_close

import clip
from clip.model import interpolate_positions


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A tiny 224-px HF CLIPModel (patch 16: a 14x14 grid) and our model read from its folder."""
    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=32)  # fmt: skip
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  image_size=224, patch_size=16, projection_dim=32)  # fmt: skip
    hf = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    folder = tmp_path_factory.mktemp("hf224")
    hf.eval().save_pretrained(folder)
    model, _ = clip.load(str(folder), device="cpu")
    return hf, model, folder


@pytest.mark.parametrize("size", [(336, 336), (160, 160), (336, 224), (224, 224)])
def test_run_time_interpolation_equals_hugging_face(hf_pair, size):
    hf, model, _ = hf_pair
    torch.manual_seed(1)
    image = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=image, interpolate_pos_encoding=True).pooler_output
        hs = hf.vision_model(pixel_values=image, interpolate_pos_encoding=True, output_hidden_states=True)
        ours = model.encode_image(image, interpolate_pos_encoding=True)
        inter = model.visual.forward_intermediates(
            image, output_fmt="NLC", output_extra_tokens=True, interpolate_pos_encoding=True
        )
    assert_close(ours, ref)
    assert_close(inter["image_embeddings"], hs.hidden_states[0])
    last = torch.cat([inter["image_intermediates_prefix"][-1], inter["image_intermediates"][-1]], 1)
    assert_close(last, hs.hidden_states[-1])


def test_other_size_without_interpolation_is_refused_even_with_the_same_patch_count(hf_pair):
    _, model, _ = hf_pair
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model.encode_image(torch.randn(1, 3, 336, 336))
    # 7x28 patches are as many as 14x14: still another grid, so still refused (not silently misplaced)
    with pytest.raises(ValueError, match="112x448 pixels"):
        model.encode_image(torch.randn(1, 3, 112, 448))


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory):
    """A tiny 224-px OpenCLIP model in OpenCLIP's Hub layout (config + weights), read by both libraries."""
    model_cfg = {
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }  # fmt: skip
    torch.manual_seed(0)
    ref = open_clip.CLIP(
        embed_dim=32, vision_cfg=model_cfg["vision_cfg"], text_cfg=model_cfg["text_cfg"], quick_gelu=True
    )
    folder = tmp_path_factory.mktemp("oc224")
    torch.save(ref.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return folder


@pytest.mark.parametrize("size", [336, 160])
def test_load_time_resize_equals_open_clip_force_image_size(open_clip_folder, size):
    ref, _, ref_pre = open_clip.create_model_and_transforms(
        f"local-dir:{open_clip_folder}", force_image_size=size
    )
    model, preprocess = clip.load(str(open_clip_folder), device="cpu", image_size=size)
    assert model.visual.input_resolution == size and model.config.vision.image_size == size
    pos = model.visual.positional_embedding
    assert pos.shape == ((size // 16) ** 2 + 1, 64)
    assert_close(pos, ref.eval().visual.positional_embedding)
    # the preprocess follows the size: same pixels as open_clip's (torchvision) transform at that size
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8))
    pixels = preprocess(img)
    assert pixels.shape == (3, size, size)
    assert_close(pixels, ref_pre(img))
    image = pixels.unsqueeze(0)
    with torch.no_grad():
        assert_close(model.encode_image(image), ref.encode_image(image))


def test_load_time_and_run_time_differ_even_when_enlarging(hf_pair):
    """PyTorch's antialiased bicubic uses the a=-0.5 cubic kernel (Pillow's), the plain one a=-0.75, so
    open_clip's resize differs from HF's for every new size, enlarging included (~7% of the largest value)."""
    _, model, folder = hf_pair
    pos = model.visual.positional_embedding.detach()
    for size in (336, 160):
        grid = (size // 16,) * 2
        loaded, _ = clip.load(str(folder), device="cpu", image_size=size)
        run_time = interpolate_positions(pos, 1, grid)
        assert_close(loaded.visual.positional_embedding, interpolate_positions(pos, 1, grid, antialias=True))
        gap = (loaded.visual.positional_embedding - run_time).abs().max() / pos.abs().max()
        assert gap > 0.03, (size, gap)
    same = interpolate_positions(pos, 1, (14, 14), antialias=True)
    assert torch.equal(same, pos)  # the model's own size is never resampled


def test_image_size_errors_name_the_fix(hf_pair, tmp_path):
    _, _, folder = hf_pair
    with pytest.raises(ValueError, match="not a multiple of patch_size 16"):
        clip.load(str(folder), device="cpu", image_size=330)
    rn = clip.CLIP(clip.get_config("RN-Tiny@32px"))
    from clip.loading import save_model

    save_model(rn, tmp_path / "rn.pt")
    with pytest.raises(ValueError, match="ViT models only"):
        clip.load(str(tmp_path / "rn.pt"), device="cpu", image_size=64)
