"""The label queue: which unlabelled images a person should label first (active learning), in numpy only.

An image earns its place by how much a label would teach the head:

- **uncertainty** — ``1 - margin``, the margin being the gap between the two largest *calibrated* class probabilities
  (the head's temperature applied, :func:`edgetl.novelty.calibrated_proba`): an image the head hesitates between two
  classes on lies near a decision boundary, where a label moves the boundary most (margin sampling, Scheffer et al.
  2001; Settles 2009 §3.1). The normalised entropy is reported beside it;
- **novelty** — how far the image's novelty score lies *beyond* the novelty threshold (the 95th percentile of held-out
  known images, :class:`edgetl.novelty.Novelty`): ``score / threshold - 1`` when positive. Images unlike every known
  class (perhaps a class the head does not know yet) must reach a person even when the head is (wrongly) confident.
  A novelty place needs a score of at least :data:`NOVEL_FACTOR` times the threshold: 5 % of known images lie beyond
  the threshold by its definition, but on the validation split hardly any known image reached twice it (below 0.05 %
  with all ten classes known from 100–500 labels), while the most novel images of a class the head did not know lay
  at 2–4 times it;
- **spread** — a person labels a page of the queue, then trains. The most uncertain images are often near-copies of
  one another (the same pair of classes, the same kind of picture); a page of them teaches what one of them does. So,
  given the embeddings, the uncertainty places of each page of :data:`BATCH` are filled from the :data:`WINDOW` most
  uncertain images per place (not yet placed): first by uncertainty, at most ``ceil(places / classes)`` per predicted
  class (an actively chosen set drifts towards the classes the head confuses most, and the softmax head learns the
  others from too few labels), then, for the places the cap leaves open, by uncertainty-weighted k-means in the space
  the head sees (:func:`head_space`: the softmax head's standardised embeddings), L2-normalised: one image per
  cluster, the one nearest its centre; the page then ordered by uncertainty (diverse mini-batch active learning,
  Zhdanov 2019). Only the first :data:`SPREAD_PLACES` places are spread so (nobody labels more before training); the
  rest follow by uncertainty alone.

- **cold start** — while the head has fewer than :data:`COLD_START_PER_CLASS` labels per class, its uncertainty is
  still a poor guide (it is sure of what it has not seen), so the first page's uncertainty places go to *typical*
  images of the regions no label covers yet (:func:`typical_picks`: k-means of the unlabelled and labelled images,
  the densest image of each of the largest clusters without a label; TypiClust, Hacohen et al. 2022, "Active learning
  on a budget"). Later pages, and every page once the head has enough labels, follow the rules above.

Novelty and uncertainty are interleaved, not added: one place in every :data:`NOVEL_EVERY` (the first, the eleventh,
…) goes to the most novel image at least :data:`NOVEL_FACTOR` times the threshold not yet placed (a page's novelty
places are filled before its uncertainty places; none such: the place goes to uncertainty); every other place to an
uncertain one. Arrival order plays no part. (An additive mix, ``0.7 × uncertainty + 0.3 × novelty``, was measured
first: on a closed set of classes the novelty term pulled in outliers and cost accuracy; interleaving bounds that cost
to one label in ten, and the factor to almost none, while a new class still reaches the top of the queue. The
spread, the class cap, the novelty factor and the cold start were chosen on a validation split of the training pool,
never on the test images — see the README's measurement and ``docs/results/active_learning_validation.json``.)

:func:`rank_head` is the one entry point for a head and embeddings: the console's queue and
``tools/measure_active_learning.py`` both call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edgetl.novelty import calibrated_proba

if TYPE_CHECKING:
    from edgetl.novelty import Novelty

#: one place in this many goes to the most novel image beyond the threshold (0: uncertainty only)
NOVEL_EVERY = 10
#: a novelty place needs a novelty score at least this many times the threshold (1: any image beyond it)
NOVEL_FACTOR = 2.0
#: a page of the queue: the places spread over the embedding space together
BATCH = 20
#: a page's uncertainty places are chosen among this many most uncertain images per place (1: no spread)
WINDOW = 20
#: the first places of the queue that are spread; the rest follow by uncertainty
SPREAD_PLACES = 100
#: k-means iterations (Lloyd) after the k-means++ start
KMEANS_ITERATIONS = 20
#: cold start: while the head has fewer labels than this per class, a page's uncertainty places go to typical images
#: of the regions no label covers yet (:func:`typical_picks`), not to the head's (still unreliable) uncertainty
COLD_START_PER_CLASS = 6
#: typicality: the inverse mean distance to this many nearest neighbours, among at most this many rows
TYPICALITY_NEIGHBOURS, TYPICALITY_SAMPLE = 20, 1000

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Ranking:
    """Scores of N images and their queue order. Arrays have shape ``(N,)``; ``priority`` is the uncertainty
    ``1 - margin``, ``novelty_term`` how far beyond the threshold (0 within it), ``by_novelty`` whether the image got
    its place through a novelty place, ``by_typical`` through the cold start (:func:`typical_picks`)."""

    order: npt.NDArray[np.int64]
    priority: FloatArray
    margin: FloatArray
    entropy: FloatArray
    novelty_term: FloatArray | None
    by_novelty: npt.NDArray[np.bool_]
    by_typical: npt.NDArray[np.bool_]


@dataclass(frozen=True)
class ColdStart:
    """What the cold start needs: the candidates' embeddings ``features`` ``(N, D)`` and the head's training
    embeddings ``labelled`` ``(L, D)``, in the same space (the backbone's own: a softmax head's standardisation,
    fitted on a few labels, is itself unreliable then), and how many labels per class end it."""

    features: npt.NDArray[np.floating]
    labelled: npt.NDArray[np.floating]
    per_class: int = COLD_START_PER_CLASS

    def applies(self, classes: int) -> bool:
        return len(self.labelled) < self.per_class * classes


@dataclass(frozen=True)
class HeadRanking:
    """A :class:`Ranking` with what it was computed from: calibrated probabilities ``(N, C)`` and novelty scores
    ``(N,)`` (None without a novelty model)."""

    ranking: Ranking
    proba: npt.NDArray[np.floating]
    novelty: npt.NDArray[np.floating] | None


def uncertainty_scores(proba: npt.NDArray[np.floating]) -> tuple[FloatArray, FloatArray]:
    """``(margin, normalised entropy)`` of probabilities ``(N, C)``, each ``(N,)``."""
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
    return margin, entropy


def kmeans(Z: FloatArray, weight: FloatArray, k: int, seed: int = 0,
           iterations: int = KMEANS_ITERATIONS) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Weighted k-means of the rows of ``Z`` ``(M, D)`` into ``k`` ≤ M clusters: a k-means++ start drawn with
    ``seed`` (the heaviest row first), then Lloyd iterations. Returns ``(assignment (M,), centres (k, D))``."""
    m = len(Z)
    w = np.maximum(np.asarray(weight, dtype=np.float64), 1e-12)
    sq = (Z * Z).sum(axis=1)
    rng = np.random.default_rng(seed)
    centres = [int(np.argmax(w))]
    d2 = np.maximum(sq + sq[centres[0]] - 2.0 * Z @ Z[centres[0]], 0.0)
    for _ in range(1, k):
        p = w * d2
        total = p.sum()
        nxt = int(rng.choice(m, p=p / total)) if total > 0 else int(np.argmin(np.isin(np.arange(m), centres)))
        centres.append(nxt)
        d2 = np.minimum(d2, np.maximum(sq + sq[nxt] - 2.0 * Z @ Z[nxt], 0.0))
    C = Z[centres].copy()

    def nearest_centre() -> npt.NDArray[np.int64]:
        return np.argmin(sq[:, None] - 2.0 * Z @ C.T + (C * C).sum(axis=1)[None, :], axis=1)

    for _ in range(iterations):
        assign = nearest_centre()
        moved = C.copy()
        for j in range(k):
            member = assign == j
            if member.any():
                moved[j] = (w[member, None] * Z[member]).sum(axis=0) / w[member].sum()
        if np.allclose(moved, C):
            break
        C = moved
    return nearest_centre(), C


