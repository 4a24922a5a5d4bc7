"""The label queue's ranking (numpy only; no serve extra needed): the spread of a page over the embedding space, the
cold start."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.serve.queue import (
    BATCH,
    NOVEL_FACTOR,
    WINDOW,
    ColdStart,
    class_capped,
    head_space,
    rank,
    rank_head,
    spread_pick,
)


def _two_groups(n_a: int = 12, n_b: int = 4, n_easy: int = 20, dim: int = 8,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(N, 2)`` and embeddings ``(N, dim)``: group A, near-copies the head is most unsure of
    (margins 0.00-0.11); group B, unsure too but a little less (margins 0.2-0.23) and elsewhere in the space; then easy
    images (margins 0.8-0.99)."""
    rng = np.random.default_rng(seed)
    margins = np.concatenate([np.linspace(0.0, 0.11, n_a), np.linspace(0.2, 0.23, n_b), np.linspace(0.8, 0.99, n_easy)])
    p1 = (1 + margins) / 2
    proba = np.stack([p1, 1 - p1], axis=1)
    centres = np.eye(dim)[[0, 1, 2]] * 10
    group = np.repeat([0, 1, 2], [n_a, n_b, n_easy])
    X = centres[group] + rng.normal(scale=0.05, size=(len(group), dim))
    return proba, X


def test_a_page_is_spread_over_the_space() -> None:
    proba, X = _two_groups()
    plain = rank(proba, batch=4).order[:4]
    assert set(plain.tolist()) <= set(range(12))  # by uncertainty alone: four near-copies of group A
    spread = rank(proba, features=X, batch=4, window=4).order
    first = spread[:4].tolist()
    assert any(i < 12 for i in first) and any(12 <= i < 16 for i in first), first  # both groups on the first page
    assert all(i < 16 for i in first)  # but only uncertain images: the page comes from the window's 16
    # within the page, by uncertainty
    u = 1 - np.abs(proba[:, 0] - proba[:, 1])
    assert [u[i] for i in first] == sorted((u[i] for i in first), reverse=True)
    assert sorted(spread.tolist()) == list(range(len(proba)))  # every image once


def test_spread_stays_within_the_window() -> None:
    """An easy image far from everything is never pulled onto a page by its distance alone."""
    proba, X = _two_groups(n_b=0)
    order = rank(proba, features=X, batch=4, window=2).order
    assert all(i < 8 for i in order[:4])  # the 2 x 4 most uncertain images


def test_without_features_or_window_it_is_uncertainty_order() -> None:
    proba, X = _two_groups()
    by_margin = np.argsort(np.abs(proba[:, 0] - proba[:, 1]), kind="stable").tolist()
    assert rank(proba).order.tolist() == by_margin
    assert rank(proba, features=X, window=1).order.tolist() == by_margin
    assert rank(proba, features=X, spread_places=0).order.tolist() == by_margin


def test_spread_only_on_the_first_places() -> None:
    proba, X = _two_groups(n_a=40, n_b=10, n_easy=30)
    order = rank(proba, features=X, batch=4, window=4, spread_places=8).order
    by_margin = np.argsort(np.abs(proba[:, 0] - proba[:, 1]), kind="stable")
    rest = [i for i in by_margin.tolist() if i not in set(order[:8].tolist())]
    assert order[8:].tolist() == rest


def test_novelty_places_kept_with_spread() -> None:
    proba, X = _two_groups()
    novelty = np.full(len(proba), 0.5)
    novelty[[30, 20]] = [3.0, 2.0]  # two easy images beyond the threshold, 30 the more novel
    r = rank(proba, novelty, threshold=1.0, novel_every=4, features=X, batch=8)
    assert r.order[0] == 30 and r.order[4] == 20
    assert r.by_novelty.sum() == 2 and r.by_novelty[[30, 20]].all()
    assert not r.by_novelty[r.order[[1, 2, 3, 5, 6, 7]]].any()


def test_same_inputs_same_order() -> None:
    rng = np.random.default_rng(3)
    n = 3 * WINDOW * BATCH
    proba = rng.dirichlet(np.ones(5), n)
    X = rng.normal(size=(n, 16))
    a = rank(proba, features=X).order
    assert a.tolist() == rank(proba, features=X).order.tolist()
    assert sorted(a.tolist()) == list(range(n))
    assert len(set(a[:BATCH].tolist())) == BATCH
    u = 1 - np.abs(np.diff(-np.sort(-proba, axis=1)[:, :2], axis=1)[:, 0])
    window = set(np.argsort(-u, kind="stable")[:WINDOW * BATCH].tolist())
    assert set(a[:BATCH].tolist()) <= window


