"""Multinomial logistic regression in numpy, fitted by full-batch L-BFGS on standardised features.

Objective: class-weighted mean cross-entropy + ``l2 / 2 * ||W||²`` (bias not penalised; :func:`softmax_objective`,
the one copy, which the fleet reaches through :meth:`SoftmaxHead.objective` and :func:`add_l2`). L-BFGS
(:func:`edgetl.optim.lbfgs`) converges in tens of iterations on a few thousand 1280-d embeddings,
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
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from edgetl.errors import DataError
from edgetl.heads.base import FloatArray, Head, check_features, check_Xy
from edgetl.optim import History, Objective, lbfgs, shift_history

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


@dataclass(frozen=True)
class LinearWeights:
    """A linear classifier's ``coef`` (C, D) and ``intercept`` (C,), and the flat parameter vector ``theta`` that
    :func:`softmax_objective` takes: ``coef.T`` (D, C) raveled, then the intercept."""

    coef: np.ndarray
    intercept: np.ndarray

    @classmethod
    def from_theta(cls, theta: np.ndarray, n_classes: int) -> LinearWeights:
        """float32 weights from a parameter vector of ``D * n_classes + n_classes`` entries."""
        dim = (len(theta) - n_classes) // n_classes
        coef = np.ascontiguousarray(theta[:dim * n_classes].reshape(dim, n_classes).T, dtype=np.float32)
        return cls(coef, theta[dim * n_classes:].astype(np.float32))

    def theta(self) -> np.ndarray:
        """The float32 parameter vector."""
        return np.concatenate([self.coef.T.ravel(), self.intercept]).astype(np.float32)


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
    def from_linear(cls, weight: npt.ArrayLike, bias: npt.ArrayLike, mean: npt.ArrayLike | None = None,
                    scale: npt.ArrayLike | None = None, **params: Any) -> SoftmaxHead:
        """A fitted head that applies an existing linear classifier unchanged: ``weight`` (C, D) and ``bias`` (C,) on
        embeddings standardised by ``mean`` and ``scale`` (D,) (default: none, e.g. the host's fine-tuned
        classifier; the fleet's head from aggregated weights gives its global statistics). ``params``: the head's
        settings (e.g. ``l2``)."""
        head = cls(**params)
        head.coef_ = np.asarray(weight, dtype=np.float32)
        head.intercept_ = np.asarray(bias, dtype=np.float32)
        dim = head.coef_.shape[1]
        head.mean_ = np.zeros(dim, dtype=np.float32) if mean is None else np.asarray(mean, dtype=np.float32)
        head.scale_ = np.ones(dim, dtype=np.float32) if scale is None else np.asarray(scale, dtype=np.float32)
        return head

    @staticmethod
    def objective(X: np.ndarray, y: np.ndarray, n_classes: int, *, sample_weight: npt.ArrayLike, l2: float,
                  mean: np.ndarray, scale: np.ndarray) -> Objective:
        """``theta -> (loss, gradient)`` of the head's objective (:func:`softmax_objective`: weighted cross-entropy
        + ``l2 / 2 ||W||²``) on embeddings ``X`` (N, D) standardised as :meth:`decision_function` does,
        ``(X - mean) / scale``, with labels ``y`` (N,) in ``[0, n_classes)`` and per-sample weights
        ``sample_weight`` (N,) (the head's own sum to 1). ``theta``: see :class:`LinearWeights`. Summed over
        devices holding parts of the data, these are the objective of the union (the fleet's federated head)."""
        Z = ((np.asarray(X) - mean) / scale).astype(np.float32)
        return softmax_objective(Z, y, n_classes, np.asarray(sample_weight, dtype=np.float32), l2)

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
        self._check_settings(y, n_classes)
        rng = np.random.default_rng(self.seed)
        self.mean_ = X.mean(axis=0, dtype=np.float64).astype(np.float32)
        Z = np.subtract(X, self.mean_, dtype=np.float32)  # standardised in place: one (N, D) array, no temporaries
        self.scale_ = (np.sqrt(np.einsum("ij,ij->j", Z, Z, dtype=np.float64) / len(Z)) + 1e-6).astype(np.float32)
        Z *= 1.0 / self.scale_
        train_idx, val_idx = self._holdout(y, rng)
        Zt, yt = (Z[train_idx], y[train_idx]) if len(val_idx) else (Z, y)  # no copy without a held-out part
        theta0 = np.zeros(Z.shape[1] * n_classes + n_classes, dtype=np.float32)
        sample_w = _sample_weights(yt, n_classes, self.class_weight)
        choice = (self._choose_l2(Zt, yt, n_classes, rng) if self.l2 is None else
                  _L2Choice(self.l2, theta0, None, np.zeros((0, 2)), None))
        self.l2_, self.l2_cv_ = np.float64(choice.l2), choice.tried
        objective = softmax_objective(Zt, yt, n_classes, sample_w, float(choice.l2))
        val_loss = _mean_cross_entropy(Z[val_idx], y[val_idx], n_classes) if len(val_idx) else None
        solution = lbfgs(objective, choice.theta0, self.max_iter, self.tol, self.memory, val_loss, self.patience,
                         choice.history, choice.gtol)
        self.n_iter_ = solution.n_iter
        weights = LinearWeights.from_theta(solution.x, n_classes)
        self.coef_, self.intercept_ = weights.coef, weights.intercept
        return self

    def _check_settings(self, y: np.ndarray, n_classes: int) -> None:
        if (np.bincount(y, minlength=n_classes) > 0).sum() < 2:
            raise DataError("a softmax head needs samples of at least two classes; found one")
        if self.l2 is not None and not self.l2 >= 0:
            raise DataError(f"l2 must be a non-negative number (or None to choose it by cross-validation), found "
                            f"{self.l2!r}")
        if self.l2 is None and (not self.l2_grid and self.l2_grid is not None or
                                any(not v > 0 for v in self.l2_grid or L2_GRID)):
            raise DataError(f"l2_grid must hold positive numbers, found {self.l2_grid!r}")

    def _choose_l2(self, Z: np.ndarray, y: np.ndarray, n_classes: int, rng: np.random.Generator) -> _L2Choice:
        """The l2 for a fit on all of ``Z``, a starting point, gradient tolerance and curvature pairs for that fit,
        and the tried strengths with their pooled held-out accuracy, by stratified ``cv``-fold cross-validation,
        warm-started from strong to weak. Falls back to :data:`DEFAULT_L2` without data to spare."""
        n_penalised = Z.shape[1] * n_classes
        grid = sorted((float(v) for v in (self.l2_grid or L2_GRID)), reverse=True)
        folds = _stratified_folds(y, self.cv, rng)
        if folds is None or len(grid) < 2:
            return _L2Choice(DEFAULT_L2 if len(grid) != 1 else grid[0], np.zeros(n_penalised + n_classes, np.float32),
                             None, np.zeros((0, 2)), None)
        parts, held_sums = self._folds(Z, y, folds, n_classes)
        total = np.sum(held_sums, axis=0)
        # fits stop on the gradient, at GTOL of its norm at zero (where a fit from zero stops by the usual rule)
        gtol = GTOL * float(np.linalg.norm(_zero_gradient(total, y, n_classes, self.class_weight)))
        for part, sums in zip(parts, held_sums):
            # the first, strongest penalty starts where it is nearly optimal: one gradient step of length 1 / l2
            part.theta = -_zero_gradient(total - sums, part.y, n_classes, self.class_weight) / grid[0]
        walk = self._walk(parts, grid, gtol * CV_GTOL / GTOL, n_classes, len(y))
        best_l2, best_theta = walk.best()
        scale = (self.cv - 1) / self.cv  # the fold fits saw this share of the samples
        history = parts[-1].history  # a start for the final fit's curvature pairs too
        shift_history(history, best_l2 * scale - walk.last_l2, n_penalised)
        return _L2Choice(best_l2 * scale, best_theta.astype(np.float32), gtol, np.array(walk.tried, dtype=np.float64),
                         history)

    def _folds(self, Z: np.ndarray, y: np.ndarray, folds: np.ndarray, n_classes: int
               ) -> tuple[list[_Fold], list[np.ndarray]]:
        """The cross-validation folds, and per fold the (D, C) per-class sums of its held-out samples."""
        held = [np.flatnonzero(folds == f) for f in range(self.cv)]
        Zh = [Z[idx] for idx in held]  # one copy of each fold's held-out rows
        parts, held_sums = [], []
        for f in range(self.cv):
            train = np.flatnonzero(folds != f)
            # with two folds one fold's training rows are the other's held-out rows: no second copy
            Zf = Zh[1 - f] if self.cv == 2 else Z[train]
            yf = y[held[1 - f]] if self.cv == 2 else y[train]
            parts.append(_Fold(Zf, yf, _sample_weights(yf, n_classes, self.class_weight), Zh[f], y[held[f]],
                               deque(maxlen=self.memory)))
            onehot = np.zeros((len(held[f]), n_classes), dtype=np.float32)
            onehot[np.arange(len(held[f])), y[held[f]]] = 1.0
            held_sums.append(Zh[f].T @ onehot)
        return parts, held_sums

    def _walk(self, parts: list[_Fold], grid: list[float], gtol: float, n_classes: int, n_samples: int) -> _Walk:
        """Fit every fold at each strength of ``grid`` in turn (each fit warm-started from the previous strength's),
        until two strengths in a row score no better than the best."""
        walk = _Walk()
        for l2 in grid:
            correct = 0
            for i, part in enumerate(parts):
                if walk.tried:  # value, gradient and curvature pairs change with the penalty only
                    part.move_to(l2 - walk.last_l2, n_classes)
                elif i:  # the folds' objectives are alike: start with the previous fold's curvature pairs
                    part.history.extend(parts[i - 1].history)
                correct += part.fit(l2, self.max_iter, self.tol, self.memory, gtol, n_classes)
            if walk.add(l2, correct / n_samples, np.mean([p.theta for p in parts], axis=0)):
                break
        return walk

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


@dataclass(frozen=True)
class _L2Choice:
    """The strength for the final fit and how that fit starts: from ``theta0``, stopping at gradient norm ``gtol``
    (None: the usual rule), with the curvature pairs ``history`` (None: none); ``tried`` (G, 2): each strength
    tried by cross-validation with its pooled held-out accuracy."""

    l2: float
    theta0: np.ndarray
    gtol: float | None
    tried: np.ndarray
    history: History | None


@dataclass
class _Fold:
    """One cross-validation fold: its training rows ``Z``, labels and sample weights, its held-out rows, and the
    state of the walk over the strengths (solution, value and gradient there, curvature pairs)."""

    Z: np.ndarray
    y: np.ndarray
    w: np.ndarray
    Z_held: np.ndarray
    y_held: np.ndarray
    history: History
    theta: np.ndarray | None = None
    end: tuple[float, np.ndarray] | None = None  #: value and gradient at ``theta`` at the last strength

    def move_to(self, delta: float, n_classes: int) -> None:
        """Value, gradient and curvature pairs at ``theta`` for a penalty ``delta`` stronger than the last fit's."""
        assert self.theta is not None and self.end is not None
        n_penalised = self.Z.shape[1] * n_classes
        W = self.theta[:n_penalised]
        f, g = self.end
        g = g.copy()
        g[:n_penalised] += delta * W
        self.end = f + 0.5 * delta * float(W @ W), g
        shift_history(self.history, delta, n_penalised)

    def fit(self, l2: float, max_iter: int, tol: float, memory: int, gtol: float, n_classes: int) -> int:
        """Fit at strength ``l2`` from ``theta`` (with ``end`` as its value and gradient when set); returns how many
        held-out samples the solution classifies correctly."""
        assert self.theta is not None
        objective = softmax_objective(self.Z, self.y, n_classes, self.w, l2)
        solution = lbfgs(objective, self.theta, max_iter, tol, memory, history=self.history, gtol=gtol,
                         start=self.end)
        self.theta, self.end = solution.x, (solution.value, solution.gradient)
        return int((_scores(self.Z_held, self.theta, n_classes).argmax(axis=1) == self.y_held).sum())


@dataclass
class _Walk:
    """The strengths tried so far with their held-out accuracy, and the folds' mean solution at each."""

    tried: list[tuple[float, float]] = field(default_factory=list)
    thetas: list[np.ndarray] = field(default_factory=list)
    best_index: int = -1

    @property
    def last_l2(self) -> float:
        return self.tried[-1][0]

    def add(self, l2: float, accuracy: float, theta: np.ndarray) -> bool:
        """Record a strength; True when the walk should stop (two weaker strengths in a row did worse than the best;
        ties go to the stronger)."""
        self.tried.append((l2, accuracy))
        self.thetas.append(theta)
        if self.best_index < 0 or accuracy > self.tried[self.best_index][1]:
            self.best_index = len(self.tried) - 1
            return False
        return len(self.tried) - 1 - self.best_index >= 2

    def best(self) -> tuple[float, np.ndarray]:
        return self.tried[self.best_index][0], self.thetas[self.best_index]


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


def _mean_cross_entropy(Z: np.ndarray, y: np.ndarray, n_classes: int) -> Callable[[np.ndarray], float]:
    """``theta ->`` unweighted mean cross-entropy on ``(Z, y)`` (the early-stopping loss on held-out rows)."""

    def loss(theta: np.ndarray) -> float:
        s = _scores(Z, theta, n_classes)
        s -= s.max(axis=1, keepdims=True)
        return float((np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(y)), y]).mean())

    return loss


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


def add_l2(objective: Objective, l2: float, n_penalised: int) -> Objective:
    """``objective`` + ``l2 / 2 ||theta[:n_penalised]||²`` (float32 gradient): the penalty of
    :func:`softmax_objective` added once to a sum of unpenalised terms (the fleet's devices send theirs with
    ``l2 = 0``)."""

    def penalised(theta: np.ndarray) -> tuple[float, np.ndarray]:
        loss, grad = objective(theta)
        W = theta[:n_penalised]
        grad[:n_penalised] += l2 * W
        return loss + 0.5 * l2 * float(W @ W), grad.astype(np.float32)

    return penalised


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
