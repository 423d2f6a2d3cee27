"""SigLIP and SigLIP 2, natively: against transformers' SiglipModel and open_clip's timm-tower SigLIP, no download.

Each peer builds a tiny random model in the test (transformers from a SiglipConfig; open_clip from a model config
whose timm tower is a tiny timm ViT registered here), saves it in its own layout, and `clip.load` must give its
image features, text features and logits (bias included).  The registry's 25 OpenCLIP SigLIP architectures must
build on the meta device with open_clip's parameter names and shapes, and clip/data/siglip_archs.json must hold
the numbers timm builds today.  Downstream: squash preprocessing against Hugging Face's image processor and
open_clip's transform, zero-shot probabilities as per-label sigmoids, and the sigmoid loss (with the model's own
bias) by default when fine-tuning a SigLIP.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import clip
import clip.loading
from clip import siglip
from clip.config import CLIPConfig, TextConfig, VisionConfig, registry
from clip.model import CLIP

ROOT = Path(__file__).resolve().parent.parent
CONTEXT, VOCAB = 12, 320
# Two tiny timm SigLIP towers: exact GELU at a size that leaves a remainder (as SO400M/14 at 384 px), and the
# tanh approximation (as timm's newer towers).  MLP ratio as SO400M's (int(64 * 3.7362) = 239 hidden units).
TINY_TOWERS = {
    "vit_tiny_patch8_siglip_30_clipforge": dict(img_size=30, act_layer="gelu"),
    "vit_tiny_patch8_siglip_32_clipforge": dict(img_size=32, act_layer="gelu_tanh"),
}


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_siglip_archs", ROOT / "scripts" / "gen_siglip_archs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _register_tiny_timm_towers() -> None:
    from timm.models.vision_transformer import VisionTransformer

    for name, opts in TINY_TOWERS.items():
        if timm.is_model(name):
            continue

        def entry(pretrained: bool = False, _opts=opts, **kwargs) -> VisionTransformer:
            args = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=3.7362, class_token=False,
                        global_pool="map")  # fmt: skip
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's loader options
                kwargs.pop(key, None)
            return VisionTransformer(**{**args, **_opts, **kwargs})

        entry.__name__ = name
        timm.models.register_model(entry)


@pytest.fixture
def tiny_towers(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The tiny towers registered in timm, and their numbers (read by the generator) added to ours."""
    _register_tiny_timm_towers()
    facts = {name: _generator().tower_facts(name) for name in TINY_TOWERS}
    shipped = siglip.timm_towers()
    monkeypatch.setattr(siglip, "timm_towers", lambda: {**shipped, **facts})
    return facts


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial value (LayerNorm gains of 1 and zero biases test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _ids(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float noise: 1e-5 of the largest magnitude (deep perturbed towers reach |x| ~ 40)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


# ------------------------------------------------------------------------------------------ data and registry


def test_timm_tower_numbers_are_what_timm_builds():
    """Every tower in siglip_archs.json, re-read from the installed timm: the numbers are unchanged."""
    gen = _generator()
    for name, facts in siglip.timm_towers().items():
        assert gen.tower_facts(name) == facts, name
    for name, raw in siglip.open_clip_siglip_raw_configs().items():
        assert open_clip.get_model_config(name) == raw, name


def test_activation_facts_differ_by_peer():
    """timm's original SigLIP towers run exact GELU, its newer ones the tanh approximation; HF's run tanh."""
    towers = siglip.timm_towers()
    assert towers["vit_base_patch16_siglip_224"]["act"] == "gelu"
    assert towers["vit_so400m_patch14_siglip_384"]["act"] == "gelu"
    assert towers["vit_so400m_patch16_siglip_256"]["act"] == "gelu_tanh"
    assert towers["vit_base_patch32_siglip_256"]["act"] == "gelu_tanh"
    v2 = registry()["ViT-B-16-SigLIP2"]
    assert (v2.vision.gelu_approximate, v2.text.gelu_approximate) == ("none", "tanh")
    vision, text = transformers.SiglipVisionConfig(), transformers.SiglipTextConfig()
    for key, value in siglip.HF_VISION_DEFAULTS.items():
        assert getattr(vision, key) == value, key
    for key, value in siglip.HF_TEXT_DEFAULTS.items():
        assert key == "projection_size" or getattr(text, key) == value, key


SIGLIP_NAMES = list(siglip.open_clip_siglip_raw_configs())


def _acts(modules: list[torch.nn.Module]) -> set[str]:
    x = torch.linspace(-6, 6, 601)
    out = set()
    for act in modules:
        y = act(x)
        out.add(
            "exact"
            if torch.equal(y, F.gelu(x))
            else "tanh"
            if torch.equal(y, F.gelu(x, approximate="tanh"))
            else "?"
        )
    return out


@pytest.mark.parametrize("name", SIGLIP_NAMES)
def test_registry_siglip_builds_with_open_clip_names_and_shapes(name):
    """Each OpenCLIP SigLIP architecture: open_clip's tensors (converted), activations, eps and preprocessing."""
    cfg = registry()[name]
    with torch.device("meta"):
        mine = CLIP(cfg)
        ref = open_clip.create_model(name, device="meta")
    theirs = siglip.open_clip_siglip_to_ours(ref.state_dict())
    assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    trunk = ref.visual.trunk
    assert _acts([b.mlp.act for b in trunk.blocks] + [trunk.attn_pool.mlp.act]) == _acts(
        [b.mlp.gelu for b in mine.visual.transformer.resblocks] + [mine.visual.head.mlp.gelu]
    )
    assert _acts([b.mlp.gelu for b in ref.text.transformer.resblocks]) == _acts(
        [b.mlp.gelu for b in mine.transformer.resblocks]
    )
    eps = {m.eps for m in ref.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {m.eps for m in mine.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    assert ref.text.attn_mask is None and not cfg.text.causal and cfg.text.pool_type == "last"
    pre = open_clip.get_pretrained_cfg(name, open_clip.list_pretrained_tags_by_model(name)[0])
    assert (cfg.mean, cfg.std, cfg.interpolation, cfg.resize_mode) == (
        tuple(pre["mean"]),
        tuple(pre["std"]),
        pre["interpolation"],
        pre["resize_mode"],
    )
    assert cfg.sigmoid and CLIPConfig.from_json(cfg.to_json()) == cfg


def test_text_tower_without_projection_is_a_clear_error():
    raw = open_clip.get_model_config("ViT-SO400M-16-SigLIP-i18n-256")
    with pytest.raises(ValueError, match="without projection"):
        siglip.from_open_clip_siglip(raw)
    with pytest.raises(ValueError, match="unknown timm image tower 'vit_nope'"):
        siglip.vision_from_timm("vit_nope")


# ------------------------------------------------------------------------------------------- Hugging Face


def _hf_model(vision_act: str = "gelu_pytorch_tanh", text_act: str = "gelu_pytorch_tanh", size: int = 32,
              seed: int = 0) -> transformers.SiglipModel:  # fmt: skip
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CONTEXT, hidden_act=text_act,
                         projection_size=64, bos_token_id=None, eos_token_id=None),
        vision_config=dict(hidden_size=64, intermediate_size=239, num_hidden_layers=2, num_attention_heads=4,
                           image_size=size, patch_size=8, hidden_act=vision_act),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.SiglipModel(cfg).eval()
    _perturb(model, seed)
    return model


@pytest.mark.parametrize(
    "vision_act,text_act,size,shards",
    [("gelu_pytorch_tanh", "gelu_pytorch_tanh", 32, False),  # HF's SigLIP and fixed-resolution SigLIP 2
     ("gelu", "gelu_pytorch_tanh", 30, True)],  # exact GELU; a 30 px input leaves a remainder; sharded files
)  # fmt: skip
def test_hf_siglip_folder_matches_transformers(tmp_path, vision_act, text_act, size, shards):
    ref = _hf_model(vision_act, text_act, size)
    ref.save_pretrained(tmp_path, max_shard_size="40KB" if shards else "5GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == shards
    model, preprocess = clip.load(str(tmp_path), device="cpu")
    assert model.config.vision.gelu_approximate == ("tanh" if vision_act != "gelu" else "none")
    assert preprocess.resize_mode == "squash" and preprocess.mean == (0.5, 0.5, 0.5)
    image, ids = torch.randn(2, 3, size, size), _ids()
    with torch.no_grad():
        _close(model.encode_image(image), ref.get_image_features(pixel_values=image).pooler_output)
        _close(model.encode_text(ids), ref.get_text_features(input_ids=ids).pooler_output)
        out = ref(input_ids=ids, pixel_values=image)
        logits_per_image, logits_per_text = model(image, ids)
    _close(logits_per_image, out.logits_per_image)
    _close(logits_per_text, out.logits_per_text)
    assert model.logit_bias.item() == pytest.approx(ref.logit_bias.item())


def test_hf_naflex_siglip2_and_vision_only_folders_are_clear_errors(tmp_path):
    cfg = transformers.Siglip2Config(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=CONTEXT),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_patches=16, patch_size=8),
    )  # fmt: skip
    transformers.Siglip2Model(cfg).save_pretrained(tmp_path / "naflex")
    with pytest.raises(ValueError, match="NaFlex SigLIP 2.*not supported"):
        clip.load(str(tmp_path / "naflex"), device="cpu")
    _hf_model().vision_model.save_pretrained(tmp_path / "vision")
    with pytest.raises(ValueError, match="only whole SiglipModel folders"):
        clip.load(str(tmp_path / "vision"), device="cpu")


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(50, 37), (17, 64), (32, 32), (211, 120), (9, 9)]
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    return out + [Image.fromarray(rng.integers(0, 256, (40, 70), dtype=np.uint8))]  # "L"


@pytest.mark.parametrize("resample,interpolation", [(3, "bicubic"), (2, "bilinear")])
def test_squash_preprocess_matches_hf_image_processor(tmp_path, resample, interpolation):
    """preprocessor_config.json is read, and the transform equals SiglipImageProcessor's (PIL backend)."""
    _hf_model().save_pretrained(tmp_path)
    processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=resample)
    processor.save_pretrained(tmp_path)
    model, preprocess = clip.load(str(tmp_path), device="cpu")
    assert (model.config.interpolation, preprocess.interpolation) == (interpolation, interpolation)
    for img in _images():
        want = processor(images=img, return_tensors="pt").pixel_values[0]
        torch.testing.assert_close(preprocess(img), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "mode,interpolation", [("squash", "bicubic"), ("squash", "bilinear"), ("shortest", "bilinear")]
)
def test_preprocess_modes_match_open_clip_transform(mode, interpolation):
    ours = clip.image_transform(24, (0.5,) * 3, (0.5,) * 3, resize_mode=mode, interpolation=interpolation)
    ref = open_clip.image_transform(24, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode=mode,
                                    interpolation=interpolation)  # fmt: skip
    for img in _images():
        assert torch.equal(ours(img), ref(img))
    with pytest.raises(ValueError, match="resize_mode"):
        clip.image_transform(24, resize_mode="longest")
    with pytest.raises(ValueError, match="transforms lists openai/CLIP's steps"):
        ours.transforms  # noqa: B018 (a property: its steps would be another pipeline)


