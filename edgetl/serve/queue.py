"""The label queue: which unlabelled images a person should label first (active learning), in numpy only.

An image earns its place by how much a label would teach the head:

- **uncertainty** — ``1 - margin``, the margin being the gap between the two largest *calibrated* class probabilities
  (the head's temperature applied, :func:`edgetl.novelty.calibrated_proba`): an image the head hesitates between two
  classes on lies near a decision boundary, where a label moves the boundary most (margin sampling, Scheffer et al.
  2001; Settles 2009 §3.1). The normalised entropy is reported beside it;
- **novelty** — how far the image's novelty score lies *beyond* the novelty threshold (the 95th percentile of held-out
  known images, :class:`edgetl.novelty.Novelty`): ``score / threshold - 1`` when positive. Images unlike every known
  class (perhaps a class the head does not know yet) must reach a person even when the head is (wrongly) confident.

The two are interleaved, not added: one place in every :data:`NOVEL_EVERY` (the first, the eleventh, …) goes to the
most novel image beyond the threshold not yet placed; every other place to the most uncertain one. Arrival order plays
no part. (An additive mix, ``0.7 × uncertainty + 0.3 × novelty``, was measured first: on a closed set of classes the
novelty term pulled in outliers and cost accuracy; interleaving bounds that cost to one label in ten while a new class
still reaches the top of the queue — see the README's measurement.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: one place in this many goes to the most novel image beyond the threshold (0: uncertainty only)
NOVEL_EVERY = 10


@dataclass(frozen=True)
class Ranking:
    """Scores of N images and their queue order. Arrays have shape ``(N,)``; ``priority`` is the uncertainty
    ``1 - margin``, ``novelty_term`` how far beyond the threshold (0 within it), ``by_novelty`` whether the image got
    its place through a novelty place."""

    order: npt.NDArray[np.int64]
    priority: npt.NDArray[np.float64]
    margin: npt.NDArray[np.float64]
    entropy: npt.NDArray[np.float64]
    novelty_term: npt.NDArray[np.float64] | None
    by_novelty: npt.NDArray[np.bool_]


def rank(proba: npt.NDArray[np.floating], novelty: npt.NDArray[np.floating] | None = None,
         threshold: float | None = None, novel_every: int = NOVEL_EVERY) -> Ranking:
    """The queue order of images with calibrated probabilities ``proba`` ``(N, C)`` and, when the head has a novelty
    model, novelty scores ``(N,)`` and its ``threshold``: places ``0, k, 2k, …`` (``k`` = ``novel_every``) to the most
    novel images beyond the threshold (while there are any), the others by uncertainty. Ties keep the given order."""
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
    by_uncertainty = np.argsort(-uncertainty, kind="stable")
    by_novelty = np.zeros(n, dtype=bool)
    novelty_term = None
    if novelty is None or not threshold or novel_every < 1:
        return Ranking(by_uncertainty.astype(np.int64), uncertainty, margin, entropy, novelty_term, by_novelty)
    excess = np.asarray(novelty, dtype=np.float64) / float(threshold) - 1.0
    novelty_term = np.clip(excess, 0.0, None)
    novel = [int(i) for i in np.argsort(-excess, kind="stable") if excess[i] > 0]
    order = np.empty(n, dtype=np.int64)
    placed = np.zeros(n, dtype=bool)
    u = v = 0
    for pos in range(n):
        if pos % novel_every == 0:
            while v < len(novel) and placed[novel[v]]:
                v += 1
            if v < len(novel):
                order[pos] = novel[v]
                placed[novel[v]] = by_novelty[novel[v]] = True
                continue
        while placed[by_uncertainty[u]]:
            u += 1
        order[pos] = by_uncertainty[u]
        placed[by_uncertainty[u]] = True
    return Ranking(order, uncertainty, margin, entropy, novelty_term, by_novelty)


__all__ = ["NOVEL_EVERY", "Ranking", "rank"]
