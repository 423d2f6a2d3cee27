"""Contrastive losses as pure functions of features: no process groups, no modules, no state.

Both take the rows this process owns and the columns of the whole (possibly all-gathered) batch, so the same
function serves one process and many: `labels[i]` is the column of row i's positive pair. Features are expected
L2-normalised; `logit_scale` is the multiplier itself (exp of the learned log-temperature), a 0-dim tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    if reduction == "none":
        return per_row
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _defaults(
    rows: torch.Tensor, columns: torch.Tensor | None, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    columns = rows if columns is None else columns
    if labels is None:
        labels = torch.arange(rows.shape[0], device=rows.device)
    return columns, labels


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    column_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al., 2021): mean of image->text and text->image cross-entropy.

    image_features, text_features: [B, D] rows owned here (pair i is image i with text i).
    all_image_features, all_text_features: [N, D] columns (default: the rows themselves, N = B).
    labels: [B] int64, the column of each row's positive (default arange(B)).
    column_mask: [N] bool, False for padding columns that must not act as negatives.
    label_smoothing: eps; each row's target is 1 - eps on its positive plus eps spread evenly over the real
        columns (`F.cross_entropy`'s definition, with masked columns left out). 0 is CLIP's (and open_clip's) loss.
    Returns the loss per row [B] (reduction="none"), or its mean / sum.
    """
    all_text, labels = _defaults(text_features, all_text_features, labels)
    all_image, _ = _defaults(image_features, all_image_features, labels)
    logits_image = logit_scale * image_features @ all_text.t()  # [B, N]
    logits_text = logit_scale * text_features @ all_image.t()  # [B, N]
    if column_mask is not None:
        # -inf, not a large negative: masked columns must contribute exactly nothing to the softmax.
        logits_image = logits_image.masked_fill(~column_mask, float("-inf"))
        logits_text = logits_text.masked_fill(~column_mask, float("-inf"))
    per_row = 0.5 * (
        _cross_entropy(logits_image, labels, column_mask, label_smoothing)
        + _cross_entropy(logits_text, labels, column_mask, label_smoothing)
    )
    return _reduce(per_row, reduction)


def _cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, column_mask: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Per-row cross-entropy [B] of logits [B, N]; with eps > 0, smoothed over the unmasked columns only
    (F.cross_entropy would spread eps over -inf padding columns too and return inf)."""
    if eps == 0.0:
        return F.cross_entropy(logits, labels, reduction="none")
    logp = F.log_softmax(logits, dim=-1)  # [B, N]
    nll = -logp.gather(1, labels[:, None])[:, 0]
    if column_mask is None:
        uniform = -logp.mean(dim=-1)
    else:
        uniform = -logp.masked_fill(~column_mask, 0.0).sum(dim=-1) / column_mask.sum()
    return (1.0 - eps) * nll + eps * uniform


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    all_text_features: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    column_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid loss (Zhai et al., 2023, SigLIP): every image-text pair is an independent binary problem.

    Row i's loss is sum_j -log sigmoid(z_ij * (logit_scale * <img_i, txt_j> + logit_bias)) with z = +1 for the
    positive column labels[i] and -1 otherwise; the paper's normalisation (by batch size) is reduction="mean".
    image_features: [B, D]; text_features: [B, D] (only used as columns when all_text_features is None);
    all_text_features: [N, D]; labels: [B]; column_mask: [N] bool. Returns [B] or a scalar.
    """
    all_text, labels = _defaults(text_features, all_text_features, labels)
    logits = logit_scale * image_features @ all_text.t() + logit_bias  # [B, N]
    signs = torch.full_like(logits, -1.0)
    signs.scatter_(1, labels[:, None], 1.0)
    pair_loss = -F.logsigmoid(signs * logits)  # [B, N]
    if column_mask is not None:
        pair_loss = pair_loss.masked_fill(~column_mask, 0.0)
    return _reduce(pair_loss.sum(dim=1), reduction)
