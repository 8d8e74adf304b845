"""Paired comparison of two classifiers: exact McNemar per label, Holm, non-inferiority bounds."""

import math

import numpy as np
import pytest

from gata_ft.paired import compare, holm, mcnemar_p


def test_mcnemar_on_hand_computed_cases():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(0.5**10)  # every changed ticket went wrong
    assert mcnemar_p(2, 0) == 0.25
    assert mcnemar_p(3, 1) == pytest.approx(5 / 16)  # P(X >= 3), X ~ Bin(4, 1/2)
    assert mcnemar_p(1, 3, side="two") == pytest.approx(2 * 5 / 16)
    from scipy.stats import binomtest

    for worse, better in ((7, 2), (12, 9), (0, 5)):
        expected = binomtest(worse, worse + better, 0.5, alternative="greater").pvalue
        assert mcnemar_p(worse, better) == pytest.approx(expected)


def test_holm_on_a_hand_computed_case():
    # sorted 0.01, 0.02, 0.04 -> 3 x 0.01, 2 x 0.02, 1 x 0.04, kept increasing
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def labels_of(queues: int, per_queue: int) -> np.ndarray:
    return np.repeat(np.arange(queues), per_queue)


def test_random_flips_spread_over_labels_pass():
    # 151 queues of 30: fp32 right on 90%; int8 changes 2.5% of tickets, in both directions
    rng = np.random.default_rng(0)
    truth = labels_of(151, 30)
    reference = np.where(rng.random(len(truth)) < 0.9, truth, (truth + 1) % 151)
    candidate = reference.copy()
    right, wrong = np.flatnonzero(reference == truth), np.flatnonzero(reference != truth)
    lost, gained = rng.choice(right, 60, replace=False), rng.choice(wrong, 55, replace=False)
    candidate[lost] = (truth[lost] + 2) % 151  # a few changes either way, as int8 does
    candidate[gained] = truth[gained]
    result = compare(reference, candidate, truth, 151)
    assert result.agreement < 0.99
    assert result.harmed == []  # some queue losing 2 of 30 is noise, not harm
    assert max(t.worse for t in result.labels) >= 2
    assert result.accuracy_drop_bound < 1.0


def test_a_queue_that_loses_a_third_of_its_tickets_fails():
    truth = labels_of(20, 30)
    reference = truth.copy()
    candidate = truth.copy()
    candidate[truth == 7][:10] = 0
    candidate[np.flatnonzero(truth == 7)[:10]] = 8
    result = compare(reference, candidate, truth, 20)
    assert [t.class_id for t in result.harmed] == [7]
    harmed = result.harmed[0]
    assert (harmed.tickets, harmed.worse, harmed.better) == (30, 10, 0)
    assert harmed.p == pytest.approx(0.5**10)
    assert harmed.p_holm == pytest.approx(0.5**10)  # the only label with changed tickets
    assert result.accuracy_drop == pytest.approx(100 * 10 / 600)


def test_too_few_tickets_to_decide_is_said_so():
    truth = labels_of(40, 3)
    reference, candidate = truth.copy(), truth.copy()
    for queue in (3, 9):  # each loses all 3 of its tickets: 1/8 can never pass alpha / 2
        candidate[truth == queue] = (queue + 1) % 40
    result = compare(reference, candidate, truth, 40)
    assert result.harmed == []
    assert sorted(t.class_id for t in result.undecidable) == [3, 9]


def test_the_accuracy_bound_is_exact_on_discordant_pairs():
    from scipy.stats import beta

    truth = labels_of(10, 100)
    reference, candidate = truth.copy(), truth.copy()
    candidate[:12] = (truth[:12] + 1) % 10  # 12 lost
    reference[500:504] = (truth[500:504] + 1) % 10  # 4 gained
    result = compare(reference, candidate, truth, 10)
    assert (result.worse, result.better) == (12, 4)
    theta = beta.ppf(0.95, 13, 4)
    assert result.accuracy_drop_bound == pytest.approx(100 * 16 / 1000 * (2 * theta - 1))
    assert result.accuracy_drop == pytest.approx(0.8)
    assert result.f1_drop_bound >= result.f1_drop > 0
    assert not math.isnan(result.f1_drop_bound)
