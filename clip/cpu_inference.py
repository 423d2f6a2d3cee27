"""Fast CPU inference for large jobs: bf16 and int8 copies of a CLIP model with the same encode API.

    fast = clip.optimize_for_cpu(model, precision="bf16")   # or "int8", or "fp32"
    features = fast.encode_image(pixels)                     # [N, E] float32, as model.encode_image
    clip.feature_agreement(model, fast, images=pixels)       # {"image_cosine_mean": ..., "image_cosine_min": ...}

Why these routes (measured on a 2-core AMD EPYC with AVX512-BF16 and VNNI, see README "CPU precision"):

* bf16: every weight cast to bfloat16, so each Linear, the patch convolution and attention run in oneDNN's
  bf16 kernels (AVX512-BF16 dot products, fp32 accumulation). LayerNorm keeps fp32 weights and statistics
  (PyTorch's mixed-dtype kernel: bf16 in and out, fp32 inside), as this project's LayerNorm does.
  Autocast gives the same numbers but re-casts every weight on every call.
* int8: dynamic quantisation (weights int8 per output channel, activations int8 per tensor, measured on
  each call, int32 accumulation) of every Linear inside the transformer blocks, the attention's
  `in_proj` and `out_proj` included: `torch.ao.quantization.quantize_dynamic` skips those two (a raw
  parameter and a NonDynamicallyQuantizableLinear), which leaves a third of the blocks' multiply-adds in
  fp32. The attention module is therefore replaced by `InferenceSelfAttention`, which keeps openai/CLIP's
  `attn(x, x, x, need_weights=False, attn_mask=...)` call and `[L, N, D]` layout. Activations use the full
  8-bit range (`reduce_range=False`): the 7-bit default guards against saturation on CPUs without VNNI.
* fp32: the same fp32 arithmetic through oneDNN instead of MKL (which runs CLIP's matmuls 1.2-1.5x slower on
  this AMD CPU), weights reordered once, the MLP's activation fused into its first matmul; the features
  differ from the plain model's by float rounding only (~1e-6 relative). bf16 takes the same route.

The copy is for inference only: no gradients, and the replaced attention answers self-attention without
returned weights (what every CLIP tower calls); anything else raises one line saying to use the fp32 model.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip.runtime import CPU_PRECISIONS


def _check_precision(precision: str) -> None:
    if precision not in CPU_PRECISIONS:
        raise ValueError(f"unknown CPU precision {precision!r}; use one of {', '.join(CPU_PRECISIONS)}")


# ------------------------------------------------------------------------------------------ int8 parts


def _quantized_engine() -> str:
    """The quantised engine to pack weights for: oneDNN where PyTorch has it, else fbgemm (x86)."""
    engines = torch.backends.quantized.supported_engines
    for name in ("onednn", "fbgemm", "x86"):
        if name in engines:
            return name
    raise RuntimeError(f"int8 inference needs PyTorch's x86 quantised kernels; this build has only {engines}")


class Int8Linear(nn.Module):
    """A Linear with int8 weights (symmetric, per output channel) and dynamically quantised int8 inputs.

    forward: x [..., in_features] float32 -> [..., out_features] float32. The weights are packed once for
    the quantised engine; inputs are quantised per tensor on every call (scale from their min and max).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, engine: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        engine = engine or _quantized_engine()
        previous = torch.backends.quantized.engine
        with warnings.catch_warnings():
            # PyTorch marks quantised tensors as deprecated; its dynamic int8 kernels are still the VNNI route.
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(w, scale, zero, axis=0, dtype=torch.qint8)
            try:
                torch.backends.quantized.engine = engine  # packing picks the kernel family
                self._packed = torch.ops.quantized.linear_prepack(
                    qweight, None if bias is None else bias.detach().float()
                )
            finally:
                torch.backends.quantized.engine = previous
        self.engine = engine

    @classmethod
    def from_linear(cls, linear: nn.Linear, engine: str | None = None) -> Int8Linear:
        return cls(linear.weight, linear.bias, engine)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [out, in] float32 as stored in int8, bias [out] or None)."""
        weight, bias = torch.ops.quantized.linear_unpack(self._packed)
        return weight.dequantize(), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, engine={self.engine}"


def _attention_is_replaceable(attn: nn.Module) -> bool:
    from clip.model.layers import Attention

    return (
        isinstance(attn, Attention)
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and attn.bias_k is None
        and not attn.add_zero_attn
    )


class InferenceSelfAttention(nn.Module):
    """Self-attention with separately replaceable projections, for inference, with `nn.MultiheadAttention`'s call.

    `attn(x, x, x, need_weights=False, attn_mask=mask, is_causal=...)` -> (out, None), x and out [L, N, D]
    ([N, L, D] when `batch_first`). `in_proj` maps D -> 3D (q, k, v stacked as in `in_proj_weight`),
    `out_proj` D -> D. A float `attn_mask` [L, L] is added to the logits as PyTorch's MHA does.
    """

    def __init__(self, in_proj: nn.Module, out_proj: nn.Module, num_heads: int, embed_dim: int,
                 batch_first: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.in_proj, self.out_proj = in_proj, out_proj
        self.num_heads, self.embed_dim, self.batch_first = num_heads, embed_dim, batch_first

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:  # fmt: skip
        if not (query is key and key is value) or need_weights or key_padding_mask is not None:
            raise NotImplementedError(
                "the CPU-optimised attention computes self-attention without weights or padding masks "
                "(what CLIP's towers call); use the fp32 model for attention maps or cross-attention"
            )
        from clip.model.layers import sdpa_self_attention

        out = sdpa_self_attention(
            query, self.in_proj, self.out_proj, self.num_heads, self.batch_first, is_causal, attn_mask
        )
        return out, None


def _replace_blocks(
    model: nn.Module, linear: Callable[[torch.Tensor, torch.Tensor | None], nn.Module],
    mlp: Callable[[nn.Module], nn.Module | None],
) -> int:  # fmt: skip
    """Swap every transformer block's attention projections for `linear(weight, bias)` modules (inside an
    `InferenceSelfAttention`) and its MLP for `mlp(block.mlp)` when that is not None; returns how many linears."""
    from clip.model.layers import ResidualAttentionBlock

    replaced = 0
    for block in model.modules():
        if not isinstance(block, ResidualAttentionBlock):
            continue
        attn = block.attn
        if _attention_is_replaceable(attn):
            in_proj = linear(attn.in_proj_weight, attn.in_proj_bias)
            out_proj = linear(attn.out_proj.weight, attn.out_proj.bias)
            block.attn = InferenceSelfAttention(
                in_proj, out_proj, attn.num_heads, attn.embed_dim, attn.batch_first
            )
            replaced += 2
        new_mlp = mlp(block.mlp)
        if new_mlp is not None:
            block.mlp = new_mlp
            replaced += 2
    return replaced


def _quantize_blocks(model: nn.Module, engine: str) -> int:
    """Replace the attention and MLP linears of every transformer block with int8 ones; returns how many."""

    def int8_mlp(mlp: nn.Module) -> nn.Module | None:
        parts = _folded_mlp(mlp)
        if parts is None:
            return None
        # One SiLU / GELU kernel between the int8 matmuls (QuickGELU's three elementwise passes cost ~15%).
        w_fc, b_fc, kind, algorithm, w_proj, b_proj = parts
        act = nn.SiLU() if kind == "swish" else nn.GELU(approximate=algorithm)
        return _mlp(Int8Linear(w_fc, b_fc, engine), act, Int8Linear(w_proj, b_proj, engine))

    return _replace_blocks(model, lambda w, b: Int8Linear(w, b, engine), int8_mlp)


# ------------------------------------------------------------------------------------ fp32 / bf16 parts

QUICK_GELU_ALPHA = 1.702


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(nn.Module):
    """A Linear run by oneDNN with its weights reordered once into oneDNN's blocked layout, optionally with
    the activation fused into the matmul ("swish" = x * sigmoid(x), "gelu" with "none"/"tanh").

    forward: x [..., in] (the weights' dtype, fp32 or bf16) -> [..., out]. PyTorch's own fp32 matmul calls
    MKL, which on this AMD CPU runs 1.2-1.5x slower than oneDNN on CLIP's shapes; the arithmetic is the same
    fp32 (or bf16 with fp32 accumulation) up to the order of the sums. Without PyTorch's oneDNN ops it
    falls back to F.linear plus the activation.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none",
                 algorithm: str = "") -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.activation, self.algorithm = activation, algorithm
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._packed = None
        if _onednn_linear_available():
            # Only the reordered copy is kept: the dense weights would double the model's memory.
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, self.activation, [],
                                                      self.algorithm)  # fmt: skip
        y = F.linear(x, self.weight, self.bias)
        if self.activation == "swish":
            return F.silu(y)
        return F.gelu(y, approximate=self.algorithm) if self.activation == "gelu" else y

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation != "none" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{act}"