def test_spread_pick() -> None:
    Z = np.array([[0.0, 0.0], [0.01, 0.0], [0.0, 0.01], [5.0, 5.0], [5.01, 5.0]])
    picked = spread_pick(Z, np.ones(5), 2)
    assert len(set(picked.tolist())) == 2 and {int(i) < 3 for i in picked} == {True, False}
    assert spread_pick(Z, np.ones(5), 9).tolist() == [0, 1, 2, 3, 4]
    assert spread_pick(Z, np.ones(5), 0).tolist() == []


def test_rank_head_without_novelty_model() -> None:
    from edgetl.heads import make_head

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (30, 6)), rng.normal(2, 1, (30, 6))]).astype(np.float32)
    y = np.repeat([0, 1], 30)
    head = make_head("softmax", l2=0.1, seed=0).fit(X, y)
    ranked = rank_head(head, X)
    r = ranked.ranking
    assert ranked.novelty is None and r.novelty_term is None and not r.by_novelty.any()
    assert ranked.proba.shape == (60, 2)
    np.testing.assert_allclose(ranked.proba, head.predict_proba(X))  # no temperature: the head's own
    assert sorted(r.order.tolist()) == list(range(60))
    with pytest.raises(ValueError, match="one row per image"):
        rank(ranked.proba, features=X[:10])


def test_spread_is_measured_where_the_head_looks() -> None:
    """The softmax head standardises the embeddings: the spread is measured there, not on the raw embeddings."""
    from edgetl.heads import make_head

    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 5)).astype(np.float32) * np.array([100.0, 1, 1, 1, 1], dtype=np.float32)
    y = (X[:, 1] > 0).astype(np.int64)
    head = make_head("softmax", l2=0.1, seed=0).fit(X, y)
    Z = head_space(head, X)
    np.testing.assert_allclose(Z, (X - head.mean_) / head.scale_, rtol=1e-5)
    assert np.allclose(Z.std(axis=0), 1.0, atol=0.05)  # the raw first column (scale 100) no longer dominates
    ranked = rank_head(head, X)
    assert ranked.ranking.order.tolist() == rank(ranked.proba, features=Z).order.tolist()
    ncm = make_head("ncm").fit(X, y)  # works on the embeddings themselves
    assert head_space(ncm, X) is X


def test_a_novelty_place_needs_the_factor_times_the_threshold() -> None:
    proba, X = _two_groups()
    novelty = np.full(len(proba), 0.5)
    novelty[[30, 20]] = [NOVEL_FACTOR + 1.0, (1.0 + NOVEL_FACTOR) / 2]  # 20: beyond the threshold, not twice it
    r = rank(proba, novelty, threshold=1.0, novel_every=4, features=X, batch=8)
    assert r.order[0] == 30 and r.by_novelty.sum() == 1 and not r.by_novelty[20]
    assert r.order[4] != 20 and r.novelty_term[20] > 0  # the place went to uncertainty; the term is still reported
    anyone = rank(proba, novelty, threshold=1.0, novel_every=4, features=X, batch=8, novel_factor=1.0)
    assert anyone.order[0] == 30 and anyone.order[4] == 20 and anyone.by_novelty.sum() == 2


def test_class_capped_takes_rows_in_order_up_to_the_cap_per_predicted_class() -> None:
    predicted = [0, 0, 0, 1, 0, 1, 2]
    proba = np.eye(3)[predicted] * 0.5 + 0.5 / 3
    assert class_capped(proba, 3).tolist() == [0, 3, 6]  # cap 1 per class
    assert class_capped(proba, 6).tolist() == [0, 1, 3, 5, 6]  # cap 2: class 0 stops after two
    assert class_capped(proba, 0).tolist() == [] and class_capped(proba[:0], 4).tolist() == []


def test_a_page_is_spread_over_the_predicted_classes() -> None:
    # six images the head leans to class 0 on (the most uncertain), two it leans to class 1 on
    p0 = np.array([0.51, 0.51, 0.52, 0.52, 0.53, 0.53, 0.45, 0.44])
    proba = np.stack([p0, 1 - p0], axis=1)
    X = np.random.default_rng(0).normal(size=(8, 4))
    page = rank(proba, features=X, batch=4, window=2).order[:4]
    assert sorted(np.argmax(proba[page], axis=1).tolist()) == [0, 0, 1, 1]
    assert set(page.tolist()) == {0, 1, 6, 7}  # the two most uncertain of each class


