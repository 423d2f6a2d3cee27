"""One optimizer step's forward and backward: the global-batch contrastive loss under any world size, with
feature-cached gradient accumulation.

Every rank computes the loss of its own rows against the columns of the whole global batch (all-gathered with
gradients), scaled so that DDP's gradient average equals the gradient of one process holding the whole batch:

    loss_r = sum of rank r's per-row losses * world / (valid rows in the global batch)

With `accum` K > 1 the K micro-batches are first encoded without gradients; then each is re-encoded with
gradients and the loss over all K x B rows (the others' features cached) is back-propagated, so the summed
gradient equals one step on the K x B batch (the loss scalars get their gradient once, in the last pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clip.model import CLIP
from clip.train.data import Batch
from clip.train.distributed import DistInfo, all_gather_with_grad
from clip.train.loss import clip_loss, siglip_loss


class ContrastiveModel(nn.Module):
    """The CLIP model plus the loss's own parameters (SigLIP's bias), so DDP reduces their gradients too.

    forward(images [b, 3, H, W], texts [b, L]) -> (image, text) features [b, D], L2-normalised, float32.
    """

    def __init__(self, model: CLIP, loss: str = "clip") -> None:
        super().__init__()
        self.clip = model
        self.loss = loss
        # SigLIP starts the bias at -10 so that the many negatives begin with a small loss (Zhai et al., 2023);
        # a SigLIP model brings its own (pretrained) bias, and the loss trains that one.
        own = getattr(model, "logit_bias", None)
        self.logit_bias = None
        if loss == "siglip":
            self.logit_bias = own if own is not None else nn.Parameter(torch.tensor(-10.0))
        elif own is not None:  # InfoNCE has no bias: frozen, so neither AdamW nor DDP waits for its gradient
            own.requires_grad_(False)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        text = F.normalize(self.clip.encode_text(texts).float(), dim=-1)
        return image, text


@dataclass
class StepContext:
    """What a step needs besides the batch. `model` is the (possibly DDP-wrapped) ContrastiveModel."""

    model: nn.Module
    inner: ContrastiveModel
    info: DistInfo
    micro: int  # samples per micro-batch (the padded row count per micro-batch under DDP)
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None = None
    label_smoothing: float = 0.0  # the clip loss's (OptimConfig.label_smoothing)


@dataclass
class Micro:
    """A micro-batch on the device: inputs [n, ...] (n >= 1) of which the first `valid` rows are real samples."""

    images: torch.Tensor
    texts: torch.Tensor
    valid: int


def to_device(batch: Batch | None, ctx: StepContext) -> Micro:
    """Move a batch to the device; an empty (or missing) batch becomes one masked dummy sample, so that every
    rank still runs the forward and backward its collectives expect."""
    device = ctx.info.device
    if batch is not None and batch.size > 0:
        # Only where later positions cannot matter (causal, end-of-text pooled); SigLIP's text tower sees them.
        texts = ctx.inner.clip.trim_text(batch.texts, multiple=8)
        return Micro(
            batch.images.to(device, non_blocking=True), texts.to(device, non_blocking=True), batch.size
        )
    cfg = ctx.inner.clip.config
    n = cfg.vision.image_size
    images = torch.zeros(1, 3, n, n, device=device)
    texts = torch.zeros(1, cfg.text.context_length, dtype=torch.long, device=device)
    return Micro(images, texts, 0)


def _pad(features: torch.Tensor, valid: int, rows: int) -> torch.Tensor:
    """[n, D] -> [rows, D]: the valid rows, then zeros. With no valid row the zeros stay attached to the graph,
    so every parameter still receives a (zero) gradient and DDP's reducer completes."""
    pad = features.new_zeros(rows - valid, features.shape[1])
    if valid == 0:
        pad = pad + 0.0 * features.sum()
    return torch.cat([features[:valid], pad])


