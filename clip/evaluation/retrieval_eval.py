"""Image-text retrieval: recall@k and median rank in both directions (definitions in `metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from clip.evaluation import metrics
from clip.evaluation.datasets import ImageCaptions
from clip.evaluation.features import (
    DEFAULT_OPTIONS,
    EncodeOptions,
    describe_failures,
    encode_images,
    encode_texts,
)


@torch.no_grad()
def score_retrieval(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    block: int = 1024,
) -> dict[str, float]:
    """Retrieval metrics from unit-norm features: images [N_img, D], captions [N_txt, D].

    caption_image [N_txt]: the image index of each caption (several captions may share an image). The
    similarity matrix is built `block` rows / columns at a time, so memory stays O(block x N).
    """
    caption_image = caption_image.long()
    n_img = image_features.shape[0]
    i2t = [
        metrics.image_to_text_ranks(
            image_features[s : s + block] @ text_features.t(), caption_image, first_image=s, n_images=n_img
        )
        for s in range(0, n_img, block)
    ]
    t2i = [
        metrics.text_to_image_ranks(
            image_features @ text_features[s : s + block].t(), caption_image[s : s + block]
        )
        for s in range(0, text_features.shape[0], block)
    ]
    return metrics.retrieval_metrics(torch.cat(i2t), torch.cat(t2i), ks)


def evaluate_retrieval(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    pairs: ImageCaptions,
    transform: Callable[[Any], torch.Tensor],
    options: EncodeOptions = DEFAULT_OPTIONS,
) -> dict[str, Any]:
    """Encode the pairs' images and captions and score retrieval.

    Captions of unreadable images are dropped with them (their count is in the result as n_skipped).
    Returns the metrics plus n_images, n_captions, n_skipped and `skipped` (the first unreadable images).
    """
    enc = encode_images(encode_image, pairs.paths, transform, options)
    # Re-index: image k of the readable set is source enc.index[k]; drop captions of skipped images.
    new_index = torch.full((len(pairs.paths),), -1, dtype=torch.long)
    new_index[enc.index] = torch.arange(len(enc.index))
    caption_image = new_index[torch.tensor(pairs.caption_image, dtype=torch.long)]
    keep = caption_image >= 0
    captions = [c for c, k in zip(pairs.captions, keep.tolist()) if k]
    text_features = encode_texts(encode_text, tokenize(captions), options)
    result: dict[str, Any] = score_retrieval(enc.features, text_features, caption_image[keep])
    result.update(n_images=len(enc.index), n_captions=len(captions), n_skipped=enc.n_skipped)
    result["skipped"] = describe_failures(pairs.paths, enc.failed)
    return result
