"""Image-text retrieval recall on held-out pairs, run by rank 0 during training (`--val-data`, `--val-every`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from clip.evaluation import metrics
from clip.model import CLIP
from clip.train.data import get_item


def retrieval_recall(similarity: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways for paired data: similarity [N, N] with image i matching text i.

    image_to_text_R@k: fraction of images whose own caption is among their k most similar texts (and the
    reverse for text_to_image). Ranks come from `clip.evaluation.metrics`, where ties count against the pair,
    so a collapsed model that scores everything alike gets no credit.
    """
    n = similarity.shape[0]
    if similarity.shape != (n, n):
        raise ValueError(f"similarity must be square [N, N], got {tuple(similarity.shape)}")
    pairs = torch.arange(n, device=similarity.device)  # caption j belongs to image j
    ranks = {
        "image_to_text": metrics.image_to_text_ranks(similarity, pairs),
        "text_to_image": metrics.text_to_image_ranks(similarity, pairs),
    }
    out = {}
    for k in ks:
        for direction, r in ranks.items():
            out[f"{direction}_R@{k}"] = metrics.recall_at_k(r, (k,))[k]
    return out


@torch.no_grad()
def validate(
    model: CLIP, dataset, *, limit: int, batch_size: int, device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:  # fmt: skip
    """Encode the first `limit` readable pairs of `dataset` (evaluation transform) and return recall@1/5."""
    was_training = model.training
    model.eval()
    images, texts = [], []
    feats_i, feats_t = [], []
    try:
        for index in range(min(limit, len(dataset))):
            try:
                image, tokens = get_item(dataset, index, 0)
            except (ValueError, OSError):
                continue  # a bad held-out pair is left out, as in training
            images.append(image)
            texts.append(torch.as_tensor(tokens).long())
            if len(images) == batch_size or index == min(limit, len(dataset)) - 1:
                with autocast():
                    feats_i.append(model.encode_image(torch.stack(images).to(device)).float())
                    feats_t.append(model.encode_text(torch.stack(texts).to(device)).float())
                images, texts = [], []
        if images:
            with autocast():
                feats_i.append(model.encode_image(torch.stack(images).to(device)).float())
                feats_t.append(model.encode_text(torch.stack(texts).to(device)).float())
    finally:
        model.train(was_training)
    if not feats_i:
        raise ValueError("no readable pair in the validation data")
    img = F.normalize(torch.cat(feats_i), dim=-1)
    txt = F.normalize(torch.cat(feats_t), dim=-1)
    return retrieval_recall(img @ txt.t())