def spread_pick(Z: FloatArray, weight: FloatArray, k: int, seed: int = 0,
                iterations: int = KMEANS_ITERATIONS) -> npt.NDArray[np.int64]:
    """``k`` distinct rows of ``Z`` ``(M, D)`` spread over its space: weighted :func:`kmeans`, then for each centre
    the nearest row not yet taken. Returns row indices ``(k,)`` (all rows when ``k >= M``)."""
    m = len(Z)
    if k >= m:
        return np.arange(m, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    _, C = kmeans(Z, weight, k, seed, iterations)
    D = (Z * Z).sum(axis=1)[:, None] - 2.0 * Z @ C.T + (C * C).sum(axis=1)[None, :]
    taken = np.zeros(m, dtype=bool)
    picked = []
    for j in np.argsort(D.min(axis=0), kind="stable"):  # the tightest centres choose first
        row = next(int(i) for i in np.argsort(D[:, j], kind="stable") if not taken[i])
        taken[row] = True
        picked.append(row)
    return np.asarray(picked, dtype=np.int64)


def typicality(Z: FloatArray, neighbours: int = TYPICALITY_NEIGHBOURS, seed: int = 0) -> FloatArray:
    """How typical each row of ``Z`` ``(M, D)`` is among the others: the inverse of its mean distance to its
    ``neighbours`` nearest rows (measured against at most :data:`TYPICALITY_SAMPLE` rows drawn with ``seed``, so the
    cost stays bounded in a large cluster). Returns ``(M,)``; a single row scores 1."""
    m = len(Z)
    if m < 2:
        return np.ones(m)
    ref = np.arange(m) if m <= TYPICALITY_SAMPLE else \
        np.sort(np.random.default_rng(seed).choice(m, TYPICALITY_SAMPLE, replace=False))
    sq = (Z * Z).sum(axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[ref][None, :] - 2.0 * Z @ Z[ref].T, 0.0))
    d[ref, np.arange(len(ref))] = np.inf  # a row is not its own neighbour
    n = min(neighbours, len(ref) - 1 if m <= TYPICALITY_SAMPLE else len(ref))
    nearest = np.partition(d, n - 1, axis=1)[:, :n]
    return 1.0 / (nearest.mean(axis=1) + 1e-9)


