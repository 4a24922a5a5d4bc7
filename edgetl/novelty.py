"""Calibrated confidence, "unknown" inputs and domain drift, in numpy, from the device's own held-out data.

- Temperature scaling: one scalar T fitted on held-out logits (lowest NLL on a log grid); probabilities are
  ``softmax(logits / T)``.
- Novelty score of an embedding: its smallest Mahalanobis distance to a class mean, computed on L2-normalised
  embeddings with one covariance shared by all classes (the within-class scatter), shrunk towards a multiple of the
  identity and kept as a low-rank eigenbasis plus one variance for the rest of the space (a few hundred kB on disk).
  On MobileNetV2 embeddings of Fashion-MNIST (classes 0–4 known, 5–9 unknown) it separates unknown classes with AUROC
  0.94, against 0.81 for the cosine to the centred class means used before (see docs/heads.md).
- Threshold: the 95th percentile of the scores of held-out images of known classes (when none are given, or the
  training images themselves are passed, of cross-fitted scores: each half scored by a model fitted on the other);
  an input scoring above it is flagged ``unknown``.
- Drift of a folder: the median novelty score of its images against the same threshold — a folder whose typical image
  looks less familiar than 95 % of held-out known images has drifted.
"""

from __future__ import annotations

import os
from typing import IO, Any

import numpy as np

from edgetl.heads.base import l2_normalise, softmax

QUANTILE = 0.95
#: shrinkage of the shared covariance towards ``mean variance × I``
SHRINK = 0.1
#: eigen-directions of the covariance kept explicitly; the rest share one (mean) variance
RANK = 128


def calibrated_proba(head: Any, X: np.ndarray, temperature: float | None) -> np.ndarray:
    """Class probabilities ``(N, C)`` of ``head`` on embeddings ``X``: ``softmax(logits / T)`` with the head's fitted
    temperature, the head's own probabilities when it has none."""
    return softmax(head.decision_function(X) / temperature) if temperature else head.predict_proba(X)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature in [0.05, 20] (log grid) minimising the held-out negative log-likelihood."""
    best, best_nll = 1.0, np.inf
    for t in np.geomspace(0.05, 20.0, 61):
        p = softmax(logits / t)
        nll = float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean())
        if nll < best_nll:
            best, best_nll = float(t), nll
    return best


def _top_eigen(R: np.ndarray, rank: int, seed: int = 0, power: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Top ``rank`` eigenpairs of the scatter ``RᵀR / N`` (values descending, vectors as columns of ``(D, r)``) by
    randomised subspace iteration (Halko et al. 2011): a few ``(N, D) × (D, r)`` products instead of a ``D × D``
    eigendecomposition."""
    n, d = R.shape
    k = min(rank + 10, d, n)
    R = np.ascontiguousarray(R, dtype=np.float32)
    Q = np.random.default_rng(seed).standard_normal((d, k)).astype(np.float32)
    for _ in range(power):  # power iterations; columns rescaled (not re-orthogonalised: LAPACK calls are few)
        Q = R.T @ (R @ Q)
        Q /= np.maximum(np.linalg.norm(Q, axis=0), 1e-30)
    Q = np.linalg.qr(Q.astype(np.float64))[0].astype(np.float32)
    SQ = (R.T @ (R @ Q)).astype(np.float64) / n
    lam, U = np.linalg.eigh(Q.T.astype(np.float64) @ SQ)
    order = np.argsort(lam)[::-1][:min(rank, k)]
    return np.maximum(lam[order], 0.0), (Q.astype(np.float64) @ U[:, order])


