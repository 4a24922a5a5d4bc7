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
  server runs the same L-BFGS as :class:`~edgetl.heads.SoftmaxHead` (:func:`edgetl.optim.lbfgs`) on their sums (one
  round per evaluation), so the federated head is the central one.

The maths is the heads' own: the softmax objective is :meth:`edgetl.heads.SoftmaxHead.objective`, the NCM scale fit
:class:`~edgetl.heads.prototype.ScaleSearch` on :func:`~edgetl.heads.prototype.scale_moments`, and heads are built
with :meth:`edgetl.heads.NCMHead.from_sums` and :meth:`edgetl.heads.SoftmaxHead.from_linear`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgetl.errors import DataError
from edgetl.heads import NCMHead, SoftmaxHead
from edgetl.heads.base import l2_normalise
from edgetl.heads.prototype import scale_moments
from edgetl.heads.softmax import LinearWeights
from edgetl.optim import lbfgs


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


@dataclass(frozen=True)
class DeviceStats:
    """What a device tells the server when it joins: its class names, per-class counts (aligned with ``classes``),
    the sum and the sum of squares of its embeddings (D,) float64, and its sample count."""

    classes: list[str]
    class_counts: np.ndarray
    feature_sum: np.ndarray
    feature_sumsq: np.ndarray
    n: int

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays of a join reply (the class names travel beside them, in its config)."""
        return {"class_counts": self.class_counts, "feature_sum": self.feature_sum,
                "feature_sumsq": self.feature_sumsq, "n": np.array(self.n, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, classes: Sequence[str], arrays: dict[str, np.ndarray]) -> DeviceStats:
        return cls(list(classes), arrays["class_counts"], arrays["feature_sum"], arrays["feature_sumsq"],
                   int(arrays["n"]))


# ---------------------------------------------------------------------------------------------------- device side
def local_stats(data: LocalData) -> DeviceStats:
    """Per-class counts, feature sum and sum of squares (float64), sample count of this device's embeddings."""
    X = data.X.astype(np.float64)
    return DeviceStats(list(data.classes), np.bincount(data.y, minlength=len(data.classes)).astype(np.int64),
                       X.sum(axis=0), (X * X).sum(axis=0), len(X))


def local_ncm_sums(data: LocalData, union: Sequence[str], centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sums ``(C, D)`` float64 of normalised ``X - centre`` and counts ``(C,)`` in the union label space
    (the same accumulation as :class:`~edgetl.heads.NCMHead`)."""
    y = data.to_union(union)
    sums = np.zeros((len(union), data.X.shape[1]), dtype=np.float64)
    np.add.at(sums, y, l2_normalise(data.X - centre.astype(np.float32)).astype(np.float64))
    return sums, np.bincount(y, minlength=len(union)).astype(np.int64)


def local_scale_moments(data: LocalData, union: Sequence[str], head: NCMHead, scale: float) -> np.ndarray:
    """This device's sums of the NLL's first and second derivative in the softmax scale at ``scale``, and its sample
    count: ``[sum(E_p[cos] - cos_true), sum(Var_p[cos]), n]`` — one Newton step of the scale fit, summed over the
    fleet, is the step :class:`~edgetl.heads.NCMHead` takes on the union of the data."""
    cos = (l2_normalise(data.X - head.centre_) @ head.prototypes().T).astype(np.float64)
    return scale_moments(cos, data.to_union(union), scale)


def class_weights(global_counts: np.ndarray) -> np.ndarray:
    """Per-sample weight of each class in the global class-balanced objective (sums to 1 over all samples), as
    :class:`~edgetl.heads.SoftmaxHead` with ``class_weight="balanced"`` weights them."""
    present = int((global_counts > 0).sum())
    return np.where(global_counts > 0, 1.0 / (np.maximum(global_counts, 1) * max(present, 1)), 0.0)


def local_softmax_gradient(data: LocalData, union: Sequence[str], theta: np.ndarray, mean: np.ndarray,
                           scale: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """This device's term of the global class-balanced cross-entropy (no L2) and its gradient at ``theta``: summed
    over the devices they are the global objective's loss and gradient (federated full-batch L-BFGS)."""
    y = data.to_union(union)
    objective = SoftmaxHead.objective(data.X, y, len(weights), sample_weight=weights[y], l2=0.0, mean=mean,
                                      scale=scale)
    return objective(theta)


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
    n_classes = len(coef)
    objective = SoftmaxHead.objective(data.X, y, n_classes, sample_weight=w / share, l2=l2, mean=mean, scale=scale)
    theta = lbfgs(objective, LinearWeights(coef, intercept).theta(), local_iter, 0.0, 10).x
    local = LinearWeights.from_theta(theta, n_classes)
    return local.coef, local.intercept, share


# ---------------------------------------------------------------------------------------------------- server side
@dataclass(frozen=True)
class FleetStats:
    """What the server knows after the first step: the label-space union and global feature statistics."""

    classes: list[str]
    counts: np.ndarray  #: (C,) samples per class over the fleet
    mean: np.ndarray  #: (D,) float32
    std: np.ndarray  #: (D,) float32
    n: int


def merge_stats(reports: Sequence[DeviceStats]) -> FleetStats:
    """Label-space union (sorted names) and exact global mean / standard deviation from every device's stats."""
    if not reports:
        raise DataError("no device joined the round; start at least one client with a matching bundle")
    classes = sorted({c for report in reports for c in report.classes})
    counts = np.zeros(len(classes), dtype=np.int64)
    total = np.zeros_like(reports[0].feature_sum)
    total_sq = np.zeros_like(total)
    n = 0
    for report in reports:
        for name, count in zip(report.classes, report.class_counts):
            counts[classes.index(name)] += int(count)
        total += report.feature_sum
        total_sq += report.feature_sumsq
        n += report.n
    if (counts > 0).sum() < 2:
        raise DataError(f"the fleet knows {len(classes)} class(es) with samples; a head needs at least two")
    mean = total / n
    var = np.maximum(total_sq / n - mean * mean, 0.0)
    return FleetStats(classes, counts, mean.astype(np.float32), (np.sqrt(var) + 1e-6).astype(np.float32), n)