def typical_picks(Z: FloatArray, labelled: FloatArray, k: int, seed: int = 0) -> npt.NDArray[np.int64]:
    """``k`` rows of ``Z`` ``(M, D)`` that a head with the ``labelled`` embeddings ``(L, D)`` (same space) has not
    covered yet: k-means of both into ``L + k`` clusters, then the most :func:`typical <typicality>` row of each of
    the ``k`` largest clusters holding no labelled embedding (TypiClust, Hacohen et al. 2022). Returns row indices
    (fewer than ``k`` when fewer clusters are uncovered)."""
    m, n_labelled = len(Z), len(labelled)
    if k <= 0 or m == 0:
        return np.zeros(0, dtype=np.int64)
    both = np.concatenate([Z, labelled]) if n_labelled else Z
    clusters = min(n_labelled + k, len(both))
    assign, _ = kmeans(both, np.ones(len(both)), clusters, seed)
    covered = np.zeros(clusters, dtype=bool)
    covered[assign[m:]] = True
    sizes = np.bincount(assign[:m], minlength=clusters)
    picked = []
    for c in np.argsort(-sizes, kind="stable"):
        if len(picked) == k or sizes[c] == 0:
            break
        if not covered[c]:
            members = np.flatnonzero(assign[:m] == c)
            picked.append(int(members[np.argmax(typicality(Z[members], seed=seed))]))
    return np.asarray(picked, dtype=np.int64)


