"""Every figure gata-ft reports, computed once: classification scores, calibration, routing.

numpy only, so that the torch-free runtime computes the same figures as the
training job. The job's report, the parity gate and the Trainer's
`compute_metrics` (through the evaluate module in metric_modules/) take their
classification figures from `Scores`, which derives them from the confusion
matrix; calibration (ECE, NLL) and routing figures (coverage, routed accuracy)
are here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

ECE_BINS = 15
SCALARS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "precision_macro",
    "recall_macro",
    "f1_macro",
)


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in the logits' own float precision."""
    scaled = np.asarray(logits)
    if not np.issubdtype(scaled.dtype, np.floating):
        scaled = scaled.astype(np.float64)
    if temperature != 1.0:
        scaled = scaled / temperature
    exp = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    exp /= exp.sum(axis=-1, keepdims=True)
    return exp


def unsure(probabilities, below: float) -> np.ndarray:
    """(n,) booleans: the rows whose top probability is below `below` (escalated to fp32).

    `probabilities`: softmax of the int8 graph's float32 logits, as the parity gate
    and the runtime both compute them, so both escalate the same tickets.
    """
    return np.asarray(probabilities).max(-1) < below


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


@dataclass(frozen=True, eq=False)
class Scores:
    """Single-label classification figures, all from one confusion matrix (rows: true)."""

    confusion: np.ndarray

    @classmethod
    def of(cls, predictions, references, num_classes: int) -> Scores:
        matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(matrix, (np.asarray(references, int), np.asarray(predictions, int)), 1)
        return cls(matrix)

    @cached_property
    def support(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @cached_property
    def precision(self) -> np.ndarray:
        return _ratio(np.diag(self.confusion), self.confusion.sum(axis=0))

    @cached_property
    def recall(self) -> np.ndarray:
        return _ratio(np.diag(self.confusion), self.support)

    @cached_property
    def f1(self) -> np.ndarray:
        tp = np.diag(self.confusion)
        errors = self.confusion.sum(axis=0) + self.support - 2 * tp  # false positives + negatives
        return _ratio(2 * tp, 2 * tp + errors)

    @property
    def accuracy(self) -> float:
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else 0.0

    @property
    def present(self) -> np.ndarray:
        """Classes in the references or the predictions: the ones averages run over."""
        return (self.support > 0) | (self.confusion.sum(axis=0) > 0)

    def averaged(self, average: str) -> dict[str, float]:
        """precision, recall, f1 averaged "macro" (each class alike) or "weighted" (by support)."""
        mask = self.present
        weights = np.ones(mask.sum()) if average == "macro" else self.support[mask].astype(float)
        total = weights.sum()
        return {
            name: float((getattr(self, name)[mask] * weights).sum() / total) if total else 0.0
            for name in ("precision", "recall", "f1")
        }

    @property
    def f1_macro(self) -> float:
        return self.averaged("macro")["f1"]

    def scalars(self) -> dict[str, float]:
        weighted, macro = self.averaged("weighted"), self.averaged("macro")
        result = {"accuracy": self.accuracy}
        for name in ("precision", "recall", "f1"):
            result[name] = weighted[name]
            result[f"{name}_macro"] = macro[name]
        return {name: result[name] for name in SCALARS}

    def to_dict(self) -> dict:
        """The evaluate module's result: scalars, per-class lists and the confusion matrix."""
        return {
            **self.scalars(),
            "per_class": {
                "precision": self.precision.tolist(),
                "recall": self.recall.tolist(),
                "f1": self.f1.tolist(),
                "support": self.support.tolist(),
            },
            "confusion_matrix": self.confusion.tolist(),
        }


def top1(probabilities: np.ndarray, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 confidence of each ticket, and whether its top-1 label is right."""
    return probabilities.max(axis=-1), probabilities.argmax(axis=-1) == np.asarray(labels)


def nll(probabilities: np.ndarray, labels: Sequence[int]) -> float:
    """Mean negative log-likelihood of the true class."""
    picked = probabilities[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def bin_of(confidence: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Equal-width (lower, upper] bins, as in Guo et al. 2017; a confidence of 0 cannot occur."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)


def ece(probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin,
    weighted by the bin's share of the tickets (top-1 confidence)."""
    confidence, correct = top1(probabilities, labels)
    which = bin_of(confidence, bins)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total)


@dataclass(frozen=True)
class Curve:
    """Routing at every threshold: share of tickets routed and accuracy on those."""

    thresholds: np.ndarray
    coverage: np.ndarray
    accuracy: np.ndarray


def coverage_curve(probabilities: np.ndarray, labels: Sequence[int], eligible=None) -> Curve:
    """Coverage and routed accuracy at every probability threshold.

    Only `eligible` tickets (in scope, not predicted as the fallback queue) can
    be routed; coverage is a share of all tickets.
    """
    confidence, correct = top1(probabilities, labels)
    total = len(confidence)
    if eligible is not None:
        confidence, correct = confidence[eligible], correct[eligible]
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    routed = np.arange(1, len(confidence) + 1)
    accuracy = np.cumsum(correct) / routed
    # a threshold routes every ticket at or above it: keep the last index of each value
    last = np.r_[confidence[1:] != confidence[:-1], True] if len(confidence) else []
    return Curve(confidence[last], routed[last] / max(total, 1), accuracy[last])


def routing_report(routed, correct, labels, label_names, confidence: float = 0.95) -> dict:
    """Coverage and accuracy of the routed tickets, with a two-sided Clopper-Pearson
    interval at `confidence`, overall and per true label."""
    routed, correct, labels = np.asarray(routed), np.asarray(correct), np.asarray(labels)

    def block(mask):
        n, sent = int(mask.sum()), routed & mask
        hits, count = int(correct[sent].sum()), int(sent.sum())
        return {
            "tickets": n,
            "coverage": float(count / n) if n else 0.0,
            "accuracy": hits / count if count else None,
            "interval": list(accuracy_interval(hits, count, confidence)) if count else None,
        }

    return {
        **block(np.ones(len(labels), bool)),
        "per_class": {str(name): block(labels == c) for c, name in enumerate(label_names)},
    }


def auroc(in_scope: np.ndarray, out_of_scope: np.ndarray) -> float | None:
    """Area under the ROC curve of a score that should be higher in scope (ties count half)."""
    if len(in_scope) == 0 or len(out_of_scope) == 0:
        return None
    scores = np.concatenate([in_scope, out_of_scope]).astype(np.float64)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2)[inverse]  # average rank within ties, from 1
    n1, n0 = len(in_scope), len(out_of_scope)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _log_beta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """-log B(a, b), elementwise."""
    from math import lgamma

    return np.vectorize(lambda p, q: lgamma(p + q) - lgamma(p) - lgamma(q), otypes=[float])(a, b)