# ------------------------------------------------------------------------------------------------ open_clip


def _open_clip_cfg(tower: str) -> dict:
    v2 = tower.endswith("32_clipforge")  # SigLIP 2's text tower runs tanh GELU
    text = dict(context_length=CONTEXT, vocab_size=VOCAB, width=48, heads=4, layers=2, mlp_ratio=2.5,
                no_causal_mask=True, proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6},
                hf_tokenizer_name="tiny/siglip-tokenizer", tokenizer_kwargs={"clean": "canonicalize"})  # fmt: skip
    if v2:
        text["act_kwargs"] = {"approximate": "tanh"}
    size = TINY_TOWERS[tower]["img_size"]
    vision = dict(
        image_size=size, timm_model_name=tower, timm_model_pretrained=False, timm_pool="map", timm_proj="none"
    )
    return {
        "embed_dim": 64,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": vision,
        "text_cfg": text,
    }


def _open_clip_model(cfg: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    model = open_clip.model.CustomTextCLIP(**kwargs).eval()
    _perturb(model, seed)
    return model


def _hub_json(cfg: dict) -> dict:
    pre = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}
    return {"model_cfg": cfg, "preprocess_cfg": {"size": cfg["vision_cfg"]["image_size"], **pre}}


def _check_open_clip(model: CLIP, ref: torch.nn.Module, size: int) -> None:
    image, ids = torch.randn(2, 3, size, size), _ids(seed=1)
    with torch.no_grad():
        _close(model.encode_image(image), ref.encode_image(image))
        _close(model.encode_text(ids), ref.encode_text(ids))
        ref_logits = ref.get_logits(image, ids)
        ours = model(image, ids)
    _close(ours[0], ref_logits[0])
    _close(ours[1], ref_logits[1])


