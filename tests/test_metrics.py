"""Every reported figure from one implementation: classification scores, ECE, NLL, routing."""

import numpy as np
import pytest

from gata_ft import metrics, reports


def test_metrics_match_a_hand_computed_case():
    # true:      0 0 0 1 1 2
    # predicted: 0 0 1 1 2 2
    result = reports.compute([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2], num_classes=4)
    assert result["accuracy"] == pytest.approx(4 / 6)
    # class 0: p=2/2 r=2/3; class 1: p=1/2 r=1/2; class 2: p=1/2 r=1/1
    assert result["per_class"]["precision"] == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert result["per_class"]["recall"] == pytest.approx([2 / 3, 0.5, 1.0, 0.0])
    assert result["per_class"]["support"] == [3, 2, 1, 0]
    f1 = [0.8, 0.5, 2 / 3]
    assert result["f1_macro"] == pytest.approx(sum(f1) / 3)  # class 3 is absent: not averaged
    assert result["f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert result["recall"] == pytest.approx(result["accuracy"])
    assert result["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_ece_and_nll_match_a_hand_computed_case():
    # top-1 confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    labels = [0, 1, 1, 0]
    # bin (0.867, 0.933]: accuracy 0.5, confidence 0.9 -> 0.4 x 2/4; bin (0.533, 0.6]: 1.0 vs 0.6
    assert metrics.ece(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert metrics.nll(probs, labels) == pytest.approx(
        -(np.log(0.9) + np.log(0.1) + 2 * np.log(0.6)) / 4
    )
    assert metrics.ece(np.array([[1.0, 0.0], [0.0, 1.0]]), [0, 1]) == 0.0


def test_coverage_curve_on_a_hand_case():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.8, 0.2], [0.3, 0.7]])
    curve = metrics.coverage_curve(probs, [0, 1, 0, 1])
    assert curve.thresholds.tolist() == [0.9, 0.8, 0.7]
    assert curve.coverage.tolist() == [0.25, 0.75, 1.0]
    assert curve.accuracy.tolist() == pytest.approx([1.0, 2 / 3, 0.75])
    routed = probs.max(-1) >= 0.8
    correct = probs.argmax(-1) == np.array([0, 1, 0, 1])
    report = metrics.routing_report(routed, correct, [0, 1, 0, 1], ["a", "b"])
    assert (report["coverage"], report["accuracy"]) == (0.75, pytest.approx(2 / 3))
    assert report["per_class"]["b"] == {
        "tickets": 2,
        "coverage": 0.5,
        "accuracy": 0.0,
        "interval": [0.0, pytest.approx(0.975)],  # 0 of 1: the upper bound is 0.975
    }
    eligible = np.array([True, False, True, True])
    curve = metrics.coverage_curve(probs, [0, 1, 0, 1], eligible)
    assert curve.coverage.tolist() == [0.25, 0.5, 0.75]  # a share of all four tickets
    assert curve.accuracy.tolist() == [1.0, 1.0, 1.0]  # the wrong ticket was not eligible


def test_scores_equal_scikit_learn_on_random_cases():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    for _ in range(300):
        k, n = int(rng.integers(2, 12)), int(rng.integers(1, 60))
        truth = rng.integers(0, k, n)
        predicted = np.where(rng.random(n) < 0.6, truth, rng.integers(0, k, n))
        scores = metrics.Scores.of(predicted, truth, k)
        assert scores.accuracy == accuracy_score(truth, predicted)
        for average in ("weighted", "macro"):
            p, r, f, _ = precision_recall_fscore_support(
                truth, predicted, average=average, zero_division=0
            )
            assert scores.averaged(average) == pytest.approx(
                {"precision": p, "recall": r, "f1": f}, abs=1e-12
            )
        p, r, f, support = precision_recall_fscore_support(
            truth, predicted, labels=list(range(k)), average=None, zero_division=0
        )
        np.testing.assert_allclose(scores.precision, p, atol=1e-12)
        np.testing.assert_allclose(scores.recall, r, atol=1e-12)
        np.testing.assert_allclose(scores.f1, f, atol=1e-12)
        assert scores.support.tolist() == support.tolist()


def test_softmax_keeps_the_precision_of_its_input():
    logits = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    assert metrics.softmax(logits).dtype == np.float32
    assert metrics.softmax(logits.astype(np.float64), 2.0).dtype == np.float64
    np.testing.assert_allclose(
        metrics.softmax(logits, 2.0), metrics.softmax(logits / 2.0), rtol=1e-6
    )
    np.testing.assert_allclose(metrics.softmax(logits).sum(-1), 1.0, rtol=1e-6)


def test_unsure_is_the_top_probability_below_the_cut():
    # top probabilities 0.5 exactly (not below 0.5), 0.79, 1/3, 0.73 and 0.95 (huge logits)
    logits = np.array(
        [[0, 0, -np.inf], [2, 0, 0], [0, 0, 0], [1000, 999, -1000], [-1e4, -1e4 + 3, -1e5]]
    )
    assert metrics.unsure(metrics.softmax(logits), 0.5).tolist() == [F, F, T, F, F]
    assert metrics.unsure(metrics.softmax(logits), 0.9).tolist() == [T, T, T, T, F]
    assert metrics.unsure(np.zeros((0, 3)), 0.5).shape == (0,)


T, F = True, False
