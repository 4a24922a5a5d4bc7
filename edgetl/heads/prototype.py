"""Training-free and few-shot heads on embeddings: nearest class mean (SimpleShot), cosine k-nearest neighbours and
weight imprinting. All work on L2-normalised features; NCM and imprinting keep per-class sums and counts, so adding
samples (``partial_fit``) updates them exactly."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from edgetl.errors import DataError
from edgetl.heads.base import FloatArray, Head, check_features, check_Xy, l2_normalise, softmax


def _centred_unit(X: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``normalise(X - centre)`` in float32 with one temporary (the fit's hot path)."""
    Z = np.subtract(X, centre, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", Z, Z))
    Z *= (1.0 / np.maximum(norms, 1e-12))[:, None]
    return Z


def _two_classes(y: np.ndarray) -> None:
    if len(np.unique(y)) < 2:
        raise DataError("a head needs samples of at least two classes; found one")


class _Prototypes(Head):
    """Shared machinery: optional centring mean, per-class sums of normalised features and counts."""

    _arrays: ClassVar[tuple[str, ...]] = ("centre_", "sums_", "counts_", "scale_")
    center: bool = True

    def __init__(self, scale: float | None = None, seed: int = 0):
        self.scale = scale
        self.seed = seed

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> _Prototypes:
        X, y = check_Xy(X, y)
        assert y is not None
        _two_classes(y)
        self.centre_ = X.mean(axis=0).astype(np.float32) if self.center else np.zeros(X.shape[1], np.float32)
        n_classes = int(y.max()) + 1
        self.sums_ = np.zeros((n_classes, X.shape[1]), dtype=np.float64)
        self.counts_ = np.zeros(n_classes, dtype=np.int64)
        Z = self._accumulate(X, y)
        self.scale_ = np.float32(self.scale if self.scale is not None else self._fit_scale(Z, y))
        self._after_fit(Z, y)
        return self

    def _after_fit(self, Z: np.ndarray, y: np.ndarray) -> None:
        """Hook for subclasses: the centred, normalised training features and their labels, after the scale fit."""

    def partial_fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> _Prototypes:
        """Add samples (new classes allowed) without revisiting old ones; the centring mean stays that of ``fit``."""
        if not hasattr(self, "sums_"):
            return self.fit(X, y)
        X, y = check_Xy(X, y)
        assert y is not None
        grow = int(y.max()) + 1 - len(self.counts_)
        if grow > 0:
            self.sums_ = np.vstack([self.sums_, np.zeros((grow, self.sums_.shape[1]))])
            self.counts_ = np.concatenate([self.counts_, np.zeros(grow, dtype=np.int64)])
        self._accumulate(X, y)
        return self

    def _accumulate(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Add the samples' centred, normalised features to the per-class sums (float64); returns those features."""
        check_features(X, self.sums_.shape[1])
        Z = _centred_unit(X, self.centre_)
        for c in np.unique(y):
            self.sums_[c] += Z[y == c].sum(axis=0, dtype=np.float64)
        self.counts_ += np.bincount(y, minlength=len(self.counts_))
        return Z

    def prototypes(self) -> np.ndarray:
        """Normalised class means ``(C, D)`` (zero rows for classes without samples)."""
        means = self.sums_ / np.maximum(self.counts_, 1)[:, None]
        return l2_normalise(means).astype(np.float32)

    def weights(self) -> np.ndarray:
        """The cosine classifier's unit weight rows ``(C, D)``: the class means here."""
        return self.prototypes()

    def _cosines(self, X: npt.ArrayLike) -> np.ndarray:
        self._check_fitted()
        X, _ = check_Xy(X)
        check_features(X, self.sums_.shape[1])
        scores = l2_normalise(X - self.centre_) @ self.weights().T
        scores[:, self.counts_ == 0] = -1e9  # classes without samples are never predicted
        return scores

    def decision_function(self, X: npt.ArrayLike) -> FloatArray:
        return (self._cosines(X) * self.scale_).astype(np.float32)

    def _fit_scale(self, Z: np.ndarray, y: np.ndarray) -> float:
        """Softmax scale of the cosine scores: the ``s`` in [1, 100] of lowest training NLL (:class:`ScaleSearch`)."""
        cos = (Z @ self.prototypes().T).astype(np.float64)
        search = ScaleSearch()
        while not search.done:
            search.update(scale_moments(cos, y, search.scale))
        return search.scale


def scale_moments(cos: np.ndarray, y: np.ndarray, scale: float) -> np.ndarray:
    """Sums over the samples of the first and second derivative in the softmax scale of the NLL of
    ``softmax(scale * cos)`` (``cos`` (N, C) float64 cosine scores, ``y`` (N,) true classes), and the sample count:
    ``[sum(E_p[cos] - cos_true), sum(Var_p[cos]), N]``. Moments of parts of the data add up to the moments of the
    whole (the fleet sums them over devices)."""
    true = cos[np.arange(len(y)), y]
    p = softmax(cos * scale).astype(np.float64)
    expected = (p * cos).sum(axis=1)
    return np.array([float((expected - true).sum()), float(((p * cos * cos).sum(axis=1) - expected ** 2).sum()),
                     float(len(y))])


class ScaleSearch:
    """The softmax scale of a cosine head: the ``s`` in [1, 100] of lowest NLL. The NLL is convex in ``s`` (a
    log-sum-exp of functions linear in ``s``), so a safeguarded 1-D Newton iteration finds it: start at 10, bisect
    (geometrically) when Newton leaves the bracket, stop at a relative change of 1e-3 or after 30 steps. Driven by
    :func:`scale_moments` (of one head's training data, or summed over a fleet): ``while not search.done:
    search.update(moments)``, then ``search.scale``."""

    def __init__(self) -> None:
        self.lo, self.hi, self.scale, self.done, self.steps = 1.0, 100.0, 10.0, False, 0

    def update(self, moments: np.ndarray) -> None:
        """One Newton step from the moments at :attr:`scale`."""
        grad, curv = moments[0] / moments[2], moments[1] / moments[2]
        if grad > 0:
            self.hi = self.scale
        else:
            self.lo = self.scale
        step = self.scale - grad / curv if curv > 1e-12 else np.nan
        new = step if self.lo < step < self.hi else float(np.sqrt(self.lo * self.hi))
        self.steps += 1
        if abs(new - self.scale) <= 1e-3 * self.scale or self.hi - self.lo <= 1e-3 * self.lo or self.steps >= 30:
            self.done = True
        self.scale = float(np.clip(new, 1.0, 100.0))


class NCMHead(_Prototypes):
    """Nearest class mean with mean-centring and L2 normalisation (SimpleShot). Training-free: fitting is a sum."""

    kind: ClassVar[str] = "ncm"
    center = True

    @classmethod
    def from_sums(cls, centre: npt.ArrayLike, sums: npt.ArrayLike, counts: npt.ArrayLike, scale: float,
                  **params: Any) -> NCMHead:
        """A fitted head from its centring mean ``centre`` (D,), per-class sums of centred, normalised embeddings
        ``sums`` (C, D), per-class counts ``counts`` (C,) and softmax ``scale`` (e.g. summed over a fleet's devices:
        the head trained on the union of their data). ``params``: the head's settings."""
        head = cls(**params)
        head.centre_ = np.asarray(centre, dtype=np.float32)
        head.sums_ = np.asarray(sums, dtype=np.float64)
        head.counts_ = np.asarray(counts, dtype=np.int64)
        head.scale_ = np.float32(scale)
        return head


class ImprintHead(_Prototypes):
    """Weight imprinting: normalised class means of the (uncentred) normalised embeddings are the weights of a cosine
    classifier whose scale is fitted on the training data (or fixed with ``scale``).

    ``refine_steps`` > 0 then refines the imprinted weights (Qi et al., CVPR 2018: imprinting, then fine-tuning): that
    many full-batch gradient steps (halved whenever the loss would rise) of the class-balanced softmax cross-entropy of
    ``scale · cos(x, w_c)``, each weight row renormalised after every step. ``partial_fit`` re-imprints the classes it touches and keeps the others' weights.
    """

    kind: ClassVar[str] = "imprint"
    center = False
    _arrays: ClassVar[tuple[str, ...]] = (*_Prototypes._arrays, "weights_")

    def __init__(self, scale: float | None = None, refine_steps: int = 0, learning_rate: float = 10.0, seed: int = 0):
        super().__init__(scale, seed)
        self.refine_steps = refine_steps
        self.learning_rate = learning_rate

    def _after_fit(self, Z: np.ndarray, y: np.ndarray) -> None:
        self.weights_ = self.prototypes()
        if self.refine_steps > 0:
            self._refine(Z, y)

    def partial_fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> ImprintHead:
        if not hasattr(self, "weights_"):
            return self.fit(X, y)
        super().partial_fit(X, y)
        fresh = self.prototypes()
        fresh[:len(self.weights_)] = self.weights_
        touched = np.unique(np.asarray(y))
        fresh[touched] = self.prototypes()[touched]
        self.weights_ = fresh
        return self

    def weights(self) -> np.ndarray:
        return self.weights_ if hasattr(self, "weights_") else self.prototypes()

    def _refine(self, Z: np.ndarray, y: np.ndarray) -> None:
        scale = float(self.scale_)
        counts = np.bincount(y, minlength=len(self.weights_)).astype(np.float64)
        sample_w = (1.0 / np.maximum(counts, 1))[y] / (counts > 0).sum()  # each present class weighs the same
        onehot = np.eye(len(counts))[y]

        def loss_grad(W: np.ndarray) -> tuple[float, np.ndarray]:
            p = softmax(scale * (Z @ W.T)).astype(np.float64)
            loss = -float(sample_w @ np.log(np.maximum((p * onehot).sum(axis=1), 1e-12)))
            return loss, ((p - onehot) * sample_w[:, None]).T @ Z  # gradient per unit of scale

        W = self.weights_.astype(np.float64)
        lr = self.learning_rate
        loss, grad = loss_grad(W)
        for _ in range(self.refine_steps):
            trial = l2_normalise(W - lr * grad)
            trial_loss, trial_grad = loss_grad(trial)
            if trial_loss < loss:
                W, loss, grad = trial, trial_loss, trial_grad
            else:  # overshoot: keep the weights, halve the step
                lr /= 2
        W[counts == 0] = 0.0  # classes without samples stay unpredictable
        self.weights_ = W.astype(np.float32)

    @classmethod
    def _from_arrays(cls, params: dict[str, object], arrays: dict[str, np.ndarray]) -> Head:
        if "weights_" not in arrays and "sums_" in arrays and "counts_" in arrays:  # written before refinement
            means = arrays["sums_"] / np.maximum(arrays["counts_"], 1)[:, None]
            arrays = arrays | {"weights_": l2_normalise(means).astype(np.float32)}
        return super()._from_arrays(params, arrays)


class KNNHead(Head):
    """Cosine k-nearest neighbours over the stored (normalised) training embeddings; votes weighted by similarity."""

    kind: ClassVar[str] = "knn"
    _arrays: ClassVar[tuple[str, ...]] = ("X_", "y_", "n_classes_")

    def __init__(self, k: int = 5, seed: int = 0):
        self.k = k
        self.seed = seed

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> KNNHead:
        X, y = check_Xy(X, y)
        assert y is not None
        _two_classes(y)
        self.X_ = l2_normalise(X).astype(np.float32)
        self.y_ = y
        self.n_classes_ = np.int64(int(y.max()) + 1)
        return self

    def partial_fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> KNNHead:
        if not hasattr(self, "X_"):
            return self.fit(X, y)
        X, y = check_Xy(X, y)
        assert y is not None
        self.X_ = np.vstack([self.X_, l2_normalise(X).astype(np.float32)])
        self.y_ = np.concatenate([self.y_, y])
        self.n_classes_ = np.int64(max(int(self.n_classes_), int(y.max()) + 1))
        return self

    def decision_function(self, X: npt.ArrayLike) -> FloatArray:
        """Similarity-weighted votes per class, shape ``(N, C)``; :meth:`predict_proba` normalises them."""
        self._check_fitted()
        X, _ = check_Xy(X)
        check_features(X, self.X_.shape[1])
        sims = l2_normalise(X) @ self.X_.T
        k = min(self.k, len(self.y_))
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(X), int(self.n_classes_)), dtype=np.float32)
        rows = np.repeat(np.arange(len(X)), k)
        np.add.at(votes, (rows, self.y_[idx].ravel()), np.maximum(sims[rows, idx.ravel()], 0.0) + 1e-6)
        return votes

    def predict_proba(self, X: npt.ArrayLike) -> FloatArray:
        votes = self.decision_function(X)
        return (votes / votes.sum(axis=1, keepdims=True)).astype(np.float32)