@pytest.mark.parametrize("tower", list(TINY_TOWERS))
@pytest.mark.parametrize("layout", ["beside", "hub_safetensors", "training_checkpoint"])
def test_open_clip_siglip_matches_open_clip(tmp_path, tiny_towers, tower, layout):
    cfg = _open_clip_cfg(tower)
    ref = _open_clip_model(cfg)
    sd = ref.state_dict()
    (tmp_path / "open_clip_config.json").write_text(json.dumps(_hub_json(cfg)))
    if layout == "beside":
        torch.save(sd, tmp_path / "model.pt")
        target = tmp_path / "model.pt"
    elif layout == "hub_safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "open_clip_model.safetensors"))
        target = tmp_path
    else:  # OpenCLIP's training checkpoint: DDP prefixes inside {"state_dict": ...}
        torch.save(
            {"epoch": 2, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "epoch_2.pt"
        )
        target = tmp_path / "epoch_2.pt"
    model, preprocess = clip.load(str(target), device="cpu")
    assert model.config.vision.gelu_approximate == ("tanh" if tower.endswith("32_clipforge") else "none")
    assert preprocess.resize_mode == "squash" and model.config.sigmoid
    _check_open_clip(model, ref, TINY_TOWERS[tower]["img_size"])


def test_bare_siglip_state_dict_needs_its_architecture(tmp_path):
    """Without open_clip_config.json the file does not say which SigLIP it is: a clear error, then arch=."""
    name = "ViT-B-16-SigLIP"
    with torch.device("meta"):
        ref = open_clip.create_model(name, device="meta")
    sd = {
        k: torch.zeros(v.shape) for k, v in ref.state_dict().items()
    }  # only the keys and shapes matter here
    torch.save(sd, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="SigLIP state dict that does not record its architecture.*arch="):
        clip.load(str(tmp_path / "bare.pt"), device="cpu")
    model, _ = clip.load(str(tmp_path / "bare.pt"), device="cpu", arch=name)
    assert model.config == registry()[name]


def test_real_size_timm_tower_matches_open_clip():
    """One shipped tower at full size (timm's B/32 SigLIP 2 at 256 px), from the table, no monkeypatching."""
    cfg = dict(open_clip.get_model_config("ViT-B-32-SigLIP2-256"))
    cfg["text_cfg"] = dict(
        _open_clip_cfg("vit_tiny_patch8_siglip_32_clipforge")["text_cfg"], width=32, heads=2
    )
    ref = _open_clip_model(cfg)
    ours = clip.loading.model_from_state_dict(siglip.from_open_clip_siglip(cfg),
                                              siglip.open_clip_siglip_to_ours(ref.state_dict()))  # fmt: skip
    _check_open_clip(ours, ref, 256)


def _t5_tokenizer(folder: Path) -> None:
    """A tiny SigLIP-style tokenizer.json (Unigram, `$A </s>`, pad = eos = `</s>`) with its side files."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    texts = ["a photo of a dog", "a photo of a cat", "two people on the beach", "a red car", "snake case"] * 5
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                                          unk_token="<unk>"))  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0})
    )
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "</s>",
                                                                "unk_token": "<unk>"}))  # fmt: skip


def test_get_tokenizer_is_the_hub_folders_and_features_match(tmp_path, tiny_towers):
    from clip.hf_tokenizer import HFTokenizer

    cfg = _open_clip_cfg("vit_tiny_patch8_siglip_32_clipforge")
    ref = _open_clip_model(cfg)
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()},
        str(tmp_path / "open_clip_model.safetensors"),
    )
    (tmp_path / "open_clip_config.json").write_text(json.dumps(_hub_json(cfg)))
    _t5_tokenizer(tmp_path)
    model, _ = clip.load(str(tmp_path), device="cpu")
    tok = clip.get_tokenizer(model)
    assert isinstance(tok, HFTokenizer) and tok.context_length == CONTEXT
    ref_tok = open_clip.tokenizer.HFTokenizer(str(tmp_path), context_length=CONTEXT, clean="canonicalize")
    texts = ["A photo of a DOG!", "two_people, on the beach.", "", "a red car " * 9]
    ids = tok(texts)
    assert torch.equal(ids, ref_tok(texts))
    with torch.no_grad():
        _close(model.encode_text(ids), ref.encode_text(ref_tok(texts)))


# ------------------------------------------------------------------------------------------------ downstream


def _tiny_sigmoid_clip(seed: int = 0) -> CLIP:
    """A SigLIP-shaped CLIP with OpenAI's vocabulary, so `clip.tokenize` ids fit it."""
    cfg = CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, width=32, layers=1, heads=2, patch_size=8, no_ln_pre=True,
                            pool_type="map", class_token=False, patch_bias=True, proj=False, norm_eps=1e-6),
        text=TextConfig(context_length=16, width=32, heads=2, layers=1, pool_type="last", no_causal_mask=True,
                        proj_bias=True, norm_eps=1e-6),
        quick_gelu=False, logit_bias=True, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIP(cfg).eval()
    _perturb(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(7.0))
        model.logit_bias.fill_(-1.5)
    return model