def _blobs(sizes: list[int], dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of well-separated blobs of the given sizes (each with one dense core and a loose rim), and the blob
    of every row."""
    rng = np.random.default_rng(seed)
    blob = np.repeat(np.arange(len(sizes)), sizes)
    centres = np.eye(dim)[: len(sizes)] * 10
    spread = np.where(np.arange(len(blob)) % 3 == 0, 1.5, 0.2)[:, None]  # every third row on the rim
    return centres[blob] + rng.normal(size=(len(blob), dim)) * spread, blob


def test_typicality_is_highest_in_the_dense_core() -> None:
    from edgetl.serve.queue import typicality

    Z, _ = _blobs([30])
    t = typicality(Z, neighbours=5)
    rim = np.arange(30) % 3 == 0
    assert t.shape == (30,) and t[~rim].min() > t[rim].max()
    assert typicality(Z[:1]).tolist() == [1.0] and typicality(Z[:0]).shape == (0,)
    big = np.random.default_rng(0).normal(size=(1500, 3))  # more rows than the sample: bounded cost, same ordering
    t = typicality(big, neighbours=10)
    assert t.shape == (1500,) and np.corrcoef(t, -np.linalg.norm(big, axis=1))[0, 1] > 0.8


def test_typical_picks_go_to_the_largest_regions_no_label_covers() -> None:
    from edgetl.serve.queue import typical_picks

    Z, blob = _blobs([40, 30, 20, 10])
    labelled = Z[[0]] + 0.01  # one label inside the largest blob
    picks = typical_picks(Z, labelled, 2)
    assert sorted(blob[picks].tolist()) == [1, 2]  # the largest blobs without a label, not the labelled one
    assert all(i % 3 != 0 for i in picks)  # each from its blob's dense core, not its rim
    assert sorted(blob[typical_picks(Z, Z[:0], 4)].tolist()) == [0, 1, 2, 3]  # nothing labelled: one per blob
    assert typical_picks(Z, labelled, 0).tolist() == [] and typical_picks(Z[:0], labelled, 3).tolist() == []


def test_cold_start_fills_the_first_page_with_typical_images_until_the_head_has_enough_labels() -> None:
    from edgetl.serve.queue import COLD_START_PER_CLASS

    Z, blob = _blobs([40, 30, 20, 10])
    rng = np.random.default_rng(3)
    p0 = rng.uniform(0.5, 1.0, len(blob))
    proba = np.stack([p0, 1 - p0], axis=1)
    few = ColdStart(Z, Z[[0, 1]])  # two labels, two classes: below the cold-start number
    cold = rank(proba, features=Z, batch=4, cold_start=few)
    assert cold.by_typical.sum() == 4 and cold.by_typical[cold.order[:4]].all()  # the whole first page
    assert {1, 2} <= set(blob[cold.order[:4]].tolist())  # the largest blobs without a label are there
    assert not cold.by_typical[cold.order[4:]].any()  # later pages: the usual rules
    assert sorted(cold.order.tolist()) == list(range(len(blob)))  # still every image once
    enough = ColdStart(Z, Z[np.arange(COLD_START_PER_CLASS * 2)])
    warm = rank(proba, features=Z, batch=4, cold_start=enough)
    assert not warm.by_typical.any()
    assert warm.order.tolist() == rank(proba, features=Z, batch=4).order.tolist()
    off = rank(proba, features=Z, batch=4, cold_start=ColdStart(Z, Z[[0, 1]], per_class=0))
    assert off.order.tolist() == warm.order.tolist()
    with pytest.raises(ValueError, match="one row per image"):
        rank(proba, features=Z, cold_start=ColdStart(Z[:5], Z[[0]]))


def test_rank_head_cold_start_works_in_the_backbone_space() -> None:
    """The cold start clusters the embeddings themselves: a softmax head's standardisation, fitted on a few labels,
    is not used for it (it can blow one noisy dimension up)."""
    from edgetl.heads import make_head

    Z, blob = _blobs([40, 30, 20, 10])
    X = Z.astype(np.float32)
    y = (blob >= 2).astype(np.int64)
    seen = [1, 2, 71, 72]  # two labels in blob 0, two in blob 2
    head = make_head("softmax", l2=0.1, seed=0).fit(X[seen], y[seen])
    r = rank_head(head, X, labelled=X[seen]).ranking
    page = r.order[:BATCH]
    assert r.by_typical[page].all() and {1, 3} <= set(blob[page].tolist())
    assert r.order.tolist() == rank(rank_head(head, X).proba, features=head_space(head, X), batch=BATCH,
                                    cold_start=ColdStart(X, X[seen])).order.tolist()
    assert not rank_head(head, X, labelled=X[seen], cold_start_per_class=1).ranking.by_typical.any()
