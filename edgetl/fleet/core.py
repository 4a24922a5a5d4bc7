"""The arithmetic of head-only federated learning, in numpy (no Flower, no torch): what a device computes from its own
embedding store, and how the server combines what devices send.

A device never sends images or embeddings. What it sends, per step:

- ``stats``: its class names with per-class counts, and the sum and sum of squares of its embeddings (D floats each) —
  enough for the server to build the label-space union, the global centring mean (NCM) and the global standardisation
  (softmax) exactly;
- NCM: per-class sums of its centred, L2-normalised embeddings and per-class counts (exact aggregation: the federated
  head equals the head trained centrally on the union of the data, up to float rounding), then, for a few Newton steps, the
  derivatives of its training NLL in the softmax scale, so that the scale is fitted as centrally;
- softmax, ``fedavg``: head weights after a few local L-BFGS iterations from the global head (FedAvg), with its share
  of the global class-balanced objective as the averaging weight;
- softmax, ``lbfgs``: its term of the global objective and that term's gradient at the server's current head; the
  server runs the same L-BFGS as :class:`~edgetl.heads.SoftmaxHead` on their sums (one round per evaluation), so the
  federated head is the central one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgetl.errors import DataError
from edgetl.heads import NCMHead, SoftmaxHead
from edgetl.heads.base import softmax
from edgetl.heads.softmax import _lbfgs


@dataclass(frozen=True)
class LocalData:
    """One device's labelled embeddings: ``X`` (N, D) float32, ``y`` (N,) indices into ``classes``."""

    X: np.ndarray
    y: np.ndarray
    classes: list[str]

    def to_union(self, union: Sequence[str]) -> np.ndarray:
        """Labels as indices into the fleet's label space ``union``."""
        missing = [c for c in self.classes if c not in union]
        if missing:
            raise DataError(f"classes {missing} are not in the fleet's label space; rejoin the round from the start")
        index = np.array([list(union).index(c) for c in self.classes], dtype=np.int64)
        return index[self.y]


# ---------------------------------------------------------------------------------------------------- device side
def local_stats(data: LocalData) -> dict[str, np.ndarray]:
    """Per-class counts (aligned with ``data.classes``), feature sum and sum of squares (float64), sample count."""
    X = data.X.astype(np.float64)
    return {"class_counts": np.bincount(data.y, minlength=len(data.classes)).astype(np.int64),
            "feature_sum": X.sum(axis=0), "feature_sumsq": (X * X).sum(axis=0),
            "n": np.array(len(X), dtype=np.int64)}


