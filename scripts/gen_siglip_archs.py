"""Regenerate clip/data/siglip_archs.json from an installed open_clip and timm.

OpenCLIP's `ViT-*-SigLIP*` model configs name a timm image tower (`timm_model_name`, e.g.
`vit_base_patch16_siglip_224`, with `timm_pool: map`, `timm_proj: none`) and carry their own text tower.
The numbers of each timm tower are read here from the tower itself, built by timm on the meta device (no
weights, no download): width, depth, heads, patch, image size, MLP width, activation, LayerNorm eps.  The
structural facts this library's ViT relies on (no class or register tokens, no layer scale, no pre-norm, a
biased patch conv, one-latent attention pooling with the blocks' activation) are checked, so a timm
change that breaks them fails here, not at load time.  The preprocessing of each config is OpenCLIP's
published one for its pretrained tags.  The numbers are facts about the published architectures (timm:
Apache-2.0, OpenCLIP: MIT, big_vision: Apache-2.0; see NOTICE); `clip.siglip` turns them into configs.

    .venv/bin/python scripts/gen_siglip_archs.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
import torch.nn.functional as F
from torch import nn


def _act_name(act: nn.Module) -> str:
    """The activation as computed (not as named): exact GELU or its tanh approximation."""
    x = torch.linspace(-6, 6, 1201)
    y = act.to("cpu")(x)
    if torch.equal(y, F.gelu(x)):
        return "gelu"
    if torch.equal(y, F.gelu(x, approximate="tanh")):
        return "gelu_tanh"
    raise SystemExit(f"unexpected activation {type(act).__name__}")


def tower_facts(name: str) -> dict[str, Any]:
    """The numbers of one timm SigLIP tower, with the structure this library's ViT needs checked."""
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=0)
    block, pool = m.blocks[0], m.attn_pool
    checks = {
        "no class token": m.cls_token is None and m.num_prefix_tokens == 0,
        "map pooling": m.global_pool == "map" and type(pool).__name__ == "AttentionPoolLatent",
        "one latent, no pool pos embed": pool.latent_len == 1 and pool.pos_embed is None,
        "no pre-norm, fc_norm or patch norm": all(
            isinstance(x, nn.Identity) for x in (m.norm_pre, m.fc_norm, m.patch_embed.norm)
        ),
        "no layer scale or qk norm": all(
            isinstance(x, nn.Identity) for b in m.blocks for x in (b.ls1, b.ls2, b.attn.q_norm, b.attn.k_norm)
        ),
        "biased qkv and patch conv": block.attn.qkv.bias is not None and m.patch_embed.proj.bias is not None,
        "square grid of positions": m.pos_embed.shape[1] == m.patch_embed.num_patches,
        "pool MLP as the blocks'": pool.mlp.fc1.out_features == block.mlp.fc1.out_features,
    }
    failed = [what for what, ok in checks.items() if not ok]
    if failed:
        raise SystemExit(f"{name}: timm tower does not have {failed}")
    acts = {_act_name(b.mlp.act) for b in m.blocks} | {_act_name(pool.mlp.act)}
    eps = {mod.eps for mod in m.modules() if isinstance(mod, nn.LayerNorm)}
    if len(acts) != 1 or len(eps) != 1:
        raise SystemExit(f"{name}: mixed activations {acts} or LayerNorm eps {eps}")
    (size_h, size_w), (patch_h, patch_w) = m.patch_embed.img_size, m.patch_embed.patch_size
    if size_h != size_w or patch_h != patch_w:
        raise SystemExit(f"{name}: not square ({m.patch_embed.img_size}, {m.patch_embed.patch_size})")
    return {
        "image_size": size_h,
        "patch_size": patch_h,
        "width": m.embed_dim,
        "layers": len(m.blocks),
        "heads": block.attn.num_heads,
        "mlp_hidden": block.mlp.fc1.out_features,
        "act": acts.pop(),
        "norm_eps": eps.pop(),
    }


def _preprocess(name: str) -> dict[str, Any]:
    """OpenCLIP's preprocessing for `name`'s pretrained tags (all of them agree, checked)."""
    seen = []
    for tag in open_clip.list_pretrained_tags_by_model(name):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        seen.append({k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")})
    if not seen:
        raise SystemExit(f"{name}: no pretrained tag to take the preprocessing from")
    if any(s != seen[0] for s in seen):
        raise SystemExit(f"{name}: its tags disagree on preprocessing: {seen}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in seen[0].items()}


def main() -> None:
    src = Path(open_clip.__file__).parent / "model_configs"
    configs, preprocess, towers, skipped = {}, {}, {}, {}
    for path in sorted(src.glob("*.json")):
        cfg = json.loads(path.read_text())
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        timm_name = vision.get("timm_model_name", "")
        if "siglip" not in timm_name:
            continue
        if "hf_model_name" in text:
            skipped[path.stem] = "Hugging Face text tower (hf_model_name)"
            continue
        if text.get("proj_type") == "none":
            skipped[path.stem] = "text tower without projection (proj_type 'none')"
            continue
        if vision.get("timm_pool") != "map" or vision.get("timm_proj") != "none":
            raise SystemExit(f"{path.stem}: expected timm_pool 'map' and timm_proj 'none', got {vision}")
        if timm_name not in towers:
            towers[timm_name] = tower_facts(timm_name)
        if vision.get("image_size") != towers[timm_name]["image_size"]:
            raise SystemExit(f"{path.stem}: image_size {vision.get('image_size')} differs from {timm_name}'s")
        configs[path.stem] = cfg
        preprocess[path.stem] = _preprocess(path.stem)
    dest = Path(__file__).resolve().parent.parent / "clip" / "data" / "siglip_archs.json"
    payload = {
        "source": f"open_clip {open_clip.__version__} model_configs and pretrained.py; timm {timm.__version__}",
        "configs": configs,
        "preprocess": preprocess,
        "skipped": skipped,
        "timm_towers": towers,
    }
    dest.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    print(f"{len(configs)} configs, {len(towers)} timm towers, {len(skipped)} skipped -> {dest}")


if __name__ == "__main__":
    main()