def _betainc(a: np.ndarray, b: np.ndarray, x: np.ndarray, lbeta: np.ndarray) -> np.ndarray:
    """Regularised incomplete beta I_x(a, b), elementwise (continued fraction, Lentz)."""
    inside = (x > 0) & (x < 1)
    xs = np.where(inside, x, 0.5)
    flip = xs >= (a + 1) / (a + b + 2)  # the fraction converges fast on this side only
    p, q, y = np.where(flip, b, a), np.where(flip, a, b), np.where(flip, 1 - xs, xs)
    front = np.exp(p * np.log(y) + q * np.log1p(-y) + lbeta) / p
    tiny = 1e-300
    c, d = np.ones_like(y), 1 - (p + q) * y / (p + 1)
    d = 1 / np.where(np.abs(d) < tiny, tiny, d)
    fraction = d.copy()
    for m in range(1, 1000):
        for numerator in (
            m * (q - m) * y / ((p + 2 * m - 1) * (p + 2 * m)),
            -(p + m) * (p + q + m) * y / ((p + 2 * m) * (p + 2 * m + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1 + numerator / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            step = c * d
            fraction = fraction * step
        if np.all(np.abs(step - 1) < 1e-14):
            break
    value = front * fraction
    value = np.where(flip, 1 - value, value)
    return np.where(inside, value, np.where(x <= 0, 0.0, 1.0))


def beta_ppf(probability: float, a, b) -> np.ndarray:
    """The `probability` quantile of Beta(a, b), elementwise (bisection on _betainc)."""
    a, b = np.broadcast_arrays(np.asarray(a, float), np.asarray(b, float))
    lbeta = _log_beta(a, b)
    low, high = np.zeros(a.shape), np.ones(a.shape)
    for _ in range(50):  # 2**-50: below any difference a count can make
        middle = (low + high) / 2
        below = _betainc(a, b, middle, lbeta) < probability
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return (low + high) / 2


def clopper_pearson(correct, total, confidence: float, side: str) -> np.ndarray:
    """One-sided Clopper-Pearson bound ("lower" or "upper") of correct / total, elementwise.

    The bound holds with `confidence`; an empty count gives 0 (lower) or 1 (upper).
    Equal (correct, total) pairs are computed once.
    """
    k, n = np.broadcast_arrays(np.asarray(correct, float), np.asarray(total, float))
    pairs, inverse = np.unique(np.stack([k.ravel(), n.ravel()]), axis=1, return_inverse=True)
    k_, n_ = pairs
    if side == "lower":
        edge, a, b = k_ <= 0, np.maximum(k_, 1), n_ - k_ + 1
        bound = np.where(edge, 0.0, beta_ppf(1 - confidence, a, b))
    else:
        edge, a, b = k_ >= n_, k_ + 1, np.maximum(n_ - k_, 1)
        bound = np.where(edge, 1.0, beta_ppf(confidence, a, b))
    return bound[inverse.ravel()].reshape(k.shape)


def accuracy_interval(correct, total, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of correct / total (each side at (1 + confidence) / 2)."""
    one_side = (1 + confidence) / 2
    return (
        float(clopper_pearson(correct, total, one_side, "lower")),
        float(clopper_pearson(correct, total, one_side, "upper")),
    )


def out_of_scope_figures(class_ids, probabilities, distance, routed, fallback) -> dict | None:
    """Figures on the tickets labelled with the fallback queue (those no queue owns)."""
    if fallback is None:
        return None
    outside = np.asarray(class_ids) == fallback
    if not outside.any():
        return {"tickets": 0}
    top = probabilities.max(-1)
    return {
        "tickets": int(outside.sum()),
        "routed": float(np.asarray(routed)[outside].mean()),
        "auroc_probability": auroc(top[~outside], top[outside]),
        "auroc_distance": None
        if distance is None
        else auroc(-np.asarray(distance)[~outside], -np.asarray(distance)[outside]),
    }
