"""Multinomial logistic regression in numpy: standardised features, L2, class weighting, mini-batch SGD with Nesterov
momentum and a cosine learning-rate schedule, early stopping on a held-out part of the training data."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import numpy.typing as npt

from edgetl.errors import DataError
from edgetl.heads.base import FloatArray, Head, check_Xy, softmax


class SoftmaxHead(Head):
    """Linear softmax classifier.

    Learned: ``coef_`` (C, D), ``intercept_`` (C,), ``mean_`` / ``scale_`` (D,) for standardisation.
    """

    kind: ClassVar[str] = "softmax"
    _arrays: ClassVar[tuple[str, ...]] = ("coef_", "intercept_", "mean_", "scale_")

    def __init__(self, l2: float = 1e-3, epochs: int = 60, batch_size: int = 64, lr: float = 0.05,
                 momentum: float = 0.9, val_fraction: float = 0.1, patience: int = 8,
                 class_weight: str | None = "balanced", seed: int = 0):
        self.l2 = l2
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.val_fraction = val_fraction
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed

    @classmethod
    def from_linear(cls, weight: np.ndarray, bias: np.ndarray) -> SoftmaxHead:
        """A fitted head that applies an existing linear classifier (e.g. the host's fine-tuned one) unchanged."""
        head = cls()
        head.coef_ = np.asarray(weight, dtype=np.float32)
        head.intercept_ = np.asarray(bias, dtype=np.float32)
        head.mean_ = np.zeros(head.coef_.shape[1], dtype=np.float32)
        head.scale_ = np.ones(head.coef_.shape[1], dtype=np.float32)
        return head

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> SoftmaxHead:
        X, y = check_Xy(X, y)
        assert y is not None
        n_classes = int(y.max()) + 1
        present = np.bincount(y, minlength=n_classes)
        if (present > 0).sum() < 2:
            raise DataError("a softmax head needs samples of at least two classes; found one")
        rng = np.random.default_rng(self.seed)
        self.mean_ = X.mean(axis=0).astype(np.float32)
        self.scale_ = (X.std(axis=0) + 1e-6).astype(np.float32)
        Z = (X - self.mean_) / self.scale_

        train_idx, val_idx = self._holdout(y, rng)
        weights = np.ones(n_classes, dtype=np.float32)
        if self.class_weight == "balanced":
            counts = np.bincount(y[train_idx], minlength=n_classes).astype(np.float32)
            weights = np.where(counts > 0, len(train_idx) / (n_classes * np.maximum(counts, 1)), 0.0).astype(np.float32)

        dim = Z.shape[1]
        W = np.zeros((dim, n_classes), dtype=np.float32)
        b = np.zeros(n_classes, dtype=np.float32)
        vW, vb = np.zeros_like(W), np.zeros_like(b)
        best = (np.inf, W.copy(), b.copy())
        stale = 0
        steps_per_epoch = max(1, -(-len(train_idx) // self.batch_size))
        total = self.epochs * steps_per_epoch
        step = 0
        for _epoch in range(self.epochs):
            order = rng.permutation(train_idx)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                lr = 0.5 * self.lr * (1 + np.cos(np.pi * step / total))
                step += 1
                # Nesterov: gradient at the look-ahead point
                Wl, bl = W + self.momentum * vW, b + self.momentum * vb
                p = softmax(Z[idx] @ Wl + bl)
                p[np.arange(len(idx)), y[idx]] -= 1.0
                p *= weights[y[idx], None]
                p /= len(idx)
                gW = Z[idx].T @ p + self.l2 * Wl
                gb = p.sum(axis=0)
                vW = self.momentum * vW - lr * gW
                vb = self.momentum * vb - lr * gb
                W += vW
                b += vb
            if len(val_idx):
                loss = self._loss(Z[val_idx], y[val_idx], W, b)
                if loss < best[0] - 1e-4:
                    best, stale = (loss, W.copy(), b.copy()), 0
                else:
                    stale += 1
                    if stale >= self.patience:
                        break
        if len(val_idx):
            W, b = best[1], best[2]
        self.n_epochs_ = _epoch + 1
        self.coef_ = np.ascontiguousarray(W.T)
        self.intercept_ = b
        return self

    def _holdout(self, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Stratified early-stopping split; empty when some class is too small to spare a sample."""
        counts = np.bincount(y)
        if self.val_fraction <= 0 or counts[counts > 0].min() < 5:
            return np.arange(len(y)), np.empty(0, dtype=np.int64)
        held = []
        for c in np.flatnonzero(counts):
            idx = rng.permutation(np.flatnonzero(y == c))
            held.append(idx[:max(1, int(round(self.val_fraction * len(idx))))])
        val = np.sort(np.concatenate(held))
        mask = np.ones(len(y), dtype=bool)
        mask[val] = False
        return np.flatnonzero(mask), val

    @staticmethod
    def _loss(Z: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray) -> float:
        s = Z @ W + b
        s -= s.max(axis=1, keepdims=True)
        logp = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    def decision_function(self, X: npt.ArrayLike) -> FloatArray:
        self._check_fitted()
        X, _ = check_Xy(X)
        if X.shape[1] != self.coef_.shape[1]:
            raise DataError(f"expected embeddings with {self.coef_.shape[1]} features, found {X.shape[1]}; the head "
                            "was trained for another extractor")
        return (((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_).astype(np.float32)
