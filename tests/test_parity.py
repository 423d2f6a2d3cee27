"""Exactness against the peers: open_clip and Hugging Face transformers, random weights, no downloads."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import transformers

import clip
from clip.config import registry
from clip.loading import read_checkpoint, save_hf_folder, save_model

OPEN_CLIP_NAMES = {
    "RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16", "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336",
}  # fmt: skip


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tokens(n: int, context: int = 77, vocab: int = 49408, seed: int = 0) -> torch.Tensor:
    """Random token rows shaped like tokenizer output: start token, body, end token, zero padding."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, context, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, context - 2, (1,), generator=g))
        out[i, 0] = vocab - 2
        out[i, 1 : 1 + length] = torch.randint(1, vocab - 2, (length,), generator=g)
        out[i, 1 + length] = vocab - 1
    return out


@pytest.mark.parametrize("ours", list(OPEN_CLIP_NAMES))
def test_registry_shapes_equal_open_clip(ours):
    """All nine OpenAI architectures have exactly open_clip's state-dict keys and shapes."""
    with torch.device("meta"):
        mine = clip.CLIP(registry()[ours]).state_dict()
    theirs = open_clip.create_model(OPEN_CLIP_NAMES[ours], device="meta").state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize(
    "ours,theirs,wrap",
    [("ViT-B/32", "ViT-B-32-quickgelu", False), ("ViT-B/16", "ViT-B-16-quickgelu", True),
     ("RN50", "RN50-quickgelu", True), ("RN50x4", "RN50x4-quickgelu", False)],
)  # fmt: skip
def test_open_clip_state_dict_loads_and_matches(tmp_path, ours, theirs, wrap):
    torch.manual_seed(0)
    ref = open_clip.create_model(theirs).eval()
    sd = ref.state_dict()
    if wrap:  # an OpenCLIP training checkpoint: DDP prefixes inside {"state_dict": ...}
        sd = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}
    torch.save(sd, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="quick_gelu=True or False"):  # shapes cannot tell the activation
        clip.load(str(tmp_path / "ckpt.pt"), device="cpu")
    model, preprocess = clip.load(str(tmp_path / "ckpt.pt"), device="cpu", quick_gelu=True)
    assert model.config.vision.kind == registry()[ours].vision.kind
    assert model.config == registry()[ours]
    size = model.visual.input_resolution
    image = torch.randn(2, 3, size, size)
    text = tokens(3)
    with torch.no_grad():
        ref_img, ref_txt = ref.encode_image(image), ref.encode_text(text)
        assert rel_err(model.encode_image(image), ref_img) < 1e-5
        assert rel_err(model.encode_text(text), ref_txt) < 1e-5
        ours_logits, ours_t = model(image, text)
        normalize = torch.nn.functional.normalize
        ref_logits = ref.logit_scale.exp() * normalize(ref_img, dim=-1) @ normalize(ref_txt, dim=-1).t()
    assert rel_err(ours_logits, ref_logits) < 1e-5
    assert torch.equal(ours_t, ours_logits.t())


def tiny_hf_config(act: str = "quick_gelu") -> transformers.CLIPConfig:
    text = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=48,
                bos_token_id=49406, eos_token_id=49407)  # fmt: skip
    vision = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3,
                  image_size=64, patch_size=16, hidden_act=act, projection_dim=48)  # fmt: skip
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=48)


def hf_features(hf: transformers.CLIPModel, image: torch.Tensor, text: torch.Tensor):
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=image)
        txt = hf.get_text_features(input_ids=text)
    # transformers 5.x returns a ModelOutput whose pooler_output holds the projected features
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return img, txt


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hugging_face_folder_loads_and_matches(tmp_path, act):
    torch.manual_seed(0)
    hf = transformers.CLIPModel(tiny_hf_config(act)).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, _ = clip.load(str(tmp_path / "hf"), device="cpu")
    assert model.config.quick_gelu == (act == "quick_gelu")
    image, text = torch.randn(2, 3, 64, 64), tokens(3)
    ref_img, ref_txt = hf_features(hf, image, text)
    with torch.no_grad():
        assert rel_err(model.encode_image(image), ref_img) < 1e-5
        assert rel_err(model.encode_text(text), ref_txt) < 1e-5
        assert torch.allclose(model.logit_scale, hf.logit_scale)


def test_ours_to_hf_to_ours_is_bit_exact_and_hf_reads_it(tmp_path, tiny_model):
    cfg = tiny_model.config
    sd = tiny_model.state_dict()
    save_hf_folder(cfg, sd, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "clip"
    cfg2, sd2 = read_checkpoint(tmp_path / "hf")
    assert cfg2 == cfg
    assert sd2.keys() == sd.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    image, text = torch.randn(2, 3, 32, 32), tokens(2, context=32)
    ref_img, ref_txt = hf_features(hf, image, text)
    with torch.no_grad():
        assert rel_err(tiny_model.encode_image(image), ref_img) < 1e-5
        assert rel_err(tiny_model.encode_text(text), ref_txt) < 1e-5


def test_resnet_to_hf_is_a_clear_error(tmp_path):
    model = clip.CLIP(registry()["RN-Tiny@32px"])
    with pytest.raises(ValueError, match="ResNet"):
        save_hf_folder(model.config, model.state_dict(), tmp_path / "hf")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_own_checkpoint_round_trip(tmp_path, tiny_model, suffix):
    path = tmp_path / f"m{suffix}"
    save_model(tiny_model, path)
    cfg, sd = read_checkpoint(path)
    assert cfg == tiny_model.config
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temporary file"
