"""The out-of-scope score: Mahalanobis distance to the nearest queue, whitened once."""

import numpy as np
import pytest

from gata_ft.errors import ArtifactError
from gata_ft.scope import RoutingRule, Scope


def hand_scope() -> Scope:
    # covariance diag(4, 1): whitening diag(1/2, 1); means (0, 0) and (4, 0)
    whitening = np.diag([0.5, 1.0]).astype(np.float32)
    means = np.array([[0.0, 0.0], [4.0, 0.0]]) @ whitening
    return Scope(whitening, means.astype(np.float32), np.array([3, 7]))


def test_distance_on_a_hand_computed_case():
    scope = hand_scope()
    x = np.array([[1.0, 0.0], [4.0, 2.0]])
    # (1, 0): sqrt(1/4) = 0.5 from (0, 0), sqrt(9/4) = 1.5 from (4, 0)
    # (4, 2): sqrt(16/4 + 4) = 2.83 from (0, 0), sqrt(0 + 4) = 2 from (4, 0)
    np.testing.assert_allclose(scope.distance(x), [0.5, 2.0], rtol=1e-6)


def test_whitening_equals_the_direct_distance():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 3
    labels = np.repeat(np.arange(4), 50)
    features = centres[labels] + rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    scope = Scope.fit(features, labels, exclude=[3])
    assert scope.classes.tolist() == [0, 1, 2]
    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    centred = np.concatenate([features[labels == c] - means[c] for c in range(3)])
    precision = LedoitWolf().fit(centred).precision_
    new = rng.normal(size=(20, 6)) * 4
    direct = np.sqrt(
        np.min([np.einsum("ij,jk,ik->i", new - m, precision, new - m) for m in means], axis=0)
    )
    np.testing.assert_allclose(scope.distance(new), direct, rtol=1e-4)


def test_distance_gives_the_figures_of_the_plain_formula_one_ticket_at_a_time():
    # as the runtime scores: one row at a time, 384 features, 77 queues (BLAS's
    # matrix-vector path, whose summation order follows the matrix's layout)
    rng = np.random.default_rng(1)
    whitening = rng.normal(size=(384, 384)).astype(np.float32) / 20
    means = rng.normal(size=(77, 384)).astype(np.float32)
    scope = Scope(whitening, means, np.arange(77))
    for row in rng.normal(size=(300, 1, 384)).astype(np.float32) * 3:
        z = row @ whitening
        plain = (means**2).sum(1) - 2 * (z @ means.T) + (z * z).sum(1, keepdims=True)
        expected = np.sqrt(np.maximum(plain, 0.0).min(1))
        np.testing.assert_array_equal(scope.distance(row), expected)
        np.testing.assert_array_equal(scope.squared(row), np.maximum(plain, 0.0))


def test_saved_statistics_load_back_and_are_checked(tmp_path):
    scope = hand_scope()
    path = tmp_path / "scope.npz"
    scope.save(path)
    loaded = Scope.load(path)
    np.testing.assert_array_equal(loaded.whitening, scope.whitening)
    np.testing.assert_array_equal(loaded.classes, scope.classes)
    np.savez(path, version=np.array(99), whitening=scope.whitening, means=scope.means,
             classes=scope.classes)  # fmt: skip
    with pytest.raises(ArtifactError, match="expected scope version 1, found 99"):
        Scope.load(path)
    np.savez(path, version=np.array(1), whitening=scope.whitening, means=scope.means[:, :1],
             classes=scope.classes)  # fmt: skip
    with pytest.raises(ArtifactError, match="expected a square whitening and means of the same"):
        Scope.load(path)
    path.write_bytes(b"not numpy")
    with pytest.raises(ArtifactError, match="expected the out-of-scope statistics"):
        Scope.load(path)


def test_routing_rule_is_confident_in_scope_and_not_the_fallback():
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.05, 0.95]])
    distances = np.array([1.0, 5.0, 1.0, 1.0])
    rule = RoutingRule(threshold=0.8, distance_threshold=2.0, fallback_class=1)
    # far away; not confident; predicted as the fallback queue
    assert rule.route(probabilities, distances).tolist() == [True, False, False, False]
    assert RoutingRule(0.8).route(probabilities, distances).tolist() == [True, True, False, True]
    assert not RoutingRule(None, 2.0, 1).route(probabilities, distances).any()
