"""SigLIP and SigLIP 2 as this library's CLIP: named configs, and pure converters from the two peer layouts.

SigLIP (Zhai et al., 2023) and SigLIP 2 (Tschannen et al., 2025; its fixed-resolution models) are a CLIP
whose image tower has no class token, a biased patch conv, no LayerNorm before the blocks and a MAP
attention-pool head instead of the class token and projection; whose text tower is bidirectional, pooled
at the last position and projected by a biased linear layer; and whose logits carry a learned bias and go
through a sigmoid.  `clip.model.CLIP` builds all of it from a `CLIPConfig` (no timm, no transformers).

Two peers publish the weights, each converted here by a pure function and checked against it in tests:

* OpenCLIP (`ViT-*-SigLIP*` configs, `timm/ViT-*-SigLIP*` Hub repos): a timm image tower (`visual.trunk.*`)
  plus OpenCLIP's own text tower (`text.*`).  The config names the timm tower (`timm_model_name`); its
  numbers (width, depth, heads, patch, image size, MLP width, activation, eps) come from
  `clip/data/siglip_archs.json`, read from timm itself by `scripts/gen_siglip_archs.py`.
* Hugging Face (`SiglipModel` folders, `model_type` "siglip"; SigLIP 2's fixed-resolution checkpoints are
  such folders too).  NaFlex SigLIP 2 (`Siglip2Model`, a linear patch embedding over variable grids) is
  refused with a clear message.

Activations follow each peer exactly, and they differ: Hugging Face configs run GELU's tanh approximation
(`gelu_pytorch_tanh`, as big_vision trained them), while timm builds the original SigLIP towers
(B/16, L/16 at 256/384, SO400M/14) with exact GELU and the newer ones (B/32, L/16-512, SO400M/16, gopt)
with the tanh approximation; OpenCLIP's SigLIP 2 text towers use tanh, its SigLIP 1 text towers exact GELU.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clip.config import CLIPConfig, VisionConfig
from clip.convert import StateDict

if TYPE_CHECKING:
    from clip.formats import Reading

DATA_FILE = "siglip_archs.json"
# OpenCLIP's preprocessing for SigLIP (its `_slpcfg`): mean = std = 0.5, bicubic, resize to a square.
SIGLIP_PREPROCESS: dict[str, Any] = {
    "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "resize_mode": "squash",
}  # fmt: skip
_TIMM_ACTS = {"gelu": "none", "gelu_tanh": "tanh"}
_HF_ACTS = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}
_HF_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor_config.json stores them
# transformers 5.x `SiglipVisionConfig` / `SiglipTextConfig` defaults: save_pretrained leaves defaults out.
HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "vision_use_head": True,
}  # fmt: skip
HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "projection_size": None,
}  # fmt: skip
# OpenCLIP config keys a SigLIP config may carry (timm_drop*: dropout, training only).
_OPEN_CLIP_VISION_KEYS = {"image_size", "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj",
                          "timm_drop", "timm_drop_path"}  # fmt: skip
_OPEN_CLIP_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "custom_text", "quick_gelu", "init_logit_bias",
                       "init_logit_scale"}  # fmt: skip


# ------------------------------------------------------------------------------------------------- configs


@cache
def _data() -> dict[str, Any]:
    text = resources.files("clip.data").joinpath(DATA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def timm_towers() -> dict[str, dict[str, Any]]:
    """timm model name -> its numbers (image_size, patch_size, width, layers, heads, mlp_hidden, act, norm_eps)."""
    return dict(_data()["timm_towers"])


def open_clip_siglip_raw_configs() -> dict[str, dict[str, Any]]:
    """OpenCLIP's `ViT-*-SigLIP*` model configs, as shipped in clip/data/siglip_archs.json."""
    return dict(_data()["configs"])


