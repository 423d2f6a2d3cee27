"""CLIP's modules, with openai/CLIP's `clip.model` names, module tree and state-dict keys.

Only `nn.Module`s and pure functions on them live here: no file access, no downloads, no
`torch.distributed`.  Everything `clip.model` exports in openai/CLIP is here under the same name
and signature: `CLIP`, `build_model`, `convert_weights`, `VisionTransformer`, `ModifiedResNet`,
`Transformer`, `ResidualAttentionBlock`, `AttentionPool2d`, `Bottleneck`, `LayerNorm`, `QuickGELU`.
"""

from __future__ import annotations

import torch
from torch import nn

from clip.model.clip_model import CLIP, build_vision_tower
from clip.model.layers import (
    Attention,
    LayerNorm,
    LayerScale,
    QuickGELU,
    ResidualAttentionBlock,
    Transformer,
    causal_mask,
)
from clip.model.resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from clip.model.vision import MAPHead, VisionTransformer, interpolate_positions

__all__ = [
    "CLIP", "Attention", "AttentionPool2d", "Bottleneck", "LayerNorm", "LayerScale", "MAPHead",
    "ModifiedResNet", "QuickGELU", "ResidualAttentionBlock", "Transformer", "VisionTransformer",
    "build_model", "build_vision_tower", "causal_mask", "convert_weights", "interpolate_positions",
]  # fmt: skip


def convert_weights(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """openai/CLIP's `convert_weights`: cast conv, linear and attention weights and the projections, in place.

    LayerNorms, BatchNorms and embeddings stay fp32 (LayerNorm computes in fp32 anyway; embeddings
    are cast when used), as in openai/CLIP.
    """

    def cast(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
        if isinstance(module, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                         "bias_k", "bias_v"):  # fmt: skip
                tensor = getattr(module, name)
                if tensor is not None:
                    tensor.data = tensor.data.to(dtype)
        for name in ("text_projection", "proj"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                param.data = param.data.to(dtype)

    model.apply(cast)
    return model


def build_model(state_dict: dict[str, torch.Tensor]) -> CLIP:
    """openai/CLIP's `build_model`: the architecture from tensor shapes, fp16 weights, eval mode.

    As in openai/CLIP, head counts follow width // 64 (its nine releases); files of other
    architectures need `clip.load(path, arch=...)`, which never guesses.
    """
    from clip.convert import infer_config, normalize_openai_state_dict

    sd = normalize_openai_state_dict(state_dict)
    model = CLIP(infer_config(sd, quick_gelu=True))
    convert_weights(model)
    model.load_state_dict(sd)
    return model.eval()