def test_zero_shot_probabilities_are_per_label_sigmoids(tmp_path, capsys):
    from clip.cli import main as cli_main
    from clip.loading import save_model

    model = _tiny_sigmoid_clip()
    save_model(model, tmp_path / "siglip.pt")
    rng = np.random.default_rng(3)
    paths = []
    for i, (w, h) in enumerate([(40, 30), (32, 32), (25, 60)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    labels = ["a dog", "a cat", "a diagram"]
    assert cli_main(["classify", *paths, "--labels", ",".join(labels), "--model", str(tmp_path / "siglip.pt"),
                     "--json", "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    got = torch.tensor([[{p["label"]: p["probability"] for p in r["predictions"]}[x] for x in labels]
                        for r in out["results"]])  # fmt: skip
    _, preprocess = clip.load(str(tmp_path / "siglip.pt"), device="cpu")
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]))
        text = model.encode_text(clip.tokenize(labels, context_length=16))
        want = torch.sigmoid(model.logits(image, text))  # SigLIP's probabilities: each label on its own
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert not torch.allclose(got.sum(dim=1), torch.ones(3), atol=1e-3)  # not a softmax


def test_zero_shot_classifier_keeps_siglip_padding():
    """The bidirectional text tower sees its padding: zero-shot weights use the full context, not a cut."""
    model = _tiny_sigmoid_clip()
    weights = clip.zero_shot_classifier(model, ["dog", "cat"], ["a photo of a {}."])
    with torch.no_grad():
        full = F.normalize(
            model.encode_text(clip.tokenize(["a photo of a dog.", "a photo of a cat."], 16)), dim=-1
        )
    _close(weights, full.t())


