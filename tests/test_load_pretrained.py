"""`clip.load` with OpenCLIP pretrained tags and `clip.get_tokenizer`, through a local mirror (no download)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import save
from test_hf_tokenizer import bert_folder
from test_hub import Server, server  # noqa: F401  (the 127.0.0.1 mirror fixture)

import clip
import clip.pretrained
from clip import hub
from clip.config import get_config
from clip.model import CLIP
from clip.pretrained import HubFile, PreprocessCfg, PretrainedCfg

ARCH = "ViT-Tiny/8@32px"


@pytest.fixture
def tag(server: Server, monkeypatch: pytest.MonkeyPatch) -> tuple[PretrainedCfg, CLIP]:  # noqa: F811
    """A pretrained tag for the tiny architecture whose weights the mirror serves in OpenCLIP's Hub layout."""
    torch.manual_seed(0)
    model = CLIP(get_config(ARCH).replace(quick_gelu=False)).eval()
    server.serve_hf("org/tiny", "open_clip_model.safetensors", save(dict(model.state_dict())))
    pre = PreprocessCfg(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    entry = PretrainedCfg(ARCH, "test", HubFile("org/tiny", "open_clip_model.safetensors"), None, True, pre)
    lookup = {(ARCH, "test"): entry}
    monkeypatch.setattr(clip.pretrained, "get_pretrained_cfg", lambda a, t: lookup[(a, t)])
    monkeypatch.setattr(hub, "get_pretrained_cfg", lambda a, t: lookup[(a, t)])
    return entry, model


def test_load_with_a_pretrained_tag(tag, tmp_path):
    entry, ref = tag
    image, text = torch.randn(2, 3, 32, 32), clip.tokenize(["a cat", "a dog"], context_length=32)
    for spelling in ({"name": ARCH, "pretrained": "test"}, {"name": f"{ARCH}/test"}):
        model, preprocess = clip.load(**spelling, device="cpu", download_root=str(tmp_path))
        assert model.config.quick_gelu  # the tag says its weights were trained with QuickGELU
        assert preprocess.mean == (0.5, 0.5, 0.5) and preprocess.std == (0.25, 0.25, 0.25)
        ref_q = CLIP(ref.config.replace(quick_gelu=True)).eval()
        ref_q.load_state_dict(ref.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(image), ref_q.encode_image(image))
            torch.testing.assert_close(model.encode_text(text), ref_q.encode_text(text))


def test_architecture_name_without_weights_says_what_to_pass():
    with pytest.raises(ValueError, match="pretrained=TAG"):
        clip.load("ViT-H-14", device="cpu")
    with pytest.raises(ValueError, match="no pretrained tag"):
        clip.load("ViT-B-32", pretrained="no-such-tag", device="cpu")


def test_get_tokenizer_openai_and_hf(tmp_path):
    model = CLIP(get_config(ARCH))
    tok = clip.get_tokenizer(model)
    assert torch.equal(
        tok(["a photo of a cat"]), clip.tokenize(["a photo of a cat"], context_length=32).long()
    )
    # A model whose config names an HF tokenizer reads the tokenizer.json that came with its weights.
    folder = bert_folder(tmp_path)
    cfg = get_config(ARCH).replace(
        text={"hf_tokenizer_name": "bert-base-uncased", "tokenizer_kwargs": {"strip_sep_token": True}}
    )
    model = CLIP(cfg)
    model.tokenizer_dir = folder
    ids = clip.get_tokenizer(model)(["A photo of a cat!", "dog"])
    ref = open_clip.tokenizer.HFTokenizer(str(folder), context_length=32, strip_sep_token=True)
    assert ids.shape == (2, 32) and torch.equal(ids, ref(["A photo of a cat!", "dog"]))
