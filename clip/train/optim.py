"""Small pure helpers for optimisation: parameter groups, the learning-rate schedule, mixed precision."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# Parameters that are embeddings by role although they are plain nn.Parameters (leaf names in CLIP's tree).
EMBEDDING_PARAMETERS = frozenset({"positional_embedding", "class_embedding"})
# Scalars of the loss: weight decay would pull the temperature (and SigLIP's bias) towards zero.
NO_DECAY_PARAMETERS = frozenset({"logit_scale", "logit_bias"})


def no_decay_names(module: nn.Module) -> set[str]:
    """Names of trainable parameters that get no weight decay: biases and gains (ndim <= 1), embeddings
    (nn.Embedding weights and CLIP's positional/class embeddings) and the loss scalars."""
    embedding_modules = {name for name, m in module.named_modules() if isinstance(m, nn.Embedding)}
    names = set()
    for name, p in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if (
            p.ndim <= 1
            or leaf in EMBEDDING_PARAMETERS
            or leaf in NO_DECAY_PARAMETERS
            or owner in embedding_modules
        ):
            names.add(name)
    return names


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters (frozen ones are left out), in module order."""
    skip = no_decay_names(module)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adam_hparams(vision_kind: str, beta1: float | None, beta2: float | None, eps: float | None) -> dict:
    """AdamW betas and eps: the CLIP paper's (Radford et al., 2021, Table 19/20) unless given.

    ViT image towers: beta2 0.98, eps 1e-6; ResNets: beta2 0.999, eps 1e-8; beta1 0.9 for both.
    """
    vit = vision_kind == "vit"
    return {
        "betas": (0.9 if beta1 is None else beta1, (0.98 if vit else 0.999) if beta2 is None else beta2),
        "eps": (1e-6 if vit else 1e-8) if eps is None else eps,
    }


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warmup from lr / warmup to lr over `warmup` steps, then cosine decay to `min_lr` at `total_steps`."""

    lr: float
    warmup: int
    total_steps: int
    min_lr: float = 0.0

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.total_steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)

    def state_dict(self) -> dict:
        return {"kind": "cosine_warmup", "lr": self.lr, "warmup": self.warmup, "total_steps": self.total_steps,
                "min_lr": self.min_lr}  # fmt: skip


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" -> bf16 autocast on GPUs, fp32 on the CPU (CPU bf16 matmuls are slower than fp32 on most chips)."""
    if precision == "auto":
        return "amp_bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument callable returning the autocast context for `precision` (weights stay fp32)."""
    from clip.runtime import autocast

    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: autocast(device, precision)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 autocast (its small exponent range underflows gradients); None otherwise."""
    if precision != "amp_fp16":
        return None
    return torch.amp.GradScaler(device.type)


def clamp_logit_scale(model: nn.Module) -> None:
    """Clamp the learned log-temperature to [0, ln 100] after each step, as in the CLIP paper."""
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, math.log(100.0))
