"""Multinomial logistic regression in numpy, fitted by full-batch L-BFGS on standardised features.

Objective: class-weighted mean cross-entropy + ``l2 / 2 * ||W||²`` (bias not penalised). L-BFGS with a two-loop
recursion and a backtracking Armijo line search converges in tens of iterations on a few thousand 1280-d embeddings,
each iteration two ``(N, D) x (D, C)`` products. It stops when an iteration lowers the objective by less than
``tol`` (relative; default 1e-3): on 6,000 MobileNetV2 embeddings of Fashion-MNIST that is ~20 iterations, and
held-out accuracy is within 0.2 points of the fully converged solution (~120 iterations at 1e-7). Optional
early stopping watches the loss on a held-out part of the training data and keeps the best iterate.

L2 strength: by default (``l2=None``) it is chosen on the training embeddings themselves, so that one default fits
image and text embeddings, few and many samples alike. A stratified ``cv``-fold split (default 2) scores each value of
``l2_grid`` (default :data:`L2_GRID`, strongest first) by pooled held-out accuracy. The walk is warm-started: each
fold's fit at a value starts from its solution at the previous, stronger one, with its L-BFGS curvature pairs, value
and gradient carried over (they change with the penalty only), so a weaker value costs a few evaluations; these fits
stop when the gradient's norm is :data:`CV_GTOL` of its norm at zero. The walk stops once two values in a row score
no better than the best (ties go to the stronger value). The chosen value is rescaled to the whole training set (the
fold fits saw ``(cv - 1) / cv`` of it; at a constant prior strength the penalty of a mean loss scales as ``1 / N``),
and the final fit starts from the folds' mean solution and stops when the gradient's norm is :data:`GTOL` of its norm
at zero (where a fit from zero stops by the ``tol`` rule; a warm start lowers the objective too little for that rule).
On 6,000 × 1,280 Fashion-MNIST embeddings this costs ~1.5× the objective evaluations of one fit at a fixed ``l2``
(``tools/measure_softmax_l2.py``). With too little data to spare (some class with fewer than
``max(cv, CV_MIN_PER_CLASS)`` samples) the head fits with :data:`DEFAULT_L2` exactly as ``SoftmaxHead(l2=0.05)`` would.
An explicit ``l2`` is used as given, without cross-validation. The value used is recorded as ``l2_`` and the tried
values with their scores as ``l2_cv_`` (both saved with the head; heads saved before have their fixed ``l2``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from edgetl.errors import DataError
from edgetl.heads.base import FloatArray, Head, check_features, check_Xy

#: the L2 strength of a head that cannot cross-validate (and the fixed default before it did); chosen on image
#: embeddings of a few thousand samples
DEFAULT_L2 = 0.05
#: L2 strengths tried by cross-validation, strongest first (the order of the warm-started walk)
L2_GRID = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01)
#: with a cross-validated l2, the final fit stops when the gradient's norm falls to this share of its norm at zero
GTOL = 0.01
#: the cross-validation fits stop earlier: they only rank the strengths
CV_GTOL = 0.03
#: fewest samples of every class for cross-validating the l2 (fewer: DEFAULT_L2)
CV_MIN_PER_CLASS = 4

Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]
Pair = tuple[np.ndarray, np.ndarray, float]  # an L-BFGS curvature pair (s, y, 1 / s·y)


class SoftmaxHead(Head):
    """Linear softmax classifier.

    ``l2``: penalty strength; None (default) picks it by ``cv``-fold cross-validation over ``l2_grid`` on the
    training embeddings (see the module docstring).
    Learned: ``coef_`` (C, D), ``intercept_`` (C,), ``mean_`` / ``scale_`` (D,) for standardisation, ``l2_`` the
    strength used, ``l2_cv_`` (G, 2): each tried strength with its mean held-out accuracy (empty without CV).
    """

    kind: ClassVar[str] = "softmax"
    _arrays: ClassVar[tuple[str, ...]] = ("coef_", "intercept_", "mean_", "scale_")
    _optional_arrays: ClassVar[tuple[str, ...]] = ("l2_", "l2_cv_")

    def __init__(self, l2: float | None = None, max_iter: int = 200, tol: float = 1e-3, memory: int = 20,
                 val_fraction: float = 0.0, patience: int = 10, class_weight: str | None = "balanced", seed: int = 0,
                 cv: int = 2, l2_grid: Sequence[float] | None = None):
        self.l2 = l2
        self.max_iter = max_iter
        self.tol = tol
        self.memory = memory
        self.val_fraction = val_fraction
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed
        self.cv = cv
        self.l2_grid = l2_grid

    @classmethod
    def from_linear(cls, weight: np.ndarray, bias: np.ndarray) -> SoftmaxHead:
        """A fitted head that applies an existing linear classifier (e.g. the host's fine-tuned one) unchanged."""
        head = cls()
        head.coef_ = np.asarray(weight, dtype=np.float32)
        head.intercept_ = np.asarray(bias, dtype=np.float32)
        head.mean_ = np.zeros(head.coef_.shape[1], dtype=np.float32)
        head.scale_ = np.ones(head.coef_.shape[1], dtype=np.float32)
        return head

    @classmethod
    def _from_arrays(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> Head:
        head = super()._from_arrays(params, arrays)
        if not hasattr(head, "l2_"):  # saved before the L2 was chosen by cross-validation: it was the fixed l2
            head.l2_ = np.float64(params.get("l2") if params.get("l2") is not None else DEFAULT_L2)
        return head

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> SoftmaxHead:
        X, y = check_Xy(X, y)
        assert y is not None
        n_classes = int(y.max()) + 1
        if (np.bincount(y, minlength=n_classes) > 0).sum() < 2:
            raise DataError("a softmax head needs samples of at least two classes; found one")
        if self.l2 is not None and not self.l2 >= 0:
            raise DataError(f"l2 must be a non-negative number (or None to choose it by cross-validation), found "
                            f"{self.l2!r}")
        if self.l2 is None and (not self.l2_grid and self.l2_grid is not None or
                                any(not v > 0 for v in self.l2_grid or L2_GRID)):
            raise DataError(f"l2_grid must hold positive numbers, found {self.l2_grid!r}")
        rng = np.random.default_rng(self.seed)
        self.mean_ = X.mean(axis=0, dtype=np.float64).astype(np.float32)
        Z = np.subtract(X, self.mean_, dtype=np.float32)  # standardised in place: one (N, D) array, no temporaries
        self.scale_ = (np.sqrt(np.einsum("ij,ij->j", Z, Z, dtype=np.float64) / len(Z)) + 1e-6).astype(np.float32)
        Z *= 1.0 / self.scale_
        train_idx, val_idx = self._holdout(y, rng)
        Zt, yt = (Z[train_idx], y[train_idx]) if len(val_idx) else (Z, y)  # no copy without a held-out part
        dim = Z.shape[1]
        theta0 = np.zeros(dim * n_classes + n_classes, dtype=np.float32)
        sample_w = _sample_weights(yt, n_classes, self.class_weight)
        l2, gtol, history, self.l2_cv_ = self.l2, None, None, np.zeros((0, 2))
        if l2 is None:
            l2, theta0, gtol, self.l2_cv_, history = self._choose_l2(Zt, yt, n_classes, rng)
        self.l2_ = np.float64(l2)
        objective = softmax_objective(Zt, yt, n_classes, sample_w, float(l2))

        val_loss = None
        if len(val_idx):
            Zv, yv = Z[val_idx], y[val_idx]

            def val_loss(theta: np.ndarray) -> float:
                W = theta[:dim * n_classes].reshape(dim, n_classes)
                s = Zv @ W + theta[dim * n_classes:]
                s -= s.max(axis=1, keepdims=True)
                return float((np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(yv)), yv]).mean())

        theta, self.n_iter_ = _lbfgs(objective, theta0, self.max_iter, self.tol, self.memory, val_loss, self.patience,
                                     history, gtol)
        self.coef_ = np.ascontiguousarray(theta[:dim * n_classes].reshape(dim, n_classes).T, dtype=np.float32)
        self.intercept_ = theta[dim * n_classes:].astype(np.float32)
        return self

    def _choose_l2(self, Z: np.ndarray, y: np.ndarray, n_classes: int, rng: np.random.Generator
                   ) -> tuple[float, np.ndarray, float | None, np.ndarray, deque[Pair] | None]:
        """(l2 for a fit on all of ``Z``, a starting point for that fit, its gradient tolerance (None: the usual
        stopping rule), (G, 2) tried strengths and their pooled held-out accuracy) by stratified ``cv``-fold
        cross-validation, warm-started from strong to weak. Falls back to :data:`DEFAULT_L2` without data to spare."""
        dim = Z.shape[1]
        size = dim * n_classes + n_classes
        grid = sorted((float(v) for v in (self.l2_grid or L2_GRID)), reverse=True)
        folds = _stratified_folds(y, self.cv, rng)
        if folds is None or len(grid) < 2:
            return (DEFAULT_L2 if len(grid) != 1 else grid[0], np.zeros(size, np.float32), None, np.zeros((0, 2)),
                    None)
        held = [np.flatnonzero(folds == f) for f in range(self.cv)]
        Zh = [Z[idx] for idx in held]  # one copy of each fold's held-out rows
        parts, held_sums = [], []
        for f in range(self.cv):
            train = np.flatnonzero(folds != f)
            # with two folds one fold's training rows are the other's held-out rows: no second copy
            Zf = Zh[1 - f] if self.cv == 2 else Z[train]
            yf = y[held[1 - f]] if self.cv == 2 else y[train]
            parts.append({"Z": Zf, "y": yf, "w": _sample_weights(yf, n_classes, self.class_weight), "Zv": Zh[f],
                          "yv": y[held[f]], "history": deque(maxlen=self.memory)})
            onehot = np.zeros((len(held[f]), n_classes), dtype=np.float32)
            onehot[np.arange(len(held[f])), y[held[f]]] = 1.0
            held_sums.append(Zh[f].T @ onehot)  # (D, C) per-class sums of this fold's held-out samples
        total = np.sum(held_sums, axis=0)
        # fits stop on the gradient, at GTOL of its norm at zero (where a fit from zero stops by the usual rule)
        gtol = GTOL * float(np.linalg.norm(_zero_gradient(total, y, n_classes, self.class_weight)))
        for part, sums in zip(parts, held_sums):
            # the first, strongest penalty starts where it is nearly optimal: one gradient step of length 1 / l2
            part["theta"] = -_zero_gradient(total - sums, part["y"], n_classes, self.class_weight) / grid[0]
        tried, thetas = [], []
        best, previous = -1, None
        for l2 in grid:
            correct = 0
            for i, part in enumerate(parts):
                start = None
                if previous is not None:  # value, gradient and curvature pairs change with the penalty only
                    W = part["theta"][:dim * n_classes]
                    f, g = part["end"]
                    g = g.copy()
                    g[:dim * n_classes] += (l2 - previous) * W
                    start = f + 0.5 * (l2 - previous) * float(W @ W), g
                    _shift_history(part["history"], l2 - previous, dim * n_classes)
                elif i:  # the folds' objectives are alike: start with the previous fold's curvature pairs
                    part["history"].extend(parts[i - 1]["history"])
                objective = softmax_objective(part["Z"], part["y"], n_classes, part["w"], l2)
                part["theta"], _, *end = _minimise(objective, part["theta"], self.max_iter, self.tol, self.memory,
                                                   history=part["history"], gtol=gtol * CV_GTOL / GTOL, start=start)
                part["end"] = end
                correct += int((_scores(part["Zv"], part["theta"], n_classes).argmax(axis=1) == part["yv"]).sum())
            tried.append((l2, correct / len(y)))
            thetas.append(np.mean([p["theta"] for p in parts], axis=0))
            previous = l2
            if best < 0 or tried[-1][1] > tried[best][1]:
                best = len(tried) - 1
            elif len(tried) - 1 - best >= 2:  # two weaker strengths in a row did worse: stop walking
                break
        scale = (self.cv - 1) / self.cv  # the fold fits saw this share of the samples
        history = parts[-1]["history"]  # a start for the final fit's curvature pairs too
        _shift_history(history, tried[best][0] * scale - previous, dim * n_classes)
        return (tried[best][0] * scale, thetas[best].astype(np.float32), gtol, np.array(tried, dtype=np.float64),
                history)

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