def _normalise(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def local_ncm_sums(data: LocalData, union: Sequence[str], centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sums ``(C, D)`` float64 of normalised ``X - centre`` and counts ``(C,)`` in the union label space
    (the same accumulation as :class:`~edgetl.heads.NCMHead`)."""
    y = data.to_union(union)
    sums = np.zeros((len(union), data.X.shape[1]), dtype=np.float64)
    np.add.at(sums, y, _normalise(data.X - centre.astype(np.float32)).astype(np.float64))
    return sums, np.bincount(y, minlength=len(union)).astype(np.int64)


def local_scale_moments(data: LocalData, union: Sequence[str], head: NCMHead, scale: float) -> np.ndarray:
    """This device's sums of the NLL's first and second derivative in the softmax scale at ``scale``, and its sample
    count: ``[sum(E_p[cos] - cos_true), sum(Var_p[cos]), n]`` — one Newton step of the scale fit, summed over the
    fleet, is the step :class:`~edgetl.heads.NCMHead` takes on the union of the data."""
    y = data.to_union(union)
    cos = (_normalise(data.X - head.centre_) @ head.prototypes().T).astype(np.float64)
    true = cos[np.arange(len(y)), y]
    p = softmax(cos * scale).astype(np.float64)
    expected = (p * cos).sum(axis=1)
    return np.array([float((expected - true).sum()), float(((p * cos * cos).sum(axis=1) - expected ** 2).sum()),
                     float(len(y))])


class ScaleSearch:
    """The safeguarded Newton iteration of ``NCMHead._fit_scale`` (scale in [1, 100], start 10, stop at a relative
    change of 1e-3), driven by moments summed over the fleet."""

    def __init__(self) -> None:
        self.lo, self.hi, self.scale, self.done, self.steps = 1.0, 100.0, 10.0, False, 0

    def update(self, moments: np.ndarray) -> None:
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


def class_weights(global_counts: np.ndarray) -> np.ndarray:
    """Per-sample weight of each class in the global class-balanced objective (sums to 1 over all samples), as
    :class:`~edgetl.heads.SoftmaxHead` with ``class_weight="balanced"`` weights them."""
    present = int((global_counts > 0).sum())
    return np.where(global_counts > 0, 1.0 / (np.maximum(global_counts, 1) * max(present, 1)), 0.0)


def _softmax_objective(data: LocalData, union: Sequence[str], mean: np.ndarray, scale: np.ndarray,
                       sample_w: np.ndarray, l2: float, n_classes: int):  # type: ignore[no-untyped-def]
    """``theta -> (loss, gradient)`` of sum_i w_i CE_i + l2/2 ||W||² on this device's standardised samples, in the
    parameter layout of :class:`~edgetl.heads.SoftmaxHead` (``W`` (D, C) raveled, then the bias)."""
    from edgetl.heads.softmax import softmax_objective

    Z = ((data.X - mean) / scale).astype(np.float32)
    return softmax_objective(Z, data.to_union(union), n_classes, sample_w.astype(np.float32), l2)


def local_softmax_gradient(data: LocalData, union: Sequence[str], theta: np.ndarray, mean: np.ndarray,
                           scale: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """This device's term of the global class-balanced cross-entropy (no L2) and its gradient at ``theta``: summed
    over the devices they are the global objective's loss and gradient (federated full-batch L-BFGS)."""
    y = data.to_union(union)
    return _softmax_objective(data, union, mean, scale, weights[y], 0.0, len(weights))(theta)


def local_softmax_round(data: LocalData, union: Sequence[str], coef: np.ndarray, intercept: np.ndarray,
                        mean: np.ndarray, scale: np.ndarray, weights: np.ndarray, l2: float, local_iter: int
                        ) -> tuple[np.ndarray, np.ndarray, float]:
    """A few L-BFGS iterations from the global head on this device's share of the global objective.

    The global objective is ``sum_k share_k * L_k`` with ``L_k`` this device's class-weighted cross-entropy normalised
    by its ``share`` plus the same L2 term, so FedAvg weighted by ``share`` averages the right thing.
    Returns (coef (C, D), intercept (C,), share)."""
    y = data.to_union(union)
    w = weights[y]
    share = float(w.sum())
    if share <= 0:
        raise DataError("this device holds no samples of the fleet's classes")
    n_classes, dim = coef.shape
    objective = _softmax_objective(data, union, mean, scale, w / share, l2, n_classes)
    theta0 = np.concatenate([coef.T.ravel(), intercept]).astype(np.float32)
    theta, _ = _lbfgs(objective, theta0, local_iter, 0.0, 10)
    W = theta[:dim * n_classes].reshape(dim, n_classes).T
    return np.ascontiguousarray(W, dtype=np.float32), theta[dim * n_classes:].astype(np.float32), share


# ---------------------------------------------------------------------------------------------------- server side
@dataclass(frozen=True)
class FleetStats:
    """What the server knows after the first step: the label-space union and global feature statistics."""

    classes: list[str]
    counts: np.ndarray  #: (C,) samples per class over the fleet
    mean: np.ndarray  #: (D,) float32
    std: np.ndarray  #: (D,) float32
    n: int


def merge_stats(reports: Sequence[tuple[list[str], dict[str, np.ndarray]]]) -> FleetStats:
    """Label-space union (sorted names) and exact global mean / standard deviation from every device's stats."""
    if not reports:
        raise DataError("no device joined the round; start at least one client with a matching bundle")
    classes = sorted({c for names, _ in reports for c in names})
    counts = np.zeros(len(classes), dtype=np.int64)
    total = np.zeros_like(reports[0][1]["feature_sum"])
    total_sq = np.zeros_like(total)
    n = 0
    for names, stats in reports:
        for name, count in zip(names, stats["class_counts"]):
            counts[classes.index(name)] += int(count)
        total += stats["feature_sum"]
        total_sq += stats["feature_sumsq"]
        n += int(stats["n"])
    if (counts > 0).sum() < 2:
        raise DataError(f"the fleet knows {len(classes)} class(es) with samples; a head needs at least two")
    mean = total / n
    var = np.maximum(total_sq / n - mean * mean, 0.0)
    return FleetStats(classes, counts, mean.astype(np.float32), (np.sqrt(var) + 1e-6).astype(np.float32), n)


def ncm_head(centre: np.ndarray, sums: np.ndarray, counts: np.ndarray, scale: float) -> NCMHead:
    """A fitted :class:`NCMHead` from summed per-class sums and counts."""
    head = NCMHead()
    head.centre_ = np.asarray(centre, dtype=np.float32)
    head.sums_ = np.asarray(sums, dtype=np.float64)
    head.counts_ = np.asarray(counts, dtype=np.int64)
    head.scale_ = np.float32(scale)
    return head


def softmax_head(coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                 l2: float = 0.05) -> SoftmaxHead:
    """A fitted :class:`SoftmaxHead` on standardised features from aggregated weights."""
    head = SoftmaxHead(l2=l2)
    head.coef_ = np.asarray(coef, dtype=np.float32)
    head.intercept_ = np.asarray(intercept, dtype=np.float32)
    head.mean_ = np.asarray(mean, dtype=np.float32)
    head.scale_ = np.asarray(scale, dtype=np.float32)
    return head