def siglip_configs() -> dict[str, CLIPConfig]:
    """name -> config for every OpenCLIP SigLIP / SigLIP 2 architecture, with OpenCLIP's preprocessing."""
    from clip.registry import apply_preprocess_cfg

    data = _data()
    return {
        name: apply_preprocess_cfg(from_open_clip_siglip(raw), data["preprocess"][name])
        for name, raw in data["configs"].items()
    }


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio r with int(width * r) == hidden (the rule timm, OpenCLIP and this library build MLPs by)."""
    r = hidden / width
    while int(width * r) < hidden:  # hidden / width * width can round to just below hidden
        r = math.nextafter(r, math.inf)
    if int(width * r) != hidden:
        raise ValueError(f"no MLP ratio gives {hidden} hidden units at width {width}")
    return r


def vision_from_timm(name: str, towers: Mapping[str, dict[str, Any]] | None = None) -> VisionConfig:
    """The ViT config of the timm SigLIP tower `name` (numbers from `timm_towers()`)."""
    towers = timm_towers() if towers is None else towers
    if name not in towers:
        raise ValueError(
            f"unknown timm image tower {name!r}; the SigLIP towers this library builds: {', '.join(sorted(towers))}"
        )
    f = towers[name]
    return VisionConfig(
        kind="vit", image_size=f["image_size"], width=f["width"], layers=f["layers"], heads=f["heads"],
        patch_size=f["patch_size"], mlp_ratio=_mlp_ratio(f["width"], f["mlp_hidden"]), no_ln_pre=True,
        pool_type="map", class_token=False, patch_bias=True, proj=False, norm_eps=f["norm_eps"],
        gelu_approximate=_TIMM_ACTS[f["act"]],
    )  # fmt: skip


def from_open_clip_siglip(
    cfg: Mapping[str, Any], quick_gelu: bool | None = None, towers: Mapping[str, dict] | None = None
) -> CLIPConfig:
    """An OpenCLIP SigLIP model config (timm image tower + OpenCLIP text tower) -> CLIPConfig.

    The image tower's numbers come from `towers` (default: the shipped table); the text tower's from
    `text_cfg` (OpenCLIP's names); preprocessing is OpenCLIP's SigLIP default (a Hub
    `open_clip_config.json`'s `preprocess_cfg` is applied on top by `clip.registry.from_open_clip_hub`).
    """
    from clip.registry import _text_from_open_clip  # one home for OpenCLIP's text options

    v, t = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    if quick_gelu or cfg.get("quick_gelu"):
        raise ValueError("SigLIP towers run GELU, not QuickGELU; drop quick_gelu")
    if "hf_model_name" in t:
        raise ValueError(
            "this OpenCLIP SigLIP config has a Hugging Face text tower (hf_model_name), not supported"
        )
    unknown = sorted(set(v) - _OPEN_CLIP_VISION_KEYS) + sorted(set(cfg) - _OPEN_CLIP_TOP_KEYS)
    if unknown:
        raise ValueError(f"unsupported OpenCLIP SigLIP config key(s) {unknown}")
    if v.get("timm_pool", "map") != "map" or v.get("timm_proj", "none") != "none":
        raise ValueError(
            f"timm tower with timm_pool={v.get('timm_pool')!r}, timm_proj={v.get('timm_proj')!r}: only SigLIP's "
            "'map' pooling without projection is supported"
        )
    if t.pop("proj_type", "linear") != "linear":
        raise ValueError("a SigLIP text tower without projection (proj_type 'none') is not supported")
    vision = vision_from_timm(v["timm_model_name"], towers)
    if v.get("image_size", vision.image_size) != vision.image_size:
        raise ValueError(
            f"image_size {v['image_size']} differs from timm tower {v['timm_model_name']}'s {vision.image_size}"
        )
    return CLIPConfig(
        embed_dim=cfg["embed_dim"], vision=vision, text=_text_from_open_clip(t), quick_gelu=False,
        logit_bias=True, **SIGLIP_PREPROCESS,
    )  # fmt: skip


def _hf_act(act: str, where: str) -> str:
    if act not in _HF_ACTS:
        raise ValueError(f"{where} hidden_act {act!r} is not supported; expected one of {sorted(_HF_ACTS)}")
    return _HF_ACTS[act]


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{what} {value!r} is not square; only square inputs are supported")
        value = value[0]
    return value


def hf_siglip_config_to_config(
    hf: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None, tokenizer_name: str | None = None
) -> CLIPConfig:
    """A Hugging Face `SiglipModel` config.json (+ its preprocessor_config.json, if any) -> CLIPConfig."""
    model_type = hf.get("model_type")
    if model_type == "siglip2":
        raise ValueError(
            "a NaFlex SigLIP 2 checkpoint (Siglip2Model, variable resolution) is not supported; SigLIP 2's "
            "fixed-resolution checkpoints (google/siglip2-*-patchNN-RES) are SiglipModel folders and load"
        )
    if model_type != "siglip":
        raise ValueError(
            f"config.json has model_type {model_type!r}: only whole SiglipModel folders (model_type 'siglip', "
            "both towers) load"
        )
    v = {**HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    t = {**HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    if not v["vision_use_head"] or v["num_channels"] != 3:
        raise ValueError(
            "only SigLIP vision towers with the attention-pool head and 3 channels are supported"
        )
    width, tw = v["hidden_size"], t["hidden_size"]
    vision = VisionConfig(
        kind="vit", image_size=_square(v["image_size"], "vision image_size"), width=width,
        layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
        patch_size=_square(v["patch_size"], "vision patch_size"),
        mlp_ratio=_mlp_ratio(width, v["intermediate_size"]), no_ln_pre=True, pool_type="map", class_token=False,
        patch_bias=True, proj=False, norm_eps=v["layer_norm_eps"], gelu_approximate=_hf_act(v["hidden_act"], "vision"),
    )  # fmt: skip
    projection = t["projection_size"] or tw
    if projection != width:
        raise ValueError(f"text projection_size {projection} differs from the vision hidden_size {width}")
    from clip.config import TextConfig

    text = TextConfig(
        context_length=t["max_position_embeddings"], vocab_size=t["vocab_size"], width=tw,
        heads=t["num_attention_heads"], layers=t["num_hidden_layers"], mlp_ratio=_mlp_ratio(tw, t["intermediate_size"]),
        pool_type="last", no_causal_mask=True, proj_bias=True, norm_eps=t["layer_norm_eps"],
        gelu_approximate=_hf_act(t["hidden_act"], "text"), hf_tokenizer_name=tokenizer_name,
    )  # fmt: skip
    pre = _hf_preprocess(preprocessor or {}, vision.image_size)
    return CLIPConfig(embed_dim=width, vision=vision, text=text, quick_gelu=False, logit_bias=True, **pre)


def _hf_preprocess(pre: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """SiglipImageProcessor's settings -> mean, std, interpolation, resize_mode (its defaults where absent)."""
    out = dict(SIGLIP_PREPROCESS)
    if "image_mean" in pre:
        out["mean"] = tuple(pre["image_mean"])
    if "image_std" in pre:
        out["std"] = tuple(pre["image_std"])
    resample = pre.get("resample", 3)
    if resample not in _HF_RESAMPLE:
        raise ValueError(f"preprocessor_config.json resample={resample!r}: only 2 (bilinear) and 3 (bicubic)")
    out["interpolation"] = _HF_RESAMPLE[resample]
    size = pre.get("size") or {"height": image_size, "width": image_size}
    if pre.get("do_resize", True) is False or size != {"height": image_size, "width": image_size}:
        raise ValueError(
            f"preprocessor_config.json resizes to {size} (do_resize={pre.get('do_resize', True)}); "
            f"SigLIP needs a resize to {image_size}x{image_size}"
        )
    if (
        pre.get("do_center_crop")
        or pre.get("do_rescale", True) is False
        or pre.get("do_normalize", True) is False
    ):
        raise ValueError(
            "preprocessor_config.json: only SigLIP's resize, rescale and normalize steps are supported"
        )
    return out


# --------------------------------------------------------------------------------------------- state dicts

# Block key suffixes, peer -> ours (attention input projections are handled apart).
_TIMM_BLOCK = {
    "norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias", "norm2.weight": "ln_2.weight",
    "norm2.bias": "ln_2.bias", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj.weight": "attn.out_proj.weight", "attn.proj.bias": "attn.out_proj.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias", "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}  # fmt: skip
_TIMM_TOP = {
    "patch_embed.proj.weight": "visual.conv1.weight", "patch_embed.proj.bias": "visual.conv1.bias",
    "norm.weight": "visual.ln_post.weight", "norm.bias": "visual.ln_post.bias",
    "attn_pool.latent": "visual.head.probe", "attn_pool.proj.weight": "visual.head.attn.out_proj.weight",
    "attn_pool.proj.bias": "visual.head.attn.out_proj.bias", "attn_pool.norm.weight": "visual.head.ln.weight",
    "attn_pool.norm.bias": "visual.head.ln.bias", "attn_pool.mlp.fc1.weight": "visual.head.mlp.c_fc.weight",
    "attn_pool.mlp.fc1.bias": "visual.head.mlp.c_fc.bias", "attn_pool.mlp.fc2.weight": "visual.head.mlp.c_proj.weight",
    "attn_pool.mlp.fc2.bias": "visual.head.mlp.c_proj.bias",
}  # fmt: skip
_HF_BLOCK = {
    "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias", "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias", "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias", "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias", "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
}  # fmt: skip
_HF_TOP = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual.conv1.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "vision_model.head.probe": "visual.head.probe",
    "vision_model.head.attention.in_proj_weight": "visual.head.attn.in_proj_weight",
    "vision_model.head.attention.in_proj_bias": "visual.head.attn.in_proj_bias",
    "vision_model.head.attention.out_proj.weight": "visual.head.attn.out_proj.weight",
    "vision_model.head.attention.out_proj.bias": "visual.head.attn.out_proj.bias",
    "vision_model.head.layernorm.weight": "visual.head.ln.weight",
    "vision_model.head.layernorm.bias": "visual.head.ln.bias",
    "vision_model.head.mlp.fc1.weight": "visual.head.mlp.c_fc.weight",
    "vision_model.head.mlp.fc1.bias": "visual.head.mlp.c_fc.bias",
    "vision_model.head.mlp.fc2.weight": "visual.head.mlp.c_proj.weight",
    "vision_model.head.mlp.fc2.bias": "visual.head.mlp.c_proj.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_model.head.weight": "text_projection.weight",
    "text_model.head.bias": "text_projection.bias",
}  # fmt: skip
_HF_LAYERS = (("vision_model.encoder.layers.", "visual.transformer.resblocks."),
              ("text_model.encoder.layers.", "transformer.resblocks."))  # fmt: skip


def is_open_clip_siglip_state_dict(sd: Mapping[str, Any]) -> bool:
    """OpenCLIP's timm-tower layout (`visual.trunk.*`), after wrapper prefixes are stripped."""
    return any(k.startswith("visual.trunk.") for k in sd)


def is_hf_siglip_state_dict(sd: Mapping[str, Any]) -> bool:
    """Hugging Face `SiglipModel` keys (its attention-pool head, or the text head CLIPModel lacks)."""
    return any(k.startswith(("vision_model.head.", "text_model.head.")) for k in sd)


def _scalar(value: torch.Tensor) -> torch.Tensor:
    return value.reshape([])  # HF stores logit_scale / logit_bias as [1]; ours (and OpenCLIP's) are []


def open_clip_siglip_to_ours(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """OpenCLIP SigLIP state dict (timm image tower `visual.trunk.*`, text tower `text.*`) -> our layout.

    timm's `attn.qkv` is already q, k, v stacked as `nn.MultiheadAttention.in_proj_weight` [3D, D]; the
    pool's separate `q` [D, D] and `kv` [2D, D] (k then v) are stacked into one; `pos_embed` [1, N, D] and
    `latent` [1, 1, D] lose / keep their batch dimension as our parameters have it.
    """
    out: StateDict = {}
    pool_qkv: dict[str, dict[str, torch.Tensor]] = {"weight": {}, "bias": {}}
    for key, value in sd.items():
        if key.startswith("text."):
            out[key[len("text.") :]] = value  # OpenCLIP's text tower has our (OpenAI's) names
        elif key in ("logit_scale", "logit_bias"):
            out[key] = _scalar(value)
        elif key.startswith("visual.trunk."):
            sub = key[len("visual.trunk.") :]
            if sub == "pos_embed":
                out["visual.positional_embedding"] = value.reshape(value.shape[-2:])
            elif sub in _TIMM_TOP:
                out[_TIMM_TOP[sub]] = value
            elif (m := re.fullmatch(r"attn_pool\.(q|kv)\.(weight|bias)", sub)) is not None:
                pool_qkv[m.group(2)][m.group(1)] = value
            elif (m := re.fullmatch(r"blocks\.(\d+)\.(.+)", sub)) is not None and m.group(2) in _TIMM_BLOCK:
                out[f"visual.transformer.resblocks.{m.group(1)}.{_TIMM_BLOCK[m.group(2)]}"] = value
            else:
                raise ValueError(f"unexpected key {key!r} in an OpenCLIP SigLIP state dict (timm tower)")
        else:
            raise ValueError(f"unexpected key {key!r} in an OpenCLIP SigLIP state dict")
    for kind, parts in pool_qkv.items():
        if set(parts) != {"q", "kv"}:
            raise ValueError(f"incomplete attention-pool projections: have {sorted(parts)} for its {kind}")
        out[f"visual.head.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["kv"]], dim=0)
    return out


def hf_siglip_to_ours(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Hugging Face `SiglipModel` state dict -> our layout (q, k, v projections stacked into in_proj)."""
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue  # a buffer HF rebuilds; not a weight
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key in ("logit_scale", "logit_bias"):
            out[key] = _scalar(value)
        elif key == "vision_model.embeddings.position_embedding.weight":
            out["visual.positional_embedding"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        else:
            out.update(_hf_layer_key(key, value, qkv))
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"incomplete attention projections for {key}: have {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _hf_layer_key(key: str, value: torch.Tensor, qkv: dict[str, dict[str, torch.Tensor]]) -> StateDict:
    """One encoder-layer key; q/k/v projections are collected into `qkv` and stacked by the caller."""
    for theirs, ours in _HF_LAYERS:
        if key.startswith(theirs):
            idx, suffix = key[len(theirs) :].split(".", 1)
            m = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", suffix)
            if m is not None:
                qkv.setdefault(f"{ours}{idx}.attn.in_proj_{m.group(2)}", {})[m.group(1)] = value
                return {}
            if suffix in _HF_BLOCK:
                return {f"{ours}{idx}.{_HF_BLOCK[suffix]}": value}
    raise ValueError(f"unexpected key {key!r} in a Hugging Face SiglipModel state dict")


def siglip_to_ours(sd: Mapping[str, torch.Tensor]) -> StateDict | None:
    """Either peer's SigLIP state dict (recognised by its keys) in our layout; None for any other layout."""
    if is_open_clip_siglip_state_dict(sd):
        return open_clip_siglip_to_ours(sd)
    if is_hf_siglip_state_dict(sd):
        return hf_siglip_to_ours(sd)
    return None


# ------------------------------------------------------------------------------------------------- reader


def _hf_weights(folder: Path) -> StateDict:
    """model.safetensors, its shards (model.safetensors.index.json), or pytorch_model.bin."""
    from clip.formats import _folder_weights, _read_json, read_safetensors

    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return _folder_weights(folder, ("model.safetensors", "pytorch_model.bin"))
    weight_map = (_read_json(index) or {}).get("weight_map") or {}
    sd: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise FileNotFoundError(
                f"{folder} lists the weight shard {shard} in {index.name}, which is missing"
            )
        sd.update(read_safetensors(folder / shard)[0])
    return sd


def read_hf_siglip_folder(path: Path) -> Reading | None:
    """A Hugging Face SigLIP folder: config.json with a "siglip*" model_type, plus its weights."""
    from clip.formats import Reading, _read_json

    cfg_path = path / "config.json"
    if not path.is_dir() or not cfg_path.is_file():
        return None
    hf = _read_json(cfg_path)
    if not isinstance(hf, dict) or not str(hf.get("model_type", "")).startswith("siglip"):
        return None
    pre_path = path / "preprocessor_config.json"
    pre = _read_json(pre_path) if pre_path.is_file() else None
    # The tokenizer's Hub repo, for when the folder lacks tokenizer.json (transformers records its source).
    name = (
        hf.get("_name_or_path")
        if isinstance(hf.get("_name_or_path"), str) and hf.get("_name_or_path")
        else None
    )
    try:
        cfg = hf_siglip_config_to_config(hf, pre, tokenizer_name=name or path.name)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{cfg_path}: {err}") from None
    sd = hf_siglip_to_ours(_hf_weights(path))
    return Reading("Hugging Face SiglipModel folder", sd, cfg, True, tokenizer_dir=path)
