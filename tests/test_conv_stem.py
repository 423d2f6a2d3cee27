"""The ViT's optional convolutional stem (VisionConfig.conv_stem): config, module, save/load, export refusal."""

from __future__ import annotations

import pytest
import torch

import clip
from clip.config import CLIPConfig, TextConfig, VisionConfig
from clip.convert import config_to_hf_config
from clip.loading import save_model
from clip.model import CLIP
from clip.model.vision import ConvStem

TINY = CLIPConfig(
    embed_dim=16,
    vision=VisionConfig(image_size=16, width=32, layers=1, heads=2, patch_size=4, conv_stem=(8, 16)),
    text=TextConfig(context_length=8, vocab_size=49408, width=32, heads=2, layers=1),
)


def test_config_round_trips_and_is_checked():
    assert CLIPConfig.from_dict(TINY.to_dict()) == TINY
    assert CLIPConfig.from_json(TINY.to_json()).vision.conv_stem == (8, 16)
    with pytest.raises(ValueError, match="patch_size is 2 \\*\\* 3"):
        VisionConfig(image_size=16, width=32, layers=1, heads=2, patch_size=4, conv_stem=(8, 16, 32))
    with pytest.raises(ValueError, match="conv_stem width"):
        VisionConfig(image_size=16, width=32, layers=1, heads=2, patch_size=4, conv_stem=(8, 0))
    with pytest.raises(ValueError, match="ViT"):
        VisionConfig(kind="resnet", image_size=64, width=8, layers=(1, 1, 1, 1), heads=2, conv_stem=(8,))


def test_stem_is_stride_two_convs_then_a_projection():
    """Restated with torch.nn: conv3x3/2 + GELU per halving, then a 1x1 conv to the width."""
    torch.manual_seed(0)
    model = CLIP(TINY).eval()
    stem = model.visual.conv1
    assert isinstance(stem, ConvStem) and model.dtype == torch.float32
    x = torch.randn(2, 3, 16, 16)
    c1, c2 = stem.body[0], stem.body[2]
    ref = torch.nn.functional.conv2d(x, c1.weight, c1.bias, stride=2, padding=1)
    ref = torch.nn.functional.conv2d(torch.nn.functional.gelu(ref), c2.weight, c2.bias, stride=2, padding=1)
    ref = torch.nn.functional.conv2d(torch.nn.functional.gelu(ref), stem.proj.weight)
    torch.testing.assert_close(stem(x), ref)
    assert stem(x).shape == (2, 32, 4, 4)
    assert model.encode_image(x).shape == (2, 16)


def test_save_load_and_hf_export_refusal(tmp_path):
    torch.manual_seed(1)
    model = CLIP(TINY).eval()
    save_model(model, tmp_path / "m.safetensors")
    back, _ = clip.load(str(tmp_path / "m.safetensors"), device="cpu")
    x = torch.randn(1, 3, 16, 16)
    assert back.config.vision.conv_stem == (8, 16)
    torch.testing.assert_close(back.float().encode_image(x), model.encode_image(x))
    with pytest.raises(ValueError, match="no convolutional stem"):
        config_to_hf_config(TINY)