class Novelty:
    """Distance of an embedding from every known class, with a data-derived threshold; saves to ``.npz`` (no pickle).

    ``kind`` is ``"mahalanobis"`` (fitted by :meth:`fit`) or ``"cosine"`` (files written by earlier versions:
    ``1 − max_c cos(x − μ, m_c)``), so heads trained before still load and score as they did.
    """

    def __init__(self, arrays: dict[str, np.ndarray], threshold: float, kind: str = "mahalanobis"):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.threshold = float(threshold)
        self.kind = kind

    # ------------------------------------------------------------------------------------------------------ fitting
    @classmethod
    def _fit_model(cls, X: np.ndarray, y: np.ndarray, shrink: float = SHRINK, rank: int = RANK) -> Novelty:
        Z = l2_normalise(X, np.float32)
        y = np.asarray(y, dtype=np.int64)
        present = np.unique(y)
        means = np.stack([Z[y == c].mean(axis=0) for c in present]).astype(np.float32)
        R = Z - means[np.searchsorted(present, y)]
        total = float((R.astype(np.float64) ** 2).sum() / len(R))  # trace of the scatter
        dim = Z.shape[1]
        mean_var = max(total / dim, 1e-12)
        lam, V = _top_eigen(R, min(rank, dim))
        kept = (1.0 - shrink) * lam + shrink * mean_var
        rest = dim - len(lam)
        rest_var = ((1.0 - shrink) * max(total - float(lam.sum()), 0.0) / rest + shrink * mean_var) if rest else 1.0
        arrays = {"means": means, "basis": V.astype(np.float32), "inv_var": (1.0 / kept).astype(np.float32),
                  "inv_rest": np.float32(1.0 / rest_var)}
        return cls(arrays, 0.0)

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, X_held: np.ndarray | None = None, seed: int = 0) -> Novelty:
        """Fit on training embeddings ``X`` with labels ``y``; the threshold is the 95th percentile of the scores of
        ``X_held`` (held-out images of the same classes). When ``X_held`` is empty, None or ``X`` itself, the
        scores come from cross-fitting on ``X`` (two stratified halves, each scored by a model of the other)."""
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        model = cls._fit_model(X, y)
        if X_held is not None and len(X_held) and X_held is not X:
            held_scores = model.score(X_held)
        else:
            held_scores = cls._cross_fitted_scores(X, y, seed)
        model.threshold = float(np.quantile(held_scores, QUANTILE))
        return model

    @classmethod
    def _cross_fitted_scores(cls, X: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        half = np.zeros(len(y), dtype=bool)
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            half[idx[:len(idx) // 2]] = True
        if half.sum() < 2 or (~half).sum() < 2:
            return cls._fit_model(X, y).score(X)  # too few images to split: in-sample (optimistic) scores
        scores = np.empty(len(y), dtype=np.float32)
        for part in (half, ~half):
            scores[~part] = cls._fit_model(X[part], y[part]).score(X[~part])
        return scores

    # ------------------------------------------------------------------------------------------------------ scoring
    def score(self, X: np.ndarray) -> np.ndarray:
        """Novelty per embedding, shape ``(N,)``: larger is less familiar (Mahalanobis: the squared distance to the
        nearest class mean divided by the dimension, about 1 for a typical image of a known class)."""
        a = self.arrays
        if self.kind == "cosine":
            centred = l2_normalise(np.asarray(X, dtype=np.float32) - a["centre"], np.float32)
            return (1.0 - (centred @ a["prototypes"].T).max(axis=1)).astype(np.float32)
        Z = l2_normalise(X, np.float32)
        means, V, inv_var, inv_rest = a["means"], a["basis"], a["inv_var"], float(a["inv_rest"])
        PZ, PM = Z @ V, means @ V  # (N, r), (C, r)
        # squared distance to each mean, split into the kept directions and the rest of the space
        sq = (Z * Z).sum(axis=1)[:, None] - 2.0 * Z @ means.T + (means * means).sum(axis=1)[None, :]
        dist = np.empty_like(sq)
        for c in range(len(means)):
            p = PZ - PM[c]
            in_basis = (p * p).sum(axis=1)
            dist[:, c] = (p * p) @ inv_var + np.maximum(sq[:, c] - in_basis, 0.0) * inv_rest
        return (dist.min(axis=1) / Z.shape[1]).astype(np.float32)  # per dimension: ~1 for a typical known image

    # --------------------------------------------------------------------------------------------------- persistence
    def save(self, fh: str | os.PathLike[str] | IO[bytes]) -> None:
        np.savez(fh, kind=np.array(self.kind), threshold=np.float32(self.threshold), **self.arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | IO[bytes]) -> Novelty:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k not in ("kind", "threshold")}
            kind = str(data["kind"]) if "kind" in data.files else "cosine"
            threshold = float(data["threshold"])
        needed = ("centre", "prototypes") if kind == "cosine" else ("means", "basis", "inv_var", "inv_rest")
        missing = [k for k in needed if k not in arrays]
        if kind not in ("cosine", "mahalanobis") or missing:
            raise KeyError(f"novelty file of kind {kind!r} lacks {missing}")
        return cls(arrays, threshold, kind)
