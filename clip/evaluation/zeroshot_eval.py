"""Zero-shot classification: image features against a prompt-ensemble classifier."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from clip.evaluation import metrics
from clip.evaluation.datasets import LabeledImages
from clip.evaluation.features import DEFAULT_OPTIONS, EncodeOptions, encode_images


@dataclass
class ZeroShotResult:
    """Top-k accuracies, mean per-class recall and the confusion matrix (rows: true, columns: predicted)."""

    topk: dict[int, float]
    mean_per_class_recall: float
    confusion: torch.Tensor  # [C, C] int64
    n_images: int
    failed: list[tuple[int, str]] = field(default_factory=list)  # unreadable images: (position, error)

    @property
    def n_skipped(self) -> int:
        return len(self.failed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: top1/top5/..., mean_per_class_recall, per_class_recall, counts."""
        recall = metrics.per_class_recall(self.confusion)
        return {
            **{f"top{k}": v for k, v in sorted(self.topk.items())},
            "mean_per_class_recall": self.mean_per_class_recall,
            "per_class_recall": [None if r != r else round(float(r), 6) for r in recall],  # NaN: class absent
            "n_images": self.n_images,
            "n_skipped": self.n_skipped,
            "n_classes": int(self.confusion.shape[0]),
        }


def score_zeroshot(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    failed: list[tuple[int, str]] | None = None,
) -> ZeroShotResult:
    """Score unit-norm image features [N, D] against classifier weights [D, C] with true labels [N].

    `failed` (images that could not be read, as (position, message)) is carried into the result.
    """
    if image_features.shape[0] == 0:
        raise ValueError("no image features to evaluate")
    logits = image_features.float() @ classifier.float().to(
        image_features.device
    )  # [N, C] cosine similarities
    labels = labels.long().to(logits.device)
    confusion = metrics.confusion_matrix(logits.argmax(dim=1), labels, classifier.shape[1])
    return ZeroShotResult(
        topk=metrics.topk_accuracy(logits, labels, ks),
        mean_per_class_recall=metrics.mean_per_class_recall(confusion),
        confusion=confusion.cpu(),
        n_images=int(labels.numel()),
        failed=list(failed or []),
    )


def evaluate_zeroshot(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    dataset: LabeledImages,
    classifier: torch.Tensor,
    transform: Callable[[Any], torch.Tensor],
    options: EncodeOptions = DEFAULT_OPTIONS,
) -> ZeroShotResult:
    """Encode `dataset`'s images with `encode_image` (batched, unreadable ones skipped) and score them.

    classifier: [D, C] from `clip.zero_shot_classifier`, columns in `dataset.classnames` order.
    """
    if classifier.shape[1] != len(dataset.classnames):
        raise ValueError(f"classifier has {classifier.shape[1]} classes, data set {len(dataset.classnames)}")
    enc = encode_images(encode_image, dataset.sources, transform, options, "zero-shot")
    labels = torch.tensor(dataset.labels, dtype=torch.long)[enc.index]
    return score_zeroshot(enc.features, labels, classifier, failed=enc.failed)