def class_capped(proba: npt.NDArray[np.floating], k: int) -> npt.NDArray[np.int64]:
    """Rows of ``proba`` ``(M, C)`` (in priority order) taken in order while their predicted class has fewer than
    ``ceil(k / C)`` rows taken, at most ``k``: a page spread over the head's classes. Returns row indices."""
    m, c = np.shape(proba)
    predicted = np.argmax(proba, axis=1)
    counts = np.zeros(max(c, 1), dtype=np.int64)
    cap = -(-k // max(c, 1))
    picked: list[int] = []
    for i in range(m):
        if len(picked) == k:
            break
        if counts[predicted[i]] < cap:
            counts[predicted[i]] += 1
            picked.append(i)
    return np.asarray(picked, dtype=np.int64)


def _spread_page(cand: npt.NDArray[np.int64], k: int, proba: npt.NDArray[np.floating], Z: FloatArray,
                 uncertainty: FloatArray, seed: int, balance: bool) -> npt.NDArray[np.int64]:
    """``k`` of the candidate images ``cand`` (most uncertain first) for a page's uncertainty places: with
    ``balance``, first by uncertainty at most ``ceil(k / C)`` per predicted class, then (places left) one per k-means
    cluster of the other candidates; ordered by uncertainty."""
    chosen = cand[class_capped(np.asarray(proba)[cand], k)] if balance else cand[:0]
    rest = cand[~np.isin(cand, chosen)]
    if len(chosen) < k:
        chosen = np.concatenate([chosen, rest[spread_pick(Z[rest], uncertainty[rest], k - len(chosen), seed)]])
    return chosen[np.argsort(-uncertainty[chosen], kind="stable")]


def _novelty_queue(novelty: npt.NDArray[np.floating], threshold: float,
                   factor: float = NOVEL_FACTOR) -> tuple[FloatArray, list[int]]:
    """``(novelty term (N,), images beyond the threshold and at least ``factor`` times it, most novel first)``."""
    ratio = np.asarray(novelty, dtype=np.float64) / float(threshold)
    novel = [int(i) for i in np.argsort(-ratio, kind="stable") if ratio[i] > 1.0 and ratio[i] >= factor]
    return np.clip(ratio - 1.0, 0.0, None), novel


def _next_unplaced(ranked: list[int], placed: npt.NDArray[np.bool_], start: int, count: int) -> tuple[int, list[int]]:
    """The first ``count`` images of ``ranked`` from ``start`` on that are not ``placed`` yet, and where the next
    unplaced one may be (the new start)."""
    while start < len(ranked) and placed[ranked[start]]:
        start += 1
    out = []
    for i in ranked[start:]:
        if len(out) == count:
            break
        if not placed[i]:
            out.append(i)
    return start, out


def _normalised(features: npt.ArrayLike) -> FloatArray:
    Z = np.asarray(features, dtype=np.float64)
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


def _place_typical(free: list[int], order: npt.NDArray[np.int64], placed: npt.NDArray[np.bool_],
                   by_typical: npt.NDArray[np.bool_], Z: FloatArray, labelled: FloatArray, seed: int) -> list[int]:
    """Fill the places ``free`` with :func:`typical_picks` among the images not ``placed`` yet (updating ``order``,
    ``placed`` and ``by_typical``); returns the places left (when fewer regions are uncovered than places)."""
    rest = np.flatnonzero(~placed)
    picks = rest[typical_picks(Z[rest], labelled, len(free), seed)]
    for pos, i in zip(free, picks):
        order[pos] = i
        placed[i] = by_typical[i] = True
    return free[len(picks):]


def rank(proba: npt.NDArray[np.floating], novelty: npt.NDArray[np.floating] | None = None,
         threshold: float | None = None, novel_every: int = NOVEL_EVERY,
         features: npt.NDArray[np.floating] | None = None, batch: int = BATCH, window: int = WINDOW,
         spread_places: int = SPREAD_PLACES, seed: int = 0, novel_factor: float = NOVEL_FACTOR,
         balance: bool = True, cold_start: ColdStart | None = None) -> Ranking:
    """The queue order of images with calibrated probabilities ``proba`` ``(N, C)``; when the head has a novelty
    model, their novelty scores ``(N,)`` and its ``threshold``; when known, their embeddings ``features`` ``(N, D)``.

    Places ``0, k, 2k, …`` (``k`` = ``novel_every``) go to the most novel images at least ``novel_factor`` times the
    threshold (while there are any), the others by uncertainty; with ``features``, the uncertainty places of each page
    of ``batch`` within the first ``spread_places`` are spread over the predicted classes (``balance``) and the
    embedding space (see the module docstring; ``window`` ≤ 1 or no features: uncertainty order). With
    ``cold_start`` and while it applies (fewer labels than its number per class), the first page's uncertainty places
    go to :func:`typical_picks` of its embeddings instead.
    Ties keep the given order; the same inputs give the same order (``seed``)."""
    margin, entropy = uncertainty_scores(proba)
    n = len(margin)
    uncertainty = 1.0 - margin
    by_uncertainty = [int(i) for i in np.argsort(-uncertainty, kind="stable")]
    novelty_term, novel = None, []
    if novelty is not None and threshold and novel_every >= 1:
        novelty_term, novel = _novelty_queue(novelty, threshold, novel_factor)
    if features is not None and len(features) != n:
        raise ValueError(f"features must have one row per image ({n}), found {len(features)}")
    Z = _normalised(features) if features is not None and window > 1 and batch > 1 else None
    order = np.empty(n, dtype=np.int64)
    placed = np.zeros(n, dtype=bool)
    by_novelty = np.zeros(n, dtype=bool)
    by_typical = np.zeros(n, dtype=bool)
    if cold_start is not None and len(cold_start.features) != n:
        raise ValueError(f"cold-start features must have one row per image ({n}), found {len(cold_start.features)}")
    cold = cold_start is not None and cold_start.applies(np.shape(proba)[1])
    u = v = 0
    for start in range(0, n, max(batch, 1)):
        page = range(start, min(start + max(batch, 1), n))
        novel_places = {pos for pos in page if novel_every >= 1 and pos % novel_every == 0}
        for pos in sorted(novel_places):
            while v < len(novel) and placed[novel[v]]:
                v += 1
            if v < len(novel):
                order[pos] = novel[v]
                placed[novel[v]] = by_novelty[novel[v]] = True
            else:
                novel_places.discard(pos)
        free = [pos for pos in page if pos not in novel_places]
        if cold and start == 0 and cold_start is not None:
            free = _place_typical(free, order, placed, by_typical, _normalised(cold_start.features),
                                  _normalised(cold_start.labelled), seed)
        spread = Z is not None and start < spread_places
        u, candidates = _next_unplaced(by_uncertainty, placed, u, window * len(free) if spread else len(free))
        if spread and Z is not None and len(candidates) > len(free):
            chosen = _spread_page(np.asarray(candidates), len(free), proba, Z, uncertainty, seed + start, balance)
        else:
            chosen = np.asarray(candidates[:len(free)], dtype=np.int64)
        for pos, i in zip(free, chosen):
            order[pos] = i
            placed[i] = True
    return Ranking(order, uncertainty, margin, entropy, novelty_term, by_novelty, by_typical)


def rank_head(head: Any, X: npt.NDArray[np.floating], temperature: float | None = None,
              novelty_model: Novelty | None = None, labelled: npt.NDArray[np.floating] | None = None,
              cold_start_per_class: int = COLD_START_PER_CLASS, **options: Any) -> HeadRanking:
    """The queue order of embeddings ``X`` ``(N, D)`` under ``head`` with its fitted ``temperature`` and novelty
    model (either may be None), given the head's training embeddings ``labelled`` ``(L, D)`` when known (the cold
    start needs them): :func:`rank` of the calibrated probabilities, the novelty scores and the embeddings as the
    head sees them (:func:`head_space`).
    ``options`` go to :func:`rank` (``novel_every=0``, ``window=1``: the ablations)."""
    proba = calibrated_proba(head, X, temperature)
    scores = novelty_model.score(X) if novelty_model is not None else None
    threshold = novelty_model.threshold if novelty_model is not None else None
    cold = None if labelled is None else ColdStart(X, labelled, cold_start_per_class)
    return HeadRanking(rank(proba, scores, threshold, features=head_space(head, X), cold_start=cold, **options),
                       proba, scores)


def head_space(head: Any, X: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    """Embeddings ``(N, D)`` as ``head`` sees them, where the spread is measured: its own ``transform`` (the
    multi-depth head's columns, standardised), its standardisation ``(X - mean_) / scale_`` (the softmax head), else
    ``X`` as it is (heads that work on the normalised embeddings themselves)."""
    transform = getattr(head, "transform", None)
    if callable(transform):
        return np.asarray(transform(X))
    mean, scale = getattr(head, "mean_", None), getattr(head, "scale_", None)
    if isinstance(mean, np.ndarray) and isinstance(scale, np.ndarray) and mean.shape == scale.shape == X.shape[1:]:
        return (np.asarray(X, dtype=np.float64) - mean) / scale
    return X


def describe(novel_every: int = NOVEL_EVERY, batch: int = BATCH, window: int = WINDOW,
             novel_factor: float = NOVEL_FACTOR, cold_start_per_class: int = COLD_START_PER_CLASS) -> str:
    """The ranking in one sentence (``GET /api/queue`` shows it)."""
    return (f"1 place in {novel_every} (the first, ...) to the most novel image at least {novel_factor:g} times the "
            f"unknown threshold, the others by uncertainty (1 - margin of the calibrated probabilities); the first "
            f"places in pages of {batch} spread over the predicted classes and the embedding space (among the "
            f"{window} most uncertain per place: a cap per predicted class, then one per k-means cluster); while the "
            f"head has fewer than {cold_start_per_class} labels per class, the first page's places go to the most "
            f"typical image of each region no label covers (cold start)")


__all__ = ["BATCH", "COLD_START_PER_CLASS", "NOVEL_EVERY", "NOVEL_FACTOR", "SPREAD_PLACES", "WINDOW", "ColdStart",
           "HeadRanking", "Ranking", "class_capped", "describe", "head_space", "kmeans", "rank", "rank_head",
           "spread_pick", "typical_picks", "typicality", "uncertainty_scores"]
