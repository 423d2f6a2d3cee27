"""Transformer parts with openai/CLIP's module boundaries: `[L, N, D]` in and out, `nn.MultiheadAttention`.

Research code reaches into these modules (per-block loops, forward hooks, attention surgery through
`block.attn(x, x, x, need_weights=False, attn_mask=mask)`), so every module here takes and returns
what openai/CLIP's does.  The fast path still runs through `scaled_dot_product_attention`: `Attention`
is an `nn.MultiheadAttention` whose forward takes that route for self-attention without weights, and
hands every other call (weights wanted, padding masks, arbitrary masks) to PyTorch's own code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (fp16/bf16 inference stays stable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's kernel is ~8x slower on strided input (a permuted [L, N, D] view) than a copy plus
        # the contiguous kernel; the values are the same.
        x = x.contiguous()
        orig = x.dtype
        if orig == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return super().forward(x)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(orig)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI trained its released models with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT); OpenCLIP's parameter name `gamma`."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def make_act(quick_gelu: bool, approximate: str = "none") -> nn.Module:
    return QuickGELU() if quick_gelu else nn.GELU(approximate=approximate)


def causal_mask(length: int) -> torch.Tensor:
    """openai/CLIP's additive causal mask [L, L]: -inf above the diagonal, on the CPU.

    Built on the CPU even under a meta-device context: like openai/CLIP's it is a plain attribute,
    not a buffer, and moves to the input's device when used.
    """
    return torch.full((length, length), float("-inf"), device="cpu").triu_(1)


def _is_causal_mask(mask: torch.Tensor | None) -> bool:
    """True for a square float mask with -inf exactly above the diagonal and 0 elsewhere (or its bool twin)."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1] or mask.is_meta:
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu_(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    return bool(torch.all(mask[upper] == float("-inf")) and torch.all(mask[~upper] == 0))


class Attention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` (same parameters, attributes, signature and results) with an SDPA fast path.

    The fast path covers self-attention (`query is key is value`) without returned weights, padding
    mask or arbitrary mask (`attn_mask=None`, or a causal mask with `is_causal=True`, as PyTorch's
    own MHA allows).  It computes what `nn.MultiheadAttention` computes in one fused kernel and returns
    `(out, None)`.  Inputs are `[L, N, D]` unless `batch_first=True`.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        fast = (
            query is key
            and key is value
            and query.dim() == 3
            and key_padding_mask is None
            and not need_weights
            and (attn_mask is None or is_causal)
            and self._qkv_same_embed_dim
            and self.in_proj_bias is not None
            and self.bias_k is None
            and not self.add_zero_attn
            and (self.dropout == 0.0 or not self.training)
        )
        if not fast:
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
            )  # fmt: skip
        return self._self_attention(query, is_causal), None

    def _self_attention(self, x: torch.Tensor, is_causal: bool) -> torch.Tensor:
        """x: [L, N, D] ([N, L, D] when batch_first) -> the same layout."""
        project = lambda t: F.linear(t, self.in_proj_weight, self.in_proj_bias)  # noqa: E731
        return sdpa_self_attention(x, project, self.out_proj, self.num_heads, self.batch_first, is_causal)


def sdpa_self_attention(
    x: torch.Tensor, in_proj: Callable[[torch.Tensor], torch.Tensor], out_proj: Callable[[torch.Tensor], torch.Tensor],
    num_heads: int, batch_first: bool, is_causal: bool = False, attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Multi-head self-attention in one `scaled_dot_product_attention` call, as `nn.MultiheadAttention` computes it.

    x: [L, N, D] ([N, L, D] when `batch_first`) -> the same layout.  `in_proj` maps D -> 3D (q, k, v stacked),
    `out_proj` D -> D; `attn_mask` is an additive float mask (ignored when `is_causal`).
    """
    d = x.shape[-1]
    order = (2, 0, 3, 1, 4) if batch_first else (2, 1, 3, 0, 4)  # [B0, B1, 3, H, hd] -> [3, N, H, L, hd]
    qkv = in_proj(x).view(*x.shape[:2], 3, num_heads, d // num_heads).permute(*order)
    mask = None if is_causal or attn_mask is None else attn_mask.to(qkv.dtype)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask, is_causal=is_causal)
    out = out.permute(0, 2, 1, 3) if batch_first else out.permute(2, 0, 1, 3)  # [N, H, L, hd] -> input layout
    return out_proj(out.reshape(*x.shape[:2], d))


class ResidualAttentionBlock(nn.Module):
    """openai/CLIP's pre-LN block on `[L, N, D]`: x + attention(ln_1(x)), then x + mlp(ln_2(x)).

    `attn_mask` is openai/CLIP's attribute (an additive [L, L] mask or None); a causal mask is run
    as `is_causal` through the fast path and sliced to shorter inputs.  OpenCLIP's options:
    `mlp_ratio`, `ls_init_value` (adds `ls_1` / `ls_2`), activation and LayerNorm eps.
    """

    def __init__(
        self, d_model: int, n_head: int, attn_mask: torch.Tensor | None = None, *, mlp_ratio: float = 4.0,
        ls_init_value: float | None = None, quick_gelu: bool = True, gelu_approximate: str = "none",
        norm_eps: float = 1e-5,
    ) -> None:  # fmt: skip
        super().__init__()
        self.attn = Attention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model, eps=norm_eps)
        hidden = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, hidden)),
                    ("gelu", make_act(quick_gelu, gelu_approximate)),
                    ("c_proj", nn.Linear(hidden, d_model)),
                ]
            )
        )
        self.ln_2 = LayerNorm(d_model, eps=norm_eps)
        if ls_init_value is not None:
            self.ls_1 = LayerScale(d_model, ls_init_value)
            self.ls_2 = LayerScale(d_model, ls_init_value)
        self.attn_mask = attn_mask

    @property
    def attn_mask(self) -> torch.Tensor | None:
        return self._attn_mask

    @attn_mask.setter
    def attn_mask(self, mask: torch.Tensor | None) -> None:
        self._attn_mask = mask
        self.mask_is_causal = _is_causal_mask(mask)

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        mask = self._attn_mask
        if mask is None:
            return None
        dtype = x.dtype if mask.is_floating_point() else mask.dtype
        if mask.device != x.device or mask.dtype != dtype:
            # As openai/CLIP: the mask follows the input once; no setter, its causality is unchanged.
            mask = self._attn_mask = mask.to(device=x.device, dtype=dtype)
        seq = x.shape[0]
        if self.mask_is_causal and seq < mask.shape[0]:
            mask = mask[:seq, :seq]  # text cut short after its end-of-text token: still causal
        return mask

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """openai/CLIP's `attention`: x [L, N, D] (already normalised) -> [L, N, D]."""
        mask = self._mask_for(x)
        return self.attn(x, x, x, need_weights=False, attn_mask=mask, is_causal=self.mask_is_causal)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [L, N, D] -> [L, N, D]."""
        ls_1, ls_2 = getattr(self, "ls_1", None), getattr(self, "ls_2", None)
        a = self.attention(self.ln_1(x))
        x = x + (ls_1(a) if ls_1 is not None else a)
        m = self.mlp(self.ln_2(x))
        return x + (ls_2(m) if ls_2 is not None else m)


class Transformer(nn.Module):
    """openai/CLIP's stack of residual attention blocks: `[L, N, D]` in, `[L, N, D]` out."""

    def __init__(
        self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None, *,
        mlp_ratio: float = 4.0, ls_init_value: float | None = None, quick_gelu: bool = True,
        gelu_approximate: str = "none", norm_eps: float = 1e-5,
    ) -> None:  # fmt: skip
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        opts = dict(mlp_ratio=mlp_ratio, ls_init_value=ls_init_value, quick_gelu=quick_gelu,
                    gelu_approximate=gelu_approximate, norm_eps=norm_eps)  # fmt: skip
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, attn_mask, **opts) for _ in range(layers)]
        )

    @property
    def is_causal(self) -> bool:
        """Every block still runs a causal mask (so positions after the pooled token cannot matter)."""
        return all(block.mask_is_causal for block in self.resblocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [L, N, D] -> [L, N, D]."""
        x = x.contiguous()  # a permuted view would make every LayerNorm and Linear copy
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return self.resblocks(x)
        for block in self.resblocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | list[int] | None = None, stop_early: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: [L, N, D] -> (output [L, N, D], the outputs of blocks `indices`, each [L, N, D], in block order).

        `indices` as OpenCLIP's and timm's: None = every block, an int n = the last n blocks, a list =
        those blocks (negative from the end).  `stop_early` skips the blocks after the last one wanted
        (the output is then that block's).
        """
        wanted = take_indices(self.layers, indices)
        hidden = []
        for i, block in enumerate(self.resblocks):
            if stop_early and i > max(wanted):
                break
            x = block(x)
            if i in wanted:
                hidden.append(x)
        return x, hidden


def take_indices(layers: int, indices: int | list[int] | None) -> set[int]:
    """OpenCLIP's block selection: None = all, int n = the last n, list = those (negative from the end)."""
    if indices is None:
        return set(range(layers))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= layers:
            raise ValueError(
                f"indices={indices} asks for the last {indices} blocks of {layers}; use 1..{layers}"
            )
        return set(range(layers - indices, layers))
    out = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -layers <= i < layers:
            raise ValueError(
                f"block index {i!r} is out of range for {layers} blocks; use {-layers}..{layers - 1}"
            )
        out.add(i % layers)
    return out
