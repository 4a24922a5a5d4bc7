"""The label queue: which unlabelled images a person should label first (active learning), in numpy only.

An image earns its place by how much a label would teach the head:

- **uncertainty** — ``1 - margin``, the margin being the gap between the two largest *calibrated* class probabilities
  (the head's temperature applied, :func:`edgetl.novelty.calibrated_proba`): an image the head hesitates between two
  classes on lies near a decision boundary, where a label moves the boundary most (margin sampling, Scheffer et al.
  2001; Settles 2009 §3.1). The normalised entropy is reported beside it;
- **novelty** — how far the image's novelty score lies *beyond* the novelty threshold (the 95th percentile of held-out
  known images, :class:`edgetl.novelty.Novelty`): ``clip(score / threshold - 1, 0, 1)``, 0 for every image that looks
  like a known class, 1 at twice the threshold. Images unlike every known class (perhaps a class the head does not
  know yet) rise even when the head is (wrongly) confident; familiar images are ranked by uncertainty alone (a novelty
  term that also ranked familiar images pulled in outliers and cost accuracy: see the README's measurement).

``priority = (1 - w) * uncertainty + w * novelty_term`` (``w`` = :data:`NOVELTY_WEIGHT`). Arrival order plays no part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: weight of the novelty term in the priority (the rest goes to uncertainty)
NOVELTY_WEIGHT = 0.3


@dataclass(frozen=True)
class Ranking:
    """Scores of N images and their order, highest priority first. Arrays have shape ``(N,)``."""

    order: npt.NDArray[np.int64]
    priority: npt.NDArray[np.float64]
    margin: npt.NDArray[np.float64]
    entropy: npt.NDArray[np.float64]
    novelty_term: npt.NDArray[np.float64] | None


def rank(proba: npt.NDArray[np.floating], novelty: npt.NDArray[np.floating] | None = None,
         threshold: float | None = None, novelty_weight: float = NOVELTY_WEIGHT) -> Ranking:
    """Rank images by priority from their calibrated probabilities ``proba`` ``(N, C)`` and, when the head has a
    novelty model, their novelty scores ``(N,)`` and its ``threshold``. Ties keep the given order."""
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"proba must be (N, C), found shape {p.shape}")
    n, c = p.shape
    if c >= 2:
        top2 = -np.partition(-p, 1, axis=1)[:, :2]
        margin = top2[:, 0] - top2[:, 1]
    else:
        margin = np.ones(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1) / (np.log(c) if c > 1 else 1.0)
    uncertainty = 1.0 - margin
    novelty_term = None
    if novelty is not None and threshold:
        novelty_term = np.clip(np.asarray(novelty, dtype=np.float64) / float(threshold) - 1.0, 0.0, 1.0)
        priority = (1.0 - novelty_weight) * uncertainty + novelty_weight * novelty_term
    else:
        priority = uncertainty
    order = np.argsort(-priority, kind="stable").astype(np.int64)
    return Ranking(order, priority, margin, entropy, novelty_term)


__all__ = ["NOVELTY_WEIGHT", "Ranking", "rank"]
