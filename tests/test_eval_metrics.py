"""Metrics against values worked out by hand, and the linear probe on separable toy data."""

from __future__ import annotations

import math

import pytest
import torch

from clip.evaluation import metrics
from clip.evaluation.linear_probe import choose_c, fit_logistic_regression, linear_probe, split_validation

# 4 samples, 3 classes. Row ranks of the true class (ties count against it):
#   row 0, true 0: [0.9, 0.1, 0.0] -> rank 1
#   row 1, true 1: [0.5, 0.4, 0.1] -> rank 2
#   row 2, true 2: [0.3, 0.3, 0.3] -> all tied -> rank 3 (pessimistic)
#   row 3, true 0: [0.1, 0.2, 0.7] -> rank 3
LOGITS = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.4, 0.1], [0.3, 0.3, 0.3], [0.1, 0.2, 0.7]])
LABELS = torch.tensor([0, 1, 2, 0])


def test_class_ranks_and_topk_by_hand():
    assert metrics.class_ranks(LOGITS, LABELS).tolist() == [1, 2, 3, 3]
    acc = metrics.topk_accuracy(LOGITS, LABELS, ks=(1, 2, 3, 5))
    assert acc == {1: 0.25, 2: 0.5, 3: 1.0, 5: 1.0}


def test_constant_scores_are_not_rewarded():
    logits = torch.zeros(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert metrics.topk_accuracy(logits, labels, ks=(1, 3)) == {1: 0.0, 3: 0.0}


def test_nan_scores_rank_last():
    logits = torch.tensor([[float("nan"), 0.0], [1.0, 0.0]])
    assert metrics.class_ranks(logits, torch.tensor([0, 0])).tolist() == [2, 1]


def test_confusion_matrix_and_recalls_by_hand():
    preds = LOGITS.argmax(dim=1)  # [0, 0, 0 (first of the tie), 2]
    assert preds.tolist() == [0, 0, 0, 2]
    cm = metrics.confusion_matrix(preds, LABELS, 3)
    assert cm.tolist() == [[1, 0, 1], [1, 0, 0], [1, 0, 0]]
    recall = metrics.per_class_recall(cm)
    assert recall.tolist() == [0.5, 0.0, 0.0]
    assert metrics.mean_per_class_recall(cm) == pytest.approx(1 / 6)


def test_mean_per_class_recall_skips_absent_classes():
    cm = metrics.confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 4)  # classes 2, 3 absent
    assert math.isnan(float(metrics.per_class_recall(cm)[2]))
    assert metrics.mean_per_class_recall(cm) == pytest.approx((0.5 + 1.0) / 2)


def test_classification_input_errors():
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.topk_accuracy(LOGITS, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="empty"):
        metrics.topk_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="predictions must lie"):
        metrics.confusion_matrix(torch.tensor([5]), torch.tensor([0]), 3)


# 3 images, 5 captions: image 0 has captions 0, 1; image 1 has caption 2; image 2 has captions 3, 4.
CAPTION_IMAGE = torch.tensor([0, 0, 1, 2, 2])
SIM = torch.tensor(
    [
        # c0   c1   c2   c3   c4
        [0.1, 0.8, 0.9, 0.2, 0.0],  # image 0: best own caption c1 (0.8); c2 beats it -> rank 2
        [0.7, 0.1, 0.3, 0.2, 0.1],  # image 1: own c2 (0.3); c0 beats it -> rank 2
        [0.0, 0.1, 0.2, 0.3, 0.9],  # image 2: own c4 is the best -> rank 1
    ]
)


def test_image_to_text_ranks_by_hand():
    # Image 0's other own caption c0 (0.1) must not count against it; only negatives do.
    assert metrics.image_to_text_ranks(SIM, CAPTION_IMAGE).tolist() == [2, 2, 1]


def test_text_to_image_ranks_by_hand():
    # c0 -> image 0: column [0.1, 0.7, 0.0] -> rank 2; c1 -> image 0: [0.8, 0.1, 0.1] -> 1;
    # c2 -> image 1: [0.9, 0.3, 0.2] -> 2; c3 -> image 2: [0.2, 0.2, 0.3] -> 1; c4 -> image 2: [0.0, 0.1, 0.9] -> 1
    assert metrics.text_to_image_ranks(SIM, CAPTION_IMAGE).tolist() == [2, 1, 2, 1, 1]