def gathered_loss(
    images: list[torch.Tensor],
    texts: list[torch.Tensor],
    valid: list[int],
    ctx: StepContext,
    n_valid_global: int,
    scalars_live: bool = True,
) -> torch.Tensor:
    """This rank's share of the global-batch loss.

    images, texts: per micro-batch features [n_j, D] whose first valid[j] rows are real. Each micro-batch is
    padded to `ctx.micro` rows so every rank gathers the same shape; a mask column marks the real rows.
    """
    inner, info = ctx.inner, ctx.info
    scale = inner.clip.logit_scale.exp()
    bias = inner.logit_bias
    if not scalars_live:
        scale = scale.detach()
        bias = bias.detach() if bias is not None else None
    rows = ctx.micro
    img = torch.cat([_pad(f, v, rows) for f, v in zip(images, valid, strict=True)])  # [K*B, D]
    txt = torch.cat([_pad(f, v, rows) for f, v in zip(texts, valid, strict=True)])  # [K*B, D]
    mask = torch.cat([torch.arange(rows, device=img.device) < v for v in valid])  # [K*B] bool
    local_rows = torch.cat([torch.arange(v, device=img.device) + j * rows for j, v in enumerate(valid)])
    if info.distributed:
        dim = img.shape[1]
        packed = all_gather_with_grad(
            torch.cat([img, txt, mask[:, None].to(img.dtype)], dim=1)
        )  # [W*K*B, 2D+1]
        all_img, all_txt, all_mask = packed[:, :dim], packed[:, dim : 2 * dim], packed[:, 2 * dim] > 0.5
    else:
        all_img, all_txt, all_mask = img, txt, mask
    labels = local_rows + info.rank * img.shape[0]
    row_img, row_txt = img[local_rows], txt[local_rows]
    if inner.loss == "siglip":
        per_row = siglip_loss(row_img, row_txt, scale, bias, all_text_features=all_txt, labels=labels,
                              column_mask=all_mask, reduction="none")  # fmt: skip
    else:
        per_row = clip_loss(row_img, row_txt, scale, all_image_features=all_img, all_text_features=all_txt,
                            labels=labels, column_mask=all_mask, reduction="none",
                            label_smoothing=ctx.label_smoothing)  # fmt: skip
    # Sum, not mean: ranks may hold different numbers of valid rows; DDP divides by world again.
    total = per_row.sum() * info.world_size / max(n_valid_global, 1)
    if per_row.numel() == 0:
        total = total + 0.0 * (img.sum() + txt.sum() + scale)  # keep the graph (and DDP) whole
    return total


def _backward(loss: torch.Tensor, ctx: StepContext) -> None:
    (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()


def forward_backward(batches: list[Batch | None], ctx: StepContext, n_valid_global: int) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step into `.grad`; returns this rank's loss share (detached).

    batches: the K micro-batches of this rank (None or empty ones for a rank whose data ran out).
    """
    micros = [to_device(b, ctx) for b in batches]
    valid = [m.valid for m in micros]
    if len(micros) == 1:
        with ctx.autocast():
            img, txt = ctx.model(micros[0].images, micros[0].texts)
        loss = gathered_loss([img], [txt], valid, ctx, n_valid_global)
        _backward(loss, ctx)
        return loss.detach()
    with torch.no_grad(), ctx.autocast():
        cached = [ctx.inner(m.images, m.texts) for m in micros]  # bypass DDP: no gradient, no hooks
    last = len(micros) - 1
    for j, m in enumerate(micros):
        sync = (
            contextlib.nullcontext()
            if j == last or not hasattr(ctx.model, "no_sync")
            else ctx.model.no_sync()
        )
        with sync:
            with ctx.autocast():
                img_j, txt_j = ctx.model(m.images, m.texts)
            images = [img_j if k == j else c[0] for k, c in enumerate(cached)]
            texts = [txt_j if k == j else c[1] for k, c in enumerate(cached)]
            loss = gathered_loss(images, texts, valid, ctx, n_valid_global, scalars_live=j == last)
            _backward(loss, ctx)
    return loss.detach()
