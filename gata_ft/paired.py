"""Two classifiers on the same tickets, compared with paired statistics (numpy and math only).

Used by the parity gate (int8 against PyTorch fp32) and by promotion (a new
model against the one in service): only the tickets whose outcome changed say
anything, so every test is on those discordant pairs (exact McNemar).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gata_ft.metrics import Scores, clopper_pearson


def mcnemar_p(worse: int, better: int, side: str = "worse") -> float:
    """Exact McNemar p-value on discordant pairs: `worse` went wrong, `better` went right.

    side "worse": one-sided, that the candidate is worse (P(X >= worse), X ~ Bin(n, 1/2));
    side "two": two-sided (twice the smaller tail, at most 1).
    """
    n = worse + better
    if n == 0:
        return 1.0

    def tail(k: int) -> float:  # P(X >= k)
        return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n

    if side == "worse":
        return tail(worse)
    return min(1.0, 2 * tail(max(worse, better)))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment: family-wise error control over the labels tested."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class LabelTest:
    """One label's tickets: how many the candidate got wrong that the reference got right."""

    class_id: int
    tickets: int
    worse: int  # right before, wrong now
    better: int  # wrong before, right now
    p: float  # one-sided exact McNemar
    p_holm: float


@dataclass
class Comparison:
    """The candidate against the reference: figures, bounds and per-label tests."""

    reference: Scores
    candidate: Scores
    agreement: float  # same top-1 label
    worse: int
    better: int
    accuracy_drop_bound: float  # points, one-sided upper bound at 1 - alpha
    f1_drop_bound: float  # points, paired bootstrap quantile at 1 - alpha
    labels: list[LabelTest] = field(default_factory=list)  # those with changed tickets
    undecidable: list[LabelTest] = field(default_factory=list)  # lost tickets, too few to tell
    alpha: float = 0.05

    @property
    def accuracy_drop(self) -> float:
        return 100 * (self.reference.accuracy - self.candidate.accuracy)

    @property
    def f1_drop(self) -> float:
        return 100 * (self.reference.f1_macro - self.candidate.f1_macro)

    @property
    def harmed(self) -> list[LabelTest]:
        """Labels the candidate is significantly worse on, after Holm's correction."""
        return [t for t in self.labels if t.p_holm <= self.alpha and t.worse > t.better]


def compare(
    reference_pred,
    candidate_pred,
    truth,
    num_classes: int,
    alpha: float = 0.05,
    resamples: int = 1000,
    seed: int = 0,
) -> Comparison:
    """Paired comparison of two label predictions for the same tickets against the truth."""
    reference_pred, candidate_pred = np.asarray(reference_pred), np.asarray(candidate_pred)
    truth = np.asarray(truth)
    right_before, right_now = reference_pred == truth, candidate_pred == truth
    lost, gained = right_before & ~right_now, ~right_before & right_now
    worse, better = int(lost.sum()), int(gained.sum())
    n = len(truth)

    # accuracy drop = (worse - better) / n = d (2 theta - 1) / n, theta = worse / d
    changed = worse + better
    bound = 0.0
    if changed:
        theta = float(clopper_pearson(worse, changed, 1 - alpha, "upper"))
        bound = 100 * changed / n * (2 * theta - 1)

    tested = []
    for c in range(num_classes):
        mine = truth == c
        w, b = int((lost & mine).sum()), int((gained & mine).sum())
        if w + b:
            tested.append((c, int(mine.sum()), w, b, mcnemar_p(w, b)))
    adjusted = holm([t[4] for t in tested])
    labels = [LabelTest(*t, p_holm=a) for t, a in zip(tested, adjusted, strict=True)]
    # Even losing every changed ticket could not pass Holm's strictest level alpha / m
    too_few = alpha / max(len(labels), 1)
    undecidable = [
        t for t in labels if t.worse > t.better and 0.5 ** (t.worse + t.better) > too_few
    ]
    return Comparison(
        reference=Scores.of(reference_pred, truth, num_classes),
        candidate=Scores.of(candidate_pred, truth, num_classes),
        agreement=float((reference_pred == candidate_pred).mean()) if n else 1.0,
        worse=worse,
        better=better,
        accuracy_drop_bound=bound,
        f1_drop_bound=_f1_drop_bound(
            reference_pred, candidate_pred, truth, num_classes, alpha, resamples, seed
        ),
        labels=labels,
        undecidable=undecidable,
        alpha=alpha,
    )


def _f1_drop_bound(reference, candidate, truth, k: int, alpha, resamples: int, seed: int):
    """Upper (1 - alpha) quantile of the macro-F1 drop over paired bootstrap resamples."""
    if not len(truth) or np.array_equal(reference, candidate):
        return 0.0
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(truth), np.full(len(truth), 1 / len(truth)), size=resamples)
    drops = np.empty(resamples)
    for i, w in enumerate(weights):
        before = np.bincount(truth * k + reference, w, k * k).reshape(k, k)
        after = np.bincount(truth * k + candidate, w, k * k).reshape(k, k)
        drops[i] = Scores(before).f1_macro - Scores(after).f1_macro
    return float(100 * np.quantile(drops, 1 - alpha))
