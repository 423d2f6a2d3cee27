"""Classification and retrieval metrics: pure functions of scores and ground truth.

Ties are counted against the model everywhere: an item's rank is 1 + the number of *other* candidates
scoring at least as high as it. A model that gives every candidate the same score therefore ranks every
true answer last instead of first, and cannot look perfect.

Classification: `logits` [N, C] (any scores, higher is better), `labels` [N] in 0..C-1.

Retrieval (the CLIP / Karpathy-split convention): images are rows and captions are columns of a
similarity matrix [N_img, N_txt]; `caption_image[j]` is the row index of caption j's image, so an image
may have several captions and every caption has exactly one image.

* image -> text: an image's rank is the rank of its best-ranked caption among all N_txt captions (a hit at
  k when *any* of its captions is in the top k); the other captions of the same image do not count against it.
* text -> image: a caption's rank is the rank of its image among all N_img images.
* recall@k is the fraction of queries with rank <= k; the median rank is the median of the ranks (the mean
  of the two middle ranks for an even count).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_classification(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"need logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}")


def class_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rank of the true class of each row: LongTensor [N], 1 = best; ties count against the true class."""
    _check_classification(logits, labels)
    true = logits.gather(1, labels.view(-1, 1).long())  # [N, 1]
    ranks = (logits >= true).sum(dim=1)  # counts the true class itself, so the best possible rank is 1
    return ranks.masked_fill(torch.isnan(true.view(-1)), logits.shape[1])  # a NaN score ranks last


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: fraction of rows whose true class ranks in the top k}; k above C counts every row as a hit."""
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    ranks = class_ranks(logits, labels)
    return {int(k): float((ranks <= k).float().mean()) for k in ks}


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """LongTensor [C, C]: entry [i, j] counts samples of true class i predicted as class j."""
    predictions, labels = predictions.long().view(-1), labels.long().view(-1)
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in size"
        )
    for name, v in (("predictions", predictions), ("labels", labels)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}")
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_recall(confusion: torch.Tensor) -> torch.Tensor:
    """Float [C]: correct / support for each true class; NaN for a class with no samples."""
    support = confusion.sum(dim=1).double()
    return confusion.diagonal().double() / support  # 0/0 -> NaN marks an absent class


def mean_per_class_recall(confusion: torch.Tensor) -> float:
    """Mean of the per-class recalls over the classes that have samples (absent classes are left out)."""
    recall = per_class_recall(confusion)
    present = ~torch.isnan(recall)
    if not bool(present.any()):
        raise ValueError("mean per-class recall of an empty confusion matrix is undefined")
    return float(recall[present].mean())


def _check_retrieval(similarity: torch.Tensor, caption_image: torch.Tensor, n_images: int) -> torch.Tensor:
    if similarity.ndim != 2 or caption_image.ndim != 1 or similarity.shape[1] != caption_image.shape[0]:
        raise ValueError(
            f"need similarity [N_img, N_txt] and caption_image [N_txt], got {tuple(similarity.shape)} "
            f"and {tuple(caption_image.shape)}"
        )
    caption_image = caption_image.long().to(similarity.device)
    if caption_image.numel() and (int(caption_image.min()) < 0 or int(caption_image.max()) >= n_images):
        raise ValueError(f"caption_image must index images 0..{n_images - 1}")
    return caption_image


def image_to_text_ranks(
    similarity: torch.Tensor, caption_image: torch.Tensor, first_image: int = 0, n_images: int | None = None
) -> torch.Tensor:
    """Rank of each image's best caption: LongTensor [B] for similarity rows [B, N_txt].

    Row i is image `first_image + i` (pass a block of rows to bound memory; `n_images` is the total, default
    first_image + B). An image with no caption is an error.
    """
    b = similarity.shape[0]
    n_images = first_image + b if n_images is None else n_images
    caption_image = _check_retrieval(similarity, caption_image, n_images)
    rows = torch.arange(first_image, first_image + b, device=similarity.device)
    positive = caption_image.view(1, -1) == rows.view(-1, 1)  # [B, N_txt]
    if not bool(positive.any(dim=1).all()):
        missing = int(rows[~positive.any(dim=1)][0])
        raise ValueError(f"image {missing} has no caption; every image needs at least one")
    best = similarity.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values  # [B, 1]
    # Other captions of the same image are not competitors: count negatives scoring >= the best positive.
    ranks = ((similarity >= best) & ~positive).sum(dim=1) + 1
    return ranks.masked_fill(torch.isnan(best.view(-1)), similarity.shape[1])  # a NaN score ranks last


def text_to_image_ranks(similarity: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """Rank of each caption's image among all images: LongTensor [N_txt] for similarity [N_img, N_txt].

    Pass a block of columns (with the matching slice of caption_image) to bound memory.
    """
    caption_image = _check_retrieval(similarity, caption_image, similarity.shape[0])
    true = similarity.gather(0, caption_image.view(1, -1))  # [1, N_txt]
    ranks = (similarity >= true).sum(dim=0)  # the true image itself is counted once, so the best rank is 1
    return ranks.masked_fill(torch.isnan(true.view(-1)), similarity.shape[0])  # a NaN score ranks last


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """{k: fraction of ranks <= k}."""
    if ranks.numel() == 0:
        raise ValueError("recall of an empty set of queries is undefined")
    return {int(k): float((ranks <= k).float().mean()) for k in ks}


def median_rank(ranks: torch.Tensor) -> float:
    """The median rank (mean of the two middle values for an even count)."""
    if ranks.numel() == 0:
        raise ValueError("median rank of an empty set of queries is undefined")
    return float(torch.quantile(ranks.double(), 0.5))


def retrieval_metrics(
    i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Flat dict: image_to_text_R@k, image_to_text_median_rank, text_to_image_R@k, text_to_image_median_rank."""
    out: dict[str, float] = {}
    for name, ranks in (("image_to_text", i2t_ranks), ("text_to_image", t2i_ranks)):
        for k, v in recall_at_k(ranks, ks).items():
            out[f"{name}_R@{k}"] = v
        out[f"{name}_median_rank"] = median_rank(ranks)
    return out
