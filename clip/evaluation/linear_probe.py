"""Linear probe: L2-regularised multinomial logistic regression on frozen, unit-norm image features.

As in the CLIP paper (Radford et al., 2021, appendix A.3): L-BFGS logistic regression, with the regularisation
chosen on a validation split by a parametric binary search: evaluate C in {1e-6, 1e-4, ..., 1e6}, then
repeatedly try the two points halfway to the neighbours of the best C, until the grid has 8 steps per decade.
The final model is refit on train + validation with the chosen C and scored on the test set.

C is sklearn's inverse strength: the objective is ``C * sum(cross-entropy) + 0.5 * ||W||^2`` (bias not
penalised), minimised here in the equivalent form ``mean(cross-entropy) + ||W||^2 / (2 C N)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class LogisticRegression:
    """Fitted weights: logits = features @ weight + bias."""

    weight: torch.Tensor  # [D, C]
    bias: torch.Tensor  # [C]
    c: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, D] -> logits [N, C]."""
        return features.to(self.weight.dtype) @ self.weight + self.bias


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    c: float,
    max_iter: int = 1000,
    init: LogisticRegression | None = None,
) -> LogisticRegression:
    """Minimise mean CE + ||W||^2 / (2 C N) over W [D, C], b [C] with L-BFGS (strong Wolfe line search).

    features [N, D] (float), labels [N] in 0..num_classes-1. `init` warm-starts from a previous fit.
    """
    if c <= 0:
        raise ValueError(f"C must be positive, got {c}")
    x = features.double()  # float64: the weakly regularised end of the sweep is badly conditioned
    y = labels.long()
    n, d = x.shape
    w = init.weight.detach().clone().double() if init else torch.zeros(d, num_classes, dtype=torch.float64)
    b = init.bias.detach().clone().double() if init else torch.zeros(num_classes, dtype=torch.float64)
    w.requires_grad_(True)
    b.requires_grad_(True)
    penalty = 1.0 / (2.0 * c * n)
    # Stopping rule as sklearn's lbfgs solver, which OpenAI used: gradient max-norm below tol=1e-4 (on this
    # same mean-scaled objective) or max_iter iterations.
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-4,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + penalty * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticRegression(w.detach(), b.detach(), c)


def _accuracy(model: LogisticRegression, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model.logits(features).argmax(dim=1) == labels.to(model.weight.device)).double().mean())


def choose_c(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    max_iter: int = 1000,
    steps_per_decade: int = 8,
) -> tuple[float, dict[float, float]]:
    """Parametric binary search for C on a validation split -> (best C, {log10 C: validation accuracy}).

    Ties go to the smaller C (stronger regularisation).
    """
    fits: dict[float, LogisticRegression] = {}
    scores: dict[float, float] = {}

    def score(log_c: float) -> float:
        if log_c not in scores:
            nearest = min(fits, key=lambda k: abs(k - log_c), default=None)
            model = fit_logistic_regression(
                *train, num_classes, 10.0**log_c, max_iter, fits[nearest] if nearest is not None else None
            )
            fits[log_c] = model
            scores[log_c] = _accuracy(model, *val)
        return scores[log_c]

    def best() -> float:
        return max(sorted(scores), key=lambda k: scores[k])  # first max in ascending C: smaller C wins ties

    for log_c in range(-6, 7, 2):
        score(float(log_c))
    step = 1.0
    while step >= 1.0 / steps_per_decade:
        center = best()
        for log_c in (center - step, center + step):
            if -6.0 <= log_c <= 6.0:
                score(log_c)
        step /= 2
    return 10.0 ** best(), scores


@dataclass
class LinearProbeResult:
    """Test accuracy of the refit probe, the chosen C and the validation curve."""

    top1: float
    c: float
    validation: dict[float, float] = field(default_factory=dict)  # log10 C -> validation accuracy
    n_train: int = 0
    n_test: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "top1": self.top1,
            "C": self.c,
            "validation_accuracy_by_log10_C": {f"{k:g}": v for k, v in sorted(self.validation.items())},
            "n_train": self.n_train,
            "n_test": self.n_test,
        }


def split_validation(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of range(n) -> (train indices, validation indices), both non-empty."""
    if n < 2:
        raise ValueError(
            f"a linear probe needs at least 2 training images to hold out a validation split, got {n}"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"validation fraction must lie strictly between 0 and 1, got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> LinearProbeResult:
    """Choose C on a held-out part of the training features, refit on all of them, score the test features.

    Features are unit-normalised here (the CLIP recipe); labels [N] in 0..num_classes-1.
    """
    train_x, test_x = (
        F.normalize(train_features.double(), dim=-1),
        F.normalize(test_features.double(), dim=-1),
    )
    train_y, test_y = train_labels.long(), test_labels.long()
    if len(test_y) == 0:
        raise ValueError("the test set is empty")
    tr, va = split_validation(len(train_y), val_fraction, seed)
    c, curve = choose_c((train_x[tr], train_y[tr]), (train_x[va], train_y[va]), num_classes, max_iter)
    model = fit_logistic_regression(train_x, train_y, num_classes, c, max_iter)
    return LinearProbeResult(_accuracy(model, test_x, test_y), c, curve, len(train_y), len(test_y))
