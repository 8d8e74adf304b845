"""Calibration math: the split, temperature scaling and the routing threshold."""

import numpy as np
import pytest

from gata_ft import calibration as cal
from gata_ft import metrics


def test_temperature_scaling_fixes_an_overconfident_model():
    rng = np.random.default_rng(0)
    honest = rng.normal(size=(4000, 5)) * 1.5
    labels = [
        rng.choice(5, p=row) for row in metrics.softmax(honest)
    ]  # honest logits are calibrated
    overconfident = honest * 4.0
    temperature = cal.fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(4.0, rel=0.1)
    before, after = metrics.softmax(overconfident), metrics.softmax(overconfident, temperature)
    assert metrics.nll(after, labels) < metrics.nll(before, labels) - 0.5
    assert metrics.ece(after, labels) < 0.03 < metrics.ece(before, labels)
    assert (after.argmax(-1) == before.argmax(-1)).all()  # routing decisions unchanged


def test_threshold_is_the_lowest_that_meets_the_target_on_its_split():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2000, 4)) * 2
    probs = metrics.softmax(logits)
    labels = [rng.choice(4, p=row) for row in probs]
    from scipy.stats import beta

    threshold = cal.recommend_threshold(probs, labels, target=0.9)
    correct = probs.argmax(-1) == np.array(labels)

    def lower_bound(t):  # one-sided 90% Clopper-Pearson, computed here from scratch
        routed = probs.max(-1) >= t
        k, n = int(correct[routed].sum()), int(routed.sum())
        return beta.ppf(0.1, k, n - k + 1)

    routed = probs.max(-1) >= threshold
    assert correct[routed].mean() >= 0.9  # the target holds on the split it was chosen on
    assert lower_bound(threshold) >= 0.9  # ... with 90% confidence
    lower = np.sort(np.unique(probs.max(-1)))
    for t in lower[lower < threshold][-20:]:  # every lower threshold misses it
        assert lower_bound(t) < 0.9
    assert cal.recommend_threshold(probs, labels, target=1.01) is None


def test_calibration_split_is_stratified_seeded_and_spares_tiny_classes():
    labels = [1] * 100 + [2] * 20 + [3] * 4
    train, held = cal.split_for_calibration(labels, 0.1, seed=7)
    assert sorted(train + held) == list(range(len(labels)))
    counts = {c: sum(labels[i] == c for i in held) for c in (1, 2, 3)}
    assert counts == {1: 10, 2: 2, 3: 0}  # 4 rows: all kept for training
    assert cal.split_for_calibration(labels, 0.1, seed=7) == (train, held)
    assert cal.split_for_calibration(labels, 0.1, seed=8) != (train, held)
    assert cal.split_for_calibration(labels, 0.0, seed=7) == (list(range(len(labels))), [])
