"""Pure functions between checkpoint layouts: OpenAI/OpenCLIP <-> Hugging Face `CLIPModel`.

The model's own layout is OpenAI's.  Foreign layouts are recognised by their key patterns
and renamed here; the module tree is never bent to fit a foreign file.  Every function maps
a state dict (plus config) to a state dict, with no file access.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from clip.config import CLIPConfig, TextConfig, VisionConfig
from clip.longclip import is_longclip_state_dict, longclip_to_openai

StateDict = dict[str, torch.Tensor]

# Keys an OpenAI TorchScript archive carries beside the weights.
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def normalize_openai_state_dict(sd: StateDict) -> StateDict:
    """Strip wrappers: DDP's `module.`, torch.compile's `_orig_mod.`, and TorchScript's extra scalars;
    fold Long-CLIP's two text position tables into one (`clip.longclip.longclip_to_openai`)."""
    out = {}
    for key, value in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        if key in _JIT_EXTRA_KEYS or key.endswith("attn_mask"):
            continue
        out[key] = value
    return longclip_to_openai(out) if is_longclip_state_dict(out) else out


def is_hf_state_dict(sd: StateDict) -> bool:
    return any(k.startswith(("text_model.", "vision_model.")) for k in sd)


def _count(sd: StateDict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_config(sd: StateDict, quick_gelu: bool = True) -> CLIPConfig:
    """Read the architecture of an OpenAI-layout state dict from tensor shapes alone.

    Head counts follow OpenAI's convention (width // 64 for text and ViT, width * 32 // 64 for
    the ResNet pool) since shapes cannot tell them; checkpoints of this project carry their config.
    """
    try:
        embed_dim = sd["text_projection"].shape[1]
        context_length, tw = sd["positional_embedding"].shape
        vocab_size = sd["token_embedding.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"not a CLIP state dict: missing {err.args[0]!r}") from None
    text = TextConfig(
        context_length=context_length,
        vocab_size=vocab_size,
        width=tw,
        heads=max(1, tw // 64),
        layers=_count(sd, r"transformer\.resblocks\.(\d+)\."),
    )
    if "visual.proj" in sd:
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = _count(sd, r"visual\.transformer\.resblocks\.(\d+)\.")
        vision = VisionConfig("vit", patch * grid, width, layers, max(1, width // 64), patch)
    elif "visual.attnpool.positional_embedding" in sd:
        counts = tuple(_count(sd, rf"visual\.layer{b}\.(\d+)\.") for b in (1, 2, 3, 4))
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig("resnet", grid * 32, width, counts, max(1, width * 32 // 64), 32)
    else:
        raise ValueError("not a CLIP state dict: no image tower keys (visual.proj or visual.attnpool.*)")
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=quick_gelu)


# OpenAI block key suffix <-> HF encoder-layer key suffix (attention projections handled apart).
_BLOCK_MAP = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
}
_TOP_MAP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: HF's spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_TOWERS = (("transformer.resblocks.", "text_model.encoder.layers."), ("visual.transformer.resblocks.", "vision_model.encoder.layers."))  # fmt: skip


def openai_to_hf(sd: StateDict) -> StateDict:
    """OpenAI-layout state dict (ViT image tower) -> Hugging Face `CLIPModel` state dict."""
    if "visual.proj" not in sd:
        raise ValueError("Hugging Face CLIPModel has no ResNet image tower; only ViT models convert to HF")
    out: StateDict = {}
    for key, value in sd.items():
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()  # HF Linear stores [out, in]
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        else:
            out.update(_block_to_hf(key, value))
    return out


def _block_to_hf(key: str, value: torch.Tensor) -> StateDict:
    for ours, theirs in _TOWERS:
        if not key.startswith(ours):
            continue
        idx, suffix = key[len(ours) :].split(".", 1)
        base = f"{theirs}{idx}."
        if suffix in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if suffix.endswith("weight") else "bias"
            q, k, v = value.chunk(3, dim=0)
            return {f"{base}self_attn.{n}_proj.{kind}": t.contiguous() for n, t in zip("qkv", (q, k, v))}
        if suffix in _BLOCK_MAP:
            return {base + _BLOCK_MAP[suffix]: value}
    raise ValueError(f"cannot convert key {key!r} to the Hugging Face layout")


def hf_to_openai(sd: StateDict) -> StateDict:
    """Hugging Face `CLIPModel` state dict -> OpenAI layout (inverse of `openai_to_hf`)."""
    top = {v: k for k, v in _TOP_MAP.items()}
    block = {v: k for k, v in _BLOCK_MAP.items()}
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue  # a buffer HF rebuilds; not a weight
        if key in top:
            out[top[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
        else:
            for ours, theirs in _TOWERS:
                if key.startswith(theirs):
                    idx, suffix = key[len(theirs) :].split(".", 1)
                    m = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", suffix)
                    if m:
                        qkv.setdefault(f"{ours}{idx}.attn.in_proj_{m.group(2)}", {})[m.group(1)] = value
                    elif suffix in block:
                        out[f"{ours}{idx}.{block[suffix]}"] = value
                    else:
                        raise ValueError(f"unexpected Hugging Face key {key!r}")
                    break
            else:
                raise ValueError(f"unexpected Hugging Face key {key!r}")
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"incomplete attention projections for {key}: have {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def hf_config_to_config(hf: dict[str, Any]) -> CLIPConfig:
    """A Hugging Face `config.json` (model_type "clip") -> CLIPConfig."""
    if hf.get("model_type") not in (None, "clip"):
        raise ValueError(f"config.json has model_type {hf.get('model_type')!r}; expected 'clip'")
    t, v = hf.get("text_config") or {}, hf.get("vision_config") or {}
    acts = {t.get("hidden_act", "quick_gelu"), v.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise ValueError(f"unsupported activations {sorted(acts)}; expected both 'quick_gelu' or both 'gelu'")
    for name, sub, width in (
        ("text", t, t.get("hidden_size", 512)),
        ("vision", v, v.get("hidden_size", 768)),
    ):
        if sub.get("intermediate_size", 4 * width) != 4 * width:
            raise ValueError(f"{name} intermediate_size must be 4 x hidden_size for this model")
    return CLIPConfig(
        embed_dim=hf.get("projection_dim", 512),
        vision=VisionConfig(
            "vit",
            v.get("image_size", 224),
            v.get("hidden_size", 768),
            v.get("num_hidden_layers", 12),
            v.get("num_attention_heads", 12),
            v.get("patch_size", 32),
        ),  # fmt: skip
        text=TextConfig(
            t.get("max_position_embeddings", 77),
            t.get("vocab_size", 49408),
            t.get("hidden_size", 512),
            t.get("num_attention_heads", 8),
            t.get("num_hidden_layers", 12),
        ),  # fmt: skip
        quick_gelu=acts == {"quick_gelu"},
    )


def config_to_hf_config(cfg: CLIPConfig, logit_scale: float = 2.6592) -> dict[str, Any]:
    """CLIPConfig -> a Hugging Face `config.json` dict that `CLIPModel.from_pretrained` reads."""
    if cfg.vision.kind != "vit":
        raise ValueError("Hugging Face CLIPModel has no ResNet image tower; only ViT models convert to HF")
    if cfg.vision.conv_stem:
        raise ValueError(
            "Hugging Face CLIPModel has no convolutional stem (vision conv_stem); keep this model in our format "
            "(clip.save_model) or export it to ONNX (clip export)"
        )
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    t, v = cfg.text, cfg.vision
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": logit_scale,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": 4 * t.width, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length, "hidden_act": act, "layer_norm_eps": 1e-5,
            "projection_dim": cfg.embed_dim, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.width, "intermediate_size": 4 * v.width,
            "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": 3, "hidden_act": act, "layer_norm_eps": 1e-5,
            "projection_dim": cfg.embed_dim,
        },
    }  # fmt: skip
