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


def traffic(rng, n_in=600, n_out=150, far=6.0):
    """Confident in-scope tickets near their queue and out-of-scope ones, labelled fallback (2).

    Queue 0 and 1 are in scope; out-of-scope tickets are predicted as queue 0 or 1
    with the same confidences, but lie `far` from every queue.
    """
    labels = np.r_[rng.integers(0, 2, n_in), np.full(n_out, 2)]
    top = np.r_[rng.uniform(0.6, 1.0, n_in), rng.uniform(0.6, 1.0, n_out)]
    right = rng.random(n_in) < top[:n_in]  # calibrated: right with its probability
    predicted = np.r_[np.where(right, labels[:n_in], 1 - labels[:n_in]), rng.integers(0, 2, n_out)]
    probabilities = np.full((n_in + n_out, 3), 0.0)
    probabilities[np.arange(n_in + n_out), predicted] = top
    probabilities[np.arange(n_in + n_out), np.where(predicted == 0, 1, 0)] = 1 - top
    distances = np.r_[rng.gamma(2.0, 1.0, n_in), far + rng.gamma(2.0, 1.0, n_out)]
    return probabilities, labels, distances


def test_a_channel_with_out_of_scope_traffic_gets_a_distance_threshold():
    rng = np.random.default_rng(0)
    probabilities, labels, distances = traffic(rng)
    scoped = cal.choose_thresholds(probabilities, labels, 0.9, distances=distances,
                                   fallback_class=2)  # fmt: skip
    blind = cal.choose_thresholds(probabilities, labels, 0.9)
    assert scoped.threshold is not None
    assert scoped.distance_threshold < 6.0 + 0.5  # the far tickets are cut off
    assert scoped.coverage > blind.coverage  # confidence alone must give up more tickets
    routed = cal.RoutingRule(scoped.threshold, scoped.distance_threshold, 2).route(
        probabilities, distances
    )
    correct = probabilities.argmax(-1) == labels
    assert correct[routed].mean() >= 0.9


def test_the_assumed_share_is_routed_as_often_as_the_misrouted_rows_are():
    from scipy.stats import beta

    rng = np.random.default_rng(1)
    probabilities, labels, distances = traffic(rng, n_out=0)
    kwargs = {"distances": distances, "fallback_class": 2, "min_rejection": 0.01}
    none = cal.choose_thresholds(probabilities, labels, 0.9, **kwargs, out_of_scope_share=0.0)
    assumed = cal.choose_thresholds(probabilities, labels, 0.9, **kwargs, out_of_scope_share=0.3)
    assert none.out_of_scope_pass is None
    assert none.coverage > assumed.coverage  # the assumption costs tickets
    # the figures, recomputed by hand at the chosen thresholds
    top, predicted = probabilities.max(-1), probabilities.argmax(-1)
    wrong = predicted != labels
    routed = (top >= assumed.threshold) & (distances <= assumed.distance_threshold)
    k, n, m = int((routed & ~wrong).sum()), int(routed.sum()), int(wrong.sum())
    passed = beta.ppf(0.75, n - k + 1, m - (n - k))  # misrouted rows that pass, 75% upper
    assert assumed.out_of_scope_pass == pytest.approx(passed)
    c, a = n / len(labels), beta.ppf(0.1, k, n - k + 1)
    bound = 0.7 * c * a / (0.7 * c + 0.3 * passed)
    assert assumed.coverage == pytest.approx(0.7 * c + 0.3 * passed)
    assert assumed.accuracy_bound == pytest.approx(bound)
    assert bound >= 0.9
    # a model that is confidently wrong lets out-of-scope tickets through: fewer routed
    confident = probabilities.copy()
    rows = np.flatnonzero(wrong)
    confident[rows] = 0.0
    confident[rows, predicted[rows]] = 0.99  # the same wrong answers, sure of themselves
    confident[rows, 1 - predicted[rows]] = 0.01
    worse = cal.choose_thresholds(confident, labels, 0.9, **kwargs, out_of_scope_share=0.3)
    assert worse.threshold is None or worse.coverage < assumed.coverage