def _folded_mlp(mlp: nn.Module) -> tuple | None:
    """openai/CLIP's MLP (c_fc, activation, c_proj) as (w_fc, b_fc, activation, algorithm, w_proj, b_proj).

    QuickGELU x * sigmoid(1.702 x) is swish(1.702 x) / 1.702: c_fc's weights and bias are scaled by 1.702 and
    c_proj's weights by 1 / 1.702, so the same function runs as one swish ("SiLU") kernel, or fused into
    oneDNN's matmul (fp32 rounding apart). None for an MLP of another shape.
    """
    from clip.model.layers import QuickGELU

    c_fc, act, c_proj = (getattr(mlp, n, None) for n in ("c_fc", "gelu", "c_proj"))
    if type(c_fc) is not nn.Linear or type(c_proj) is not nn.Linear:
        return None
    w_fc, b_fc, w_proj = c_fc.weight.detach(), c_fc.bias, c_proj.weight.detach()
    if isinstance(act, QuickGELU):
        kind, algorithm = "swish", ""
        w_fc, w_proj = w_fc * QUICK_GELU_ALPHA, w_proj / QUICK_GELU_ALPHA
        b_fc = None if b_fc is None else b_fc.detach() * QUICK_GELU_ALPHA
    elif type(act) is nn.GELU:
        kind, algorithm = "gelu", act.approximate
    else:
        return None
    return w_fc, b_fc, kind, algorithm, w_proj, c_proj.bias


