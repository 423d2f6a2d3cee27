"""Text beyond 77 tokens: Long-CLIP's knowledge-preserving stretch of the text position embedding.

Long-CLIP (Zhang et al., "Long-CLIP: Unlocking the Long-Text Capability of CLIP", ECCV 2024,
arXiv:2403.15378) observes that CLIP's text positions past about 20 are barely trained, so it keeps the
first `keep` = 20 rows of the position table as they are and stretches the rest by linear interpolation,
`factor` = 4 new rows per old one: 77 -> 4 * 77 - 3 * 20 = 248.  With an old table P of L rows:

    new[i]                 = P[i]                                          i < keep
    new[keep + f*i + j]    = (f - j) * P[keep + i] / f + j * P[keep + i + 1] / f   0 <= i < L - 1 - keep
    new[keep + f*(L-1-keep) + j] = P[L-1] + j * (P[L-1] - P[L-2]) / f             (extrapolated tail)

for j = 0 .. f-1.  Long-CLIP's checkpoints hold two tables: `positional_embedding` (frozen while
fine-tuning, used for the first 20 positions) and `positional_embedding_res` (trained, used for the
others), combined by two 0/1 row masks (`mask1`, `mask2`: plain attributes, not in the state dict).
`longclip_to_openai` folds them into the one table of OpenAI's layout, which computes the same.

Pure functions on tensors and state dicts, plus `stretch_context` on a model in place; no file access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from clip.config import CLIPConfig
    from clip.model import CLIP

StateDict = dict[str, torch.Tensor]

KEEP = 20  # Long-CLIP's kept positions
LONGCLIP_FORMAT = "Long-CLIP state dict"


def stretched_length(length: int, factor: int = 4, keep: int = KEEP) -> int:
    """The table length after stretching `length` rows by `factor` past the first `keep` (77 -> 248)."""
    return factor * length - (factor - 1) * keep


def _factor(old: int, new: int, keep: int) -> int:
    if old <= keep + 1:
        raise ValueError(f"a position table of {old} rows is too short to stretch past its first {keep}")
    factor, rest = divmod(new - keep, old - keep)
    if new <= old or rest or factor < 2:
        options = ", ".join(str(stretched_length(old, f, keep)) for f in (2, 3, 4, 5))
        raise ValueError(
            f"context_length {new} is not a Long-CLIP stretch of {old} positions (keep the first {keep}, "
            f"stretch the rest by an integer factor): use one of {options}, ..."
        )
    return factor


def stretch_positions(pos: torch.Tensor, length: int, keep: int = KEEP) -> torch.Tensor:
    """Text position embeddings [L, D] -> [length, D] by Long-CLIP's knowledge-preserving stretch.

    `length` must be `f * L - (f - 1) * keep` for an integer factor f >= 2 (248 for L = 77, f = 4); the
    same length returns `pos` unchanged.  Computed in fp32, returned in `pos`'s dtype.
    """
    old = pos.shape[0]
    if length == old:
        return pos
    f = _factor(old, length, keep)
    p = pos.detach().float()
    a, b = p[keep : old - 1], p[keep + 1 : old]  # each interpolated pair, [L - 1 - keep, D]
    inner = torch.stack([(f - j) * a / f + j * b / f for j in range(f)], dim=1)  # [L - 1 - keep, f, D]
    step = p[old - 1] - p[old - 2]
    tail = torch.stack([p[old - 1] + j * step / f for j in range(f)])  # [f, D]
    out = torch.cat([p[:keep], inner.reshape(-1, p.shape[1]), tail])
    return out.to(pos.dtype)


def stretch_state_dict(config: CLIPConfig, sd: StateDict, length: int) -> tuple[CLIPConfig, StateDict]:
    """(config, OpenAI-layout state dict) with the text context stretched to `length` positions."""
    if length == config.text.context_length:
        return config, sd
    if not config.text.causal:
        raise ValueError("context_length stretching needs a causal text tower (OpenAI's); this one is not")
    pos = stretch_positions(sd["positional_embedding"], length)
    return config.replace(text={"context_length": length}), {**sd, "positional_embedding": pos}


def stretch_context(model: CLIP, length: int) -> CLIP:
    """Stretch a model's text context to `length` positions, in place (device and dtype kept); returns it.

    The causal masks of the text blocks grow with it.  `clip.load(name, context_length=248)` does the
    same at load time.
    """
    import torch.nn as nn

    config, sd = stretch_state_dict(
        model.config, {"positional_embedding": model.positional_embedding}, length
    )
    if config is model.config:
        return model
    model.config = config
    model.context_length = length
    model.positional_embedding = nn.Parameter(sd["positional_embedding"])
    for block in model.transformer.resblocks:
        if block.attn_mask is not None:
            block.attn_mask = model.build_attention_mask()
    return model


def is_longclip_state_dict(sd: StateDict) -> bool:
    return "positional_embedding_res" in sd


def longclip_to_openai(sd: StateDict, keep: int = KEEP) -> StateDict:
    """A Long-CLIP state dict -> OpenAI's layout: one position table, the first `keep` rows from
    `positional_embedding`, the rest from `positional_embedding_res` (what Long-CLIP's row masks select)."""
    pos, res = sd["positional_embedding"], sd["positional_embedding_res"]
    if pos.shape != res.shape:
        raise ValueError(
            f"Long-CLIP state dict: positional_embedding {tuple(pos.shape)} and positional_embedding_res "
            f"{tuple(res.shape)} differ in shape; is the file damaged?"
        )
    out = {k: v for k, v in sd.items() if k not in ("positional_embedding_res", "mask1", "mask2")}
    out["positional_embedding"] = torch.cat([pos[:keep], res[keep:]])
    return out


def freeze_kept_positions(model: CLIP, keep: int = KEEP) -> torch.utils.hooks.RemovableHandle:
    """Long-CLIP's fine-tuning keeps the first `keep` positions fixed: zero their gradient (a hook;
    with no weight decay on embeddings, as `clip train` does, AdamW then leaves them exactly as they are)."""
    mask = torch.ones(model.positional_embedding.shape[0], 1, device=model.positional_embedding.device)
    mask[:keep] = 0
    return model.positional_embedding.register_hook(lambda grad: grad * mask.to(grad.dtype))
