"""Is a ticket in scope? The Mahalanobis distance of its features to the nearest queue.

Lee et al. 2018 and Podolskiy et al. 2021 ("Revisiting Mahalanobis Distance for
Transformer-Based Out-of-Domain Detection"): class means of the fine-tuned
model's features on the training rows, one covariance shared by every class
(Ledoit-Wolf shrinkage), and the distance to the nearest mean. The inverse
square root of the covariance is stored with the means already whitened, so
scoring a ticket is one d x d and one K x d product (numpy only: the runtime
uses it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from gata_ft.errors import ArtifactError

VERSION = 1
METHOD = "mahalanobis"
FEATURE = "classifier input"  # BERT: the pooler output; the graphs output it as `features`


@dataclass(frozen=True, eq=False)
class Scope:
    """Whitened class means: distance(x) = min over queues of |W x - W mu_k|."""

    whitening: np.ndarray  # (d, d): the shared covariance to the power -1/2
    means: np.ndarray  # (K, d): class means, whitened
    classes: np.ndarray  # (K,): the class id of each mean

    @classmethod
    def fit(cls, features, class_ids, exclude: Sequence[int] = ()) -> Scope:
        """Means and shared covariance of `features` per class, leaving out `exclude`."""
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, dtype=np.float64)
        class_ids = np.asarray(class_ids)
        classes = np.array(sorted(set(class_ids.tolist()) - set(exclude)))
        means = np.stack([features[class_ids == c].mean(0) for c in classes])
        centred = np.concatenate(
            [features[class_ids == c] - means[i] for i, c in enumerate(classes)]
        )
        precision = LedoitWolf().fit(centred).precision_
        values, vectors = np.linalg.eigh((precision + precision.T) / 2)
        whitening = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
        return cls(whitening.astype(np.float32), (means @ whitening).astype(np.float32), classes)

    @cached_property
    def _norms(self) -> np.ndarray:
        return (self.means.astype(np.float32) ** 2).sum(1)

    @cached_property
    def _minus_twice_means(self) -> np.ndarray:
        # (d, K), laid out as means.T (BLAS sums in the same order): z @ it is -2 z.mu_k
        # exactly, since scaling by 2 rounds nothing
        return np.ascontiguousarray(-2 * self.means.astype(np.float32)).T

    def _terms(self, features) -> tuple[np.ndarray, np.ndarray]:
        """|mu_k|^2 - 2 z.mu_k (n, K) and |z|^2 (n,): their sum is the squared distance."""
        z = np.asarray(features, dtype=np.float32) @ self.whitening
        return z @ self._minus_twice_means + self._norms, (z * z).sum(1)

    def squared(self, features) -> np.ndarray:
        """(n, K): squared Mahalanobis distance of each row to each class mean (float32)."""
        per_mean, own = self._terms(features)
        return np.maximum(per_mean + own[:, None], 0.0)

    def distance(self, features) -> np.ndarray:
        """(n,): distance to the nearest class mean; larger is farther from every queue.

        The same figures as sqrt(squared.min(1)) in fewer steps: |z|^2 is the same for
        every mean, so it is added after the minimum (rounding keeps the order).
        """
        per_mean, own = self._terms(features)
        return np.sqrt(np.maximum(per_mean.min(1) + own, 0.0))

    def save(self, path: Path) -> None:
        # .npz without pickles: np.load(allow_pickle=False) reads it back
        with path.open("wb") as f:
            np.savez(
                f,
                version=np.array(VERSION),
                whitening=self.whitening,
                means=self.means,
                classes=self.classes,
            )

    @classmethod
    def load(cls, path: Path) -> Scope:
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["version"])
                if version != VERSION:
                    raise ArtifactError(
                        f"{path}: expected scope version {VERSION}, found {version}"
                    )
                whitening, means = data["whitening"], data["means"]
                classes = data["classes"]
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"{path}: expected the out-of-scope statistics, {e}") from e
        d = whitening.shape[0] if whitening.ndim == 2 else -1
        if whitening.shape != (d, d) or means.ndim != 2 or means.shape[1] != d:
            raise ArtifactError(
                f"{path}: expected a square whitening and means of the same width, found "
                f"{whitening.shape} and {means.shape}"
            )
        if classes.shape != (means.shape[0],):
            raise ArtifactError(f"{path}: expected one class id per mean, found {classes.shape}")
        return cls(whitening.astype(np.float32), means.astype(np.float32), classes)


@dataclass(frozen=True)
class RoutingRule:
    """Route a ticket when it is confident, in scope, and not predicted as the fallback queue."""

    threshold: float | None  # calibrated probability; None: route nothing
    distance_threshold: float | None = None  # None: no scope check
    fallback_class: int | None = None

    def route(self, probabilities: np.ndarray, distances: np.ndarray | None) -> np.ndarray:
        """(n,) booleans from calibrated probabilities (n, K) and distances (n,)."""
        if self.threshold is None:
            return np.zeros(len(probabilities), dtype=bool)
        routed = probabilities.max(-1) >= self.threshold
        if self.fallback_class is not None:
            routed &= probabilities.argmax(-1) != self.fallback_class
        if self.distance_threshold is not None and distances is not None:
            routed &= distances <= self.distance_threshold
        return routed