def test_fine_tuning_a_siglip_uses_the_sigmoid_loss_and_its_own_bias(tmp_path):
    from clip.train import DataConfig, ModelSpec, OptimConfig, RunConfig, TrainConfig, train
    from clip.train.step import ContrastiveModel

    model = _tiny_sigmoid_clip()
    assert ContrastiveModel(model, "siglip").logit_bias is model.logit_bias
    g = torch.Generator().manual_seed(0)
    ids = clip.tokenize([f"picture {i}" for i in range(8)], context_length=16)
    data = [(torch.randn(3, 32, 32, generator=g), ids[i]) for i in range(8)]
    cfg = TrainConfig(
        data=DataConfig(batch_size=4, workers=0), model=ModelSpec(name=None, pretrained="siglip.pt"),
        optim=OptimConfig(lr=1e-2, warmup=1),
        run=RunConfig(output_dir=str(tmp_path / "run"), steps=2, save_every=100, log_every=1, progress=False),
    )  # fmt: skip
    assert cfg.optim.loss is None  # the model's own
    result = train(cfg, model=model, dataset=data)
    written = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert written["optim"]["loss"] == "siglip"
    saved = torch.load(result.checkpoint, weights_only=True)
    assert saved["state_dict"]["logit_bias"].item() != -1.5  # the pretrained bias is the one trained
    assert torch.equal(saved["state_dict"]["logit_bias"], saved["loss_state"]["logit_bias"])
    other = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(tmp_path / "clip")))
    train(
        other,
        model=CLIP(registry()["ViT-Tiny/8@32px"]),
        dataset=[(x, clip.tokenize("a", 32)[0]) for x, _ in data],
    )
    assert json.loads((tmp_path / "clip" / "config.json").read_text())["train"]["optim"]["loss"] == "clip"