def rows_for(probabilities, labels, distances):
    logits = np.log(np.clip(probabilities, 1e-9, 1))
    features = np.c_[distances, np.zeros(len(distances))]  # distance along one axis
    return cal.Rows(logits, labels, features)


def test_thresholds_never_read_the_test_set():
    rng = np.random.default_rng(2)
    train = rows_for(*traffic(rng, n_out=0))
    held = rows_for(*traffic(rng))
    test = rows_for(*traffic(rng))
    options = cal.Options(target=0.9, fallback_class=2, min_rejection=0.01, channel=True)
    first = cal.calibrate(train, held, test, options, [10, 11, 12])
    scrambled = cal.Rows(test.logits[::-1], rng.permutation(test.class_ids), test.features * 3)
    second = cal.calibrate(train, held, scrambled, options, [10, 11, 12])
    assert first.rule == second.rule
    assert first.result["temperature"] == second.result["temperature"]
    assert first.result["routing_test"] != second.result["routing_test"]


def test_a_missed_target_is_reported_and_warned_about():
    from gata_ft.reports import describe_calibration, routing_shortfall

    rng = np.random.default_rng(3)
    train = rows_for(*traffic(rng, n_out=0))
    held = rows_for(*traffic(rng))
    p, y, d = traffic(rng)
    wrong = cal.Rows(np.log(np.clip(p, 1e-9, 1)), (y + 1) % 2, np.c_[d, np.zeros(len(d))])
    options = cal.Options(target=0.9, fallback_class=2, channel=True)
    result = cal.calibrate(train, held, wrong, options, [10, 11, 12]).result
    assert result["meets_target"] is False
    _, high = result["routing_test"]["interval"]
    assert high < 0.9
    lines = describe_calibration(result)
    assert lines[-1].startswith(f"WARNING: {routing_shortfall(result)}. Give the job")
    assert routing_shortfall(result).startswith("the routed accuracy on the test set, ")


def test_a_worse_test_nll_after_scaling_is_warned_about():
    from gata_ft.reports import describe_calibration

    result = {
        "source": "calibration split",
        "calibration_rows": 80,
        "temperature": 0.46,
        "test": {"ece_before": 0.3, "ece_after": 0.05, "nll_before": 1.393, "nll_after": 1.455},
        "target_accuracy": 0.95,
        "threshold": None,
    }
    lines = describe_calibration(result)
    assert lines[1] == (
        "WARNING: temperature scaling made the test NLL worse (1.3930 -> 1.4550): the "
        "calibration split does not look like the test tickets (another label mix, or tickets "
        "no queue owns), so probabilities can be over- or under-confident on such traffic"
    )


def test_no_misrouted_rows_means_out_of_scope_tickets_are_assumed_to_pass():
    rng = np.random.default_rng(3)
    probabilities, labels, distances = traffic(rng, n_out=0)
    right = probabilities.copy()
    right[np.arange(len(labels)), labels] = right.max(-1)  # every row right: no stand-in
    right[np.arange(len(labels)), 1 - labels] = 1 - right.max(-1)
    kwargs = {"distances": distances, "fallback_class": 2, "min_rejection": 0.01}
    assert cal.choose_thresholds(right, labels, 0.9, **kwargs).threshold is not None
    assumed = cal.choose_thresholds(right, labels, 0.9, **kwargs, out_of_scope_share=0.3)
    # p = 1: at most 70% of what is routed can be right, below 0.9
    assert assumed.threshold is None


def test_rows_predicted_as_the_fallback_queue_count_as_misrouted():
    rng = np.random.default_rng(4)
    probabilities, labels, distances = traffic(rng, n_out=0)
    to_fallback = np.flatnonzero(labels == 0)[:20]
    probabilities[to_fallback] = [0.05, 0.05, 0.9]  # in scope, predicted as the fallback queue
    wrong = probabilities.argmax(-1) != labels
    choice = cal.choose_thresholds(probabilities, labels, 0.9, distances=distances,
                                   fallback_class=2, out_of_scope_share=0.2)  # fmt: skip
    assert choice.misrouted_rows == int(wrong.sum())
    assert choice.misrouted_rows >= 20