def test_retrieval_metrics_by_hand():
    out = metrics.retrieval_metrics(
        metrics.image_to_text_ranks(SIM, CAPTION_IMAGE),
        metrics.text_to_image_ranks(SIM, CAPTION_IMAGE),
        ks=(1, 2),
    )
    assert out["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert out["image_to_text_R@2"] == 1.0
    assert out["image_to_text_median_rank"] == 2.0
    assert out["text_to_image_R@1"] == pytest.approx(3 / 5)
    assert out["text_to_image_R@2"] == 1.0
    assert out["text_to_image_median_rank"] == 1.0


def test_retrieval_blocks_equal_whole_and_ties_count_against():
    assert metrics.image_to_text_ranks(SIM[1:], CAPTION_IMAGE, first_image=1).tolist() == [2, 1]
    assert metrics.text_to_image_ranks(SIM[:, 2:], CAPTION_IMAGE[2:]).tolist() == [2, 1, 1]
    flat = torch.zeros(3, 5)
    assert metrics.image_to_text_ranks(flat, CAPTION_IMAGE).tolist() == [4, 5, 4]  # every negative ties
    assert metrics.text_to_image_ranks(flat, CAPTION_IMAGE).tolist() == [3] * 5
    assert metrics.median_rank(torch.tensor([1, 2, 4, 9])) == 3.0


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="image 1 has no caption"):
        metrics.image_to_text_ranks(torch.zeros(2, 2), torch.tensor([0, 0]))


def test_score_retrieval_blocks_match_metrics():
    from clip.evaluation.retrieval_eval import score_retrieval

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(7, 4, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(12, 4, generator=g), dim=-1)
    cap = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4])
    whole = score_retrieval(img, txt, cap, block=100)
    blocked = score_retrieval(img, txt, cap, block=3)
    assert whole == blocked
    sim = img @ txt.t()
    ref = metrics.retrieval_metrics(
        metrics.image_to_text_ranks(sim, cap), metrics.text_to_image_ranks(sim, cap)
    )
    assert whole == ref


def _blobs(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(3, 8) * 3.0
    labels = torch.arange(3).repeat_interleave(n_per_class)
    return centers[labels] + 0.5 * torch.randn(len(labels), 8, generator=g), labels


def test_logistic_regression_matches_its_optimality_condition():
    x, y = _blobs(20, 0)
    model = fit_logistic_regression(x, y, 3, c=1.0)
    # At the optimum the gradient of mean CE + ||W||^2 / (2 C N) vanishes.
    w = model.weight.clone().requires_grad_(True)
    b = model.bias.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x.double() @ w + b, y) + (w * w).sum() / (2 * 1.0 * len(y))
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4  # the solver's stopping tolerance
    # Stronger regularisation (smaller C) shrinks the weights.
    assert fit_logistic_regression(x, y, 3, c=1e-3).weight.norm() < model.weight.norm()


def test_linear_probe_separates_blobs_and_searches_c():
    x, y = _blobs(30, 1)
    xt, yt = _blobs(10, 2)
    result = linear_probe(x, y, xt, yt, 3)
    assert result.top1 == 1.0
    grid = sorted(result.validation)
    assert grid[0] == -6.0 and grid[-1] == 6.0
    assert any(k != round(k) for k in grid)  # refined between the decades
    assert min(abs(a - b) for a, b in zip(grid, grid[1:])) == pytest.approx(0.125)
    assert result.to_dict()["n_train"] == 90


def test_choose_c_prefers_smaller_c_on_ties():
    x, y = _blobs(10, 3)
    c, scores = choose_c((x, y), (x, y), 3, max_iter=50)
    best = max(scores.values())
    assert math.log10(c) == min(k for k, v in scores.items() if v == best)


def test_split_validation_is_seeded_and_disjoint():
    tr, va = split_validation(10, 0.2, seed=0)
    assert len(va) == 2 and len(tr) == 8 and set(tr.tolist()).isdisjoint(va.tolist())
    assert torch.equal(va, split_validation(10, 0.2, seed=0)[1])
    with pytest.raises(ValueError, match="at least 2"):
        split_validation(1, 0.2, 0)
