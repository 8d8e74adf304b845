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
    shifted = scaled - scaled.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


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


def coverage_curve(probabilities: np.ndarray, labels: Sequence[int]) -> Curve:
    confidence, correct = top1(probabilities, labels)
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    routed = np.arange(1, len(confidence) + 1)
    accuracy = np.cumsum(correct) / routed
    # a threshold routes every ticket at or above it: keep the last index of each value
    last = np.r_[confidence[1:] != confidence[:-1], True]
    return Curve(confidence[last], routed[last] / len(confidence), accuracy[last])


def routing_report(probabilities, labels, threshold, label_names) -> dict:
    """Coverage and accuracy of routing at `threshold`, overall and per true label."""
    labels = np.asarray(labels)
    confidence, correct = top1(probabilities, labels)
    routed = confidence >= threshold if threshold is not None else np.zeros(len(labels), bool)

    def block(mask):
        n = int(mask.sum())
        sent = routed & mask
        return {
            "tickets": n,
            "coverage": float(sent.sum() / n) if n else 0.0,
            "accuracy": float(correct[sent].mean()) if sent.any() else None,
        }

    return {
        "threshold": threshold,
        **block(np.ones(len(labels), bool)),
        "per_class": {str(name): block(labels == c) for c, name in enumerate(label_names)},
    }