def _sample_weights(y: np.ndarray, n_classes: int, class_weight: str | None) -> np.ndarray:
    """Per-sample weights summing to 1 (``balanced``: every present class weighs the same)."""
    weights = np.ones(n_classes, dtype=np.float32)
    if class_weight == "balanced":
        counts = np.bincount(y, minlength=n_classes).astype(np.float32)
        weights = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0).astype(np.float32)
    sample_w = weights[y]
    return sample_w / sample_w.sum()


def _zero_gradient(class_sums: np.ndarray, y: np.ndarray, n_classes: int, class_weight: str | None) -> np.ndarray:
    """Gradient of the weighted mean cross-entropy at ``theta = 0`` (every class probability ``1 / C``) from the
    per-class sums of the standardised samples ``class_sums`` (D, C) and their labels ``y``."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    if class_weight == "balanced":  # a sample's weight, per class (as _sample_weights, which sum to 1)
        per_sample = np.where(counts > 0, 1.0 / ((counts > 0).sum() * np.maximum(counts, 1)), 0.0)
    else:
        per_sample = np.full(n_classes, 1.0 / len(y))
    weighted = class_sums * per_sample  # (D, C)
    gW = weighted.sum(axis=1, keepdims=True) / n_classes - weighted
    gb = (per_sample * counts).sum() / n_classes - per_sample * counts
    return np.concatenate([gW.ravel(), gb]).astype(np.float32)


def _scores(Z: np.ndarray, theta: np.ndarray, n_classes: int) -> np.ndarray:
    dim = Z.shape[1]
    return Z @ theta[:dim * n_classes].reshape(dim, n_classes) + theta[dim * n_classes:]


def softmax_objective(Z: np.ndarray, y: np.ndarray, n_classes: int, sample_w: np.ndarray, l2: float) -> Objective:
    """``theta -> (loss, gradient)`` of the weighted mean cross-entropy + ``l2 / 2 ||W||²``; ``theta`` is ``W``
    (D, C) raveled, then the bias (C,). The one softmax objective: the head fits it, the fleet sums it over devices."""
    dim = Z.shape[1]
    onehot = np.zeros((len(y), n_classes), dtype=np.float32)
    onehot[np.arange(len(y)), y] = 1.0

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W = theta[:dim * n_classes].reshape(dim, n_classes)
        s = Z @ W + theta[dim * n_classes:]
        s -= s.max(axis=1, keepdims=True)
        logsum = np.log(np.exp(s).sum(axis=1))
        loss = float(sample_w @ (logsum - (s * onehot).sum(axis=1))) + 0.5 * l2 * float((W * W).sum())
        p = np.exp(s - logsum[:, None])
        p -= onehot
        p *= sample_w[:, None]
        gW = Z.T @ p + l2 * W
        return loss, np.concatenate([gW.ravel(), p.sum(axis=0)])

    return objective


def _stratified_folds(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray | None:
    """Fold index per sample, each class spread evenly over ``k`` folds; None when some class has fewer than
    ``max(k, CV_MIN_PER_CLASS)`` samples (or ``k`` < 2): too little data to cross-validate."""
    counts = np.bincount(y)
    if k < 2 or counts[counts > 0].min() < max(k, CV_MIN_PER_CLASS):
        return None
    folds = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.flatnonzero(counts):
        idx = rng.permutation(np.flatnonzero(y == c))
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # classes start on different folds, so fold sizes stay within one of each other
    return folds


def _shift_history(history: deque[Pair], delta: float, n_penalised: int) -> None:
    """Curvature pairs of the objective at one L2 strength → those at a strength ``delta`` higher: the Hessian
    changes by ``delta`` on the penalised weights, so ``y += delta * s`` there (pairs that lose curvature go)."""
    shifted = []
    for s, yv, _ in history:
        yv = yv.copy()
        yv[:n_penalised] += delta * s[:n_penalised]
        sy = float(s @ yv)
        if sy > 1e-10:
            shifted.append((s, yv, 1.0 / sy))
    history.clear()
    history.extend(shifted)


def _lbfgs(fun, x0: np.ndarray, max_iter: int, tol: float, memory: int, val_loss=None,  # type: ignore[no-untyped-def]
           patience: int = 10, history: deque[Pair] | None = None,
           gtol: float | None = None) -> tuple[np.ndarray, int]:
    """Minimise ``fun(x) -> (value, gradient)`` with L-BFGS; with ``val_loss`` keep the iterate of lowest held-out
    loss and stop after ``patience`` iterations without improvement. ``history``: curvature pairs to start from
    (e.g. from a fit of a nearby objective), updated in place. ``gtol``: stop when the gradient's norm is at most
    this instead of when the objective stops falling by ``tol`` (a warm start falls little but may still be far from
    the optimum). Returns (x, iterations)."""
    x, it, _, _ = _minimise(fun, x0, max_iter, tol, memory, val_loss, patience, history, gtol)
    return x, it


def _minimise(fun, x0: np.ndarray, max_iter: int, tol: float, memory: int, val_loss=None,  # type: ignore[no-untyped-def]
              patience: int = 10, history: deque[Pair] | None = None, gtol: float | None = None,
              start: tuple[float, np.ndarray] | None = None) -> tuple[np.ndarray, int, float, np.ndarray]:
    """:func:`_lbfgs`, also given ``start`` (value and gradient at ``x0`` when already known) and returning the value
    and gradient at the solution: (x, iterations, value, gradient)."""
    x = x0.copy()
    f, g = fun(x) if start is None else start
    if history is None:
        history = deque(maxlen=memory)
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
        if gtol is None:
            converged = abs(f - f_new) <= tol * max(1.0, abs(f)) or float(np.abs(g_new).max()) <= tol
        else:
            converged = float(np.linalg.norm(g_new)) <= gtol
        x, f, g = x_new, f_new, g_new
        if val_loss is not None:
            v = val_loss(x)
            if v < best_val - 1e-6:
                best_x, best_val, stale = x.copy(), v, 0
            else:
                stale += 1
                if stale >= patience:
                    return best_x, it, f, g
        if converged:
            break
    return (best_x if val_loss is not None else x), it, f, g
