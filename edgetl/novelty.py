"""Calibrated confidence, "unknown" inputs and domain drift, in numpy, from the device's own held-out data.

- Temperature scaling: one scalar T fitted on held-out logits (lowest NLL on a log grid); probabilities are
  ``softmax(logits / T)``.
- Novelty score of an embedding: ``1 − max_c cos(x − μ, m_c)`` with μ the training mean and m_c the normalised class
  means of the centred, normalised training embeddings. Its threshold is the 95th percentile of the scores of
  held-out images of known classes: an input scoring above it is flagged ``unknown``.
- Drift of a folder: the median novelty score of its images against the same threshold — a folder whose typical image
  looks less familiar than 95 % of held-out known images has drifted.
"""

from __future__ import annotations

import numpy as np

from edgetl.heads.base import softmax

QUANTILE = 0.95


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature in [0.05, 20] (log grid) minimising the held-out negative log-likelihood."""
    best, best_nll = 1.0, np.inf
    for t in np.geomspace(0.05, 20.0, 61):
        p = softmax(logits / t)
        nll = float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean())
        if nll < best_nll:
            best, best_nll = float(t), nll
    return best


def _normalise(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class Novelty:
    """Class-mean cosine novelty with a data-derived threshold; arrays save to ``.npz`` (no pickle)."""

    def __init__(self, centre: np.ndarray, prototypes: np.ndarray, threshold: float):
        self.centre, self.prototypes, self.threshold = centre, prototypes, float(threshold)

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, X_held: np.ndarray) -> Novelty:
        centre = X.mean(axis=0)
        Z = _normalise(X - centre)
        protos = np.stack([Z[y == c].mean(axis=0) if (y == c).any() else np.zeros(Z.shape[1])
                           for c in range(int(y.max()) + 1)])
        model = cls(centre.astype(np.float32), _normalise(protos).astype(np.float32), 0.0)
        model.threshold = float(np.quantile(model.score(X_held if len(X_held) else X), QUANTILE))
        return model

    def score(self, X: np.ndarray) -> np.ndarray:
        """Novelty per embedding, shape ``(N,)``: 0 on a class mean, up to 2."""
        return (1.0 - (_normalise(X - self.centre) @ self.prototypes.T).max(axis=1)).astype(np.float32)

    def save(self, fh) -> None:  # type: ignore[no-untyped-def]
        np.savez(fh, centre=self.centre, prototypes=self.prototypes, threshold=np.float32(self.threshold))

    @classmethod
    def load(cls, path) -> Novelty:  # type: ignore[no-untyped-def]
        with np.load(path, allow_pickle=False) as data:
            return cls(data["centre"], data["prototypes"], float(data["threshold"]))
