"""Multinomial logistic regression in numpy, fitted by full-batch L-BFGS on standardised features.

Objective: class-weighted mean cross-entropy + ``l2 / 2 * ||W||²`` (bias not penalised). L-BFGS with a two-loop
recursion and a backtracking Armijo line search converges in tens of iterations on a few thousand 1280-d embeddings,
each iteration two ``(N, D) x (D, C)`` products. It stops when an iteration lowers the objective by less than
``tol`` (relative; default 1e-3): on 6,000 MobileNetV2 embeddings of Fashion-MNIST that is ~20 iterations, and
held-out accuracy is within 0.2 points of the fully converged solution (~120 iterations at 1e-7). Optional
early stopping watches the loss on a held-out part of the training data and keeps the best iterate.
"""

from __future__ import annotations

from collections import deque
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from edgetl.errors import DataError
from edgetl.heads.base import FloatArray, Head, check_features, check_Xy


class SoftmaxHead(Head):
    """Linear softmax classifier.

    Learned: ``coef_`` (C, D), ``intercept_`` (C,), ``mean_`` / ``scale_`` (D,) for standardisation.
    """

    kind: ClassVar[str] = "softmax"
    _arrays: ClassVar[tuple[str, ...]] = ("coef_", "intercept_", "mean_", "scale_")

    def __init__(self, l2: float = 0.05, max_iter: int = 200, tol: float = 1e-3, memory: int = 20,
                 val_fraction: float = 0.0, patience: int = 10, class_weight: str | None = "balanced", seed: int = 0):
        self.l2 = l2
        self.max_iter = max_iter
        self.tol = tol
        self.memory = memory
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
        if (np.bincount(y, minlength=n_classes) > 0).sum() < 2:
            raise DataError("a softmax head needs samples of at least two classes; found one")
        rng = np.random.default_rng(self.seed)
        self.mean_ = X.mean(axis=0, dtype=np.float64).astype(np.float32)
        Z = np.subtract(X, self.mean_, dtype=np.float32)  # standardised in place: one (N, D) array, no temporaries
        self.scale_ = (np.sqrt(np.einsum("ij,ij->j", Z, Z, dtype=np.float64) / len(Z)) + 1e-6).astype(np.float32)
        Z *= 1.0 / self.scale_
        train_idx, val_idx = self._holdout(y, rng)
        Zt, yt = (Z[train_idx], y[train_idx]) if len(val_idx) else (Z, y)  # no copy without a held-out part
        weights = np.ones(n_classes, dtype=np.float32)
        if self.class_weight == "balanced":
            counts = np.bincount(yt, minlength=n_classes).astype(np.float32)
            weights = np.where(counts > 0, len(yt) / (n_classes * np.maximum(counts, 1)), 0.0).astype(np.float32)
        sample_w = weights[yt] / weights[yt].sum()
        onehot = np.zeros((len(yt), n_classes), dtype=np.float32)
        onehot[np.arange(len(yt)), yt] = 1.0
        dim = Z.shape[1]

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            W = theta[:dim * n_classes].reshape(dim, n_classes)
            b = theta[dim * n_classes:]
            s = Zt @ W + b
            s -= s.max(axis=1, keepdims=True)
            logsum = np.log(np.exp(s).sum(axis=1))
            loss = float(sample_w @ (logsum - (s * onehot).sum(axis=1))) + 0.5 * self.l2 * float((W * W).sum())
            p = np.exp(s - logsum[:, None])
            p -= onehot
            p *= sample_w[:, None]
            gW = Zt.T @ p + self.l2 * W
            return loss, np.concatenate([gW.ravel(), p.sum(axis=0)])

        val_loss = None
        if len(val_idx):
            Zv, yv = Z[val_idx], y[val_idx]

            def val_loss(theta: np.ndarray) -> float:
                W = theta[:dim * n_classes].reshape(dim, n_classes)
                s = Zv @ W + theta[dim * n_classes:]
                s -= s.max(axis=1, keepdims=True)
                return float((np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(yv)), yv]).mean())

        theta, self.n_iter_ = _lbfgs(objective, np.zeros(dim * n_classes + n_classes, dtype=np.float32),
                                     self.max_iter, self.tol, self.memory, val_loss, self.patience)
        self.coef_ = np.ascontiguousarray(theta[:dim * n_classes].reshape(dim, n_classes).T, dtype=np.float32)
        self.intercept_ = theta[dim * n_classes:].astype(np.float32)
        return self

    def _holdout(self, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Stratified early-stopping split; empty when disabled or some class is too small to spare samples."""
        counts = np.bincount(y)
        if self.val_fraction <= 0 or counts[counts > 0].min() < 5:
            return np.arange(len(y)), np.empty(0, dtype=np.int64)
        held = []
        for c in np.flatnonzero(counts):
            idx = rng.permutation(np.flatnonzero(y == c))
            held.append(idx[:max(1, round(self.val_fraction * len(idx)))])
        val = np.sort(np.concatenate(held))
        mask = np.ones(len(y), dtype=bool)
        mask[val] = False
        return np.flatnonzero(mask), val

    def decision_function(self, X: npt.ArrayLike) -> FloatArray:
        self._check_fitted()
        X, _ = check_Xy(X)
        check_features(X, self.coef_.shape[1])
        return (((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_).astype(np.float32)


def _lbfgs(fun, x0: np.ndarray, max_iter: int, tol: float, memory: int, val_loss=None,  # type: ignore[no-untyped-def]
           patience: int = 10) -> tuple[np.ndarray, int]:
    """Minimise ``fun(x) -> (value, gradient)`` with L-BFGS; with ``val_loss`` keep the iterate of lowest held-out
    loss and stop after ``patience`` iterations without improvement. Returns (x, iterations)."""
    x = x0.copy()
    f, g = fun(x)
    history: deque[tuple[np.ndarray, np.ndarray, float]] = deque(maxlen=memory)
    best_x, best_val, stale = x.copy(), np.inf, 0
    it = 0
    for it in range(1, max_iter + 1):
        # two-loop recursion: d = -H g
        q = g.copy()
        alphas = []
        for s, yv, rho in reversed(history):
            a = rho * float(s @ q)
            alphas.append(a)
            q -= a * yv
        if history:
            s, yv, _ = history[-1]
            q *= float(s @ yv) / float(yv @ yv)
        else:
            q /= max(1.0, float(np.abs(g).max()))
        for (s, yv, rho), a in zip(history, reversed(alphas)):
            q += s * (a - rho * float(yv @ q))
        d = -q
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            history.clear()
            d, slope = -g, -float(g @ g)
        step = 1.0
        while True:  # backtracking Armijo
            x_new = x + step * d
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s, yv = x_new - x, g_new - g
        sy = float(s @ yv)
        if sy > 1e-10:
            history.append((s, yv, 1.0 / sy))
        converged = abs(f - f_new) <= tol * max(1.0, abs(f)) or float(np.abs(g_new).max()) <= tol
        x, f, g = x_new, f_new, g_new
        if val_loss is not None:
            v = val_loss(x)
            if v < best_val - 1e-6:
                best_x, best_val, stale = x.copy(), v, 0
            else:
                stale += 1
                if stale >= patience:
                    return best_x, it
        if converged:
            break
    return (best_x if val_loss is not None else x), it