def _mlp(c_fc: nn.Module, act: nn.Module, c_proj: nn.Module) -> nn.Sequential:
    """An MLP with openai/CLIP's child names (c_fc, gelu, c_proj)."""
    return nn.Sequential(OrderedDict([("c_fc", c_fc), ("gelu", act), ("c_proj", c_proj)]))


def _fused_mlp(mlp: nn.Module) -> nn.Module | None:
    """The MLP through OneDNNLinear, its activation fused into c_fc; None for an MLP of another shape."""
    parts = _folded_mlp(mlp)
    if parts is None:
        return None
    w_fc, b_fc, kind, algorithm, w_proj, b_proj = parts
    return _mlp(OneDNNLinear(w_fc, b_fc, kind, algorithm), nn.Identity(), OneDNNLinear(w_proj, b_proj))


def _onednn_blocks(model: nn.Module) -> int:
    """Run every transformer block's linears through OneDNNLinear (fused MLP activation); returns how many."""
    return _replace_blocks(model, OneDNNLinear, _fused_mlp)


# ------------------------------------------------------------------------------------------ bf16 parts


class MixedLayerNorm(nn.LayerNorm):
    """LayerNorm of bf16 input with fp32 weights and statistics, bf16 out (PyTorch's mixed-dtype kernel).

    The same numbers as this project's fp32-computing LayerNorm rounded to bf16, without its two copies.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.contiguous(), self.normalized_shape, self.weight, self.bias, self.eps)


def _to_bf16(model: nn.Module) -> None:
    from clip.model.layers import LayerNorm

    model.to(torch.bfloat16)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LayerNorm) and child.elementwise_affine:
                ln = MixedLayerNorm(child.normalized_shape, eps=child.eps, bias=child.bias is not None)
                with torch.no_grad():
                    ln.weight.copy_(child.weight.float())
                    if child.bias is not None:
                        ln.bias.copy_(child.bias.float())
                setattr(parent, name, ln.requires_grad_(False))


# ------------------------------------------------------------------------------------------ the wrapper


class CPUInferenceModel(nn.Module):
    """A CLIP model prepared for CPU inference at `precision`; encode functions return float32 features.

    encode_image: pixels [N, 3, H, W] -> [N, embed_dim]; encode_text: ids [N, context_length] -> [N, embed_dim];
    forward(image, text) -> (logits_per_image, logits_per_text), as `clip.model.CLIP`. The prepared model
    is `.model` (its modules replaced as the module docstring says).
    """

    def __init__(self, model: nn.Module, precision: str) -> None:
        super().__init__()
        self.model = model
        self.precision = precision

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the towers compute in (bf16 for "bf16"; float32 for "fp32" and "int8")."""
        return self.model.dtype

    def encode_image(self, image: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """image: [N, 3, H, W] -> features [N, embed_dim] float32 (not normalised)."""
        with torch.inference_mode():
            return self.model.encode_image(image, interpolate_pos_encoding).float()

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """text: token ids [N, context_length] -> features [N, embed_dim] float32 (not normalised)."""
        with torch.inference_mode():
            return self.model.encode_text(text).float()

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Features [N_img, E], [N_txt, E] -> scaled cosine logits [N_img, N_txt] float32."""
        with torch.inference_mode():
            return self.model.logits(image_features.float(), text_features.float()).float()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(self.encode_image(image), self.encode_text(text))
        return logits, logits.t()

    def extra_repr(self) -> str:
        return f"precision={self.precision}"


def optimize_for_cpu(model: nn.Module, precision: str = "bf16") -> CPUInferenceModel:
    """A copy of `model` for fast CPU inference at `precision` ("fp32", "bf16" or "int8"); `model` is unchanged.

    "int8" quantises the transformer blocks of both towers (a ResNet image tower's convolutions stay fp32);
    "bf16" casts every weight. Check the agreement with `feature_agreement(model, fast, images=...)`.
    """
    _check_precision(precision)
    if isinstance(model, CPUInferenceModel):
        raise ValueError(
            f"the model is already prepared for CPU inference ({model.precision}); pass the fp32 model"
        )
    fast = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    if precision == "bf16":
        _to_bf16(fast)
        _onednn_blocks(fast)
    elif precision == "fp32":
        _onednn_blocks(fast)
    elif precision == "int8":
        fast.float()
        if _quantize_blocks(fast, _quantized_engine()) == 0:
            raise ValueError("int8: the model has no transformer blocks with Linear layers to quantise")
    return CPUInferenceModel(fast, precision)


def cosine_agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Per-row cosine of features a, b [N, D] -> {"mean", "min"} (rounded to 6 digits)."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6)}


def feature_agreement(reference: nn.Module, fast: nn.Module, images: torch.Tensor | None = None,
                      texts: torch.Tensor | None = None) -> dict[str, float]:  # fmt: skip
    """Cosine between the reference's and the fast model's features on the same inputs, per sample.

    images [N, 3, H, W] and/or texts [N, L] token ids -> {"image_cosine_mean", "image_cosine_min",
    "text_cosine_mean", "text_cosine_min"} (the keys of the inputs given).
    """
    if images is None and texts is None:
        raise ValueError("feature_agreement needs images or texts to compare on")
    out: dict[str, float] = {}
    with torch.inference_mode():
        if images is not None:
            for k, v in cosine_agreement(reference.encode_image(images), fast.encode_image(images)).items():
                out[f"image_cosine_{k}"] = v
        if texts is not None:
            for k, v in cosine_agreement(reference.encode_text(texts), fast.encode_text(texts)).items():
                out[f"text_cosine_{k}"] = v
    return out
