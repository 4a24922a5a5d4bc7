"""The head contract, run over every registered head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgetl.errors import DataError, NotFittedError
from edgetl.heads import HEADS, load_head, make_head


def clusters(n_per_class: int = 60, classes: int = 4, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim))
    X = np.concatenate([c + rng.normal(0, 1, (n_per_class, dim)) for c in centres]).astype(np.float32)
    return X, np.repeat(np.arange(classes), n_per_class)


@pytest.fixture(params=sorted(HEADS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_unfitted_raises(kind: str) -> None:
    with pytest.raises(NotFittedError):
        make_head(kind).predict(np.zeros((1, 4), dtype=np.float32))


def test_fit_predict_on_separable_clusters(kind: str) -> None:
    X, y = clusters()
    head = make_head(kind, seed=0)
    assert head.fit(X, y) is head
    proba = head.predict_proba(X)
    assert proba.shape == (len(X), 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    # a held-out draw from the same clusters (different noise)
    X2, y2 = clusters(seed=0)[0][::2] + np.random.default_rng(5).normal(0, 0.5, (120, 32)).astype(np.float32), y[::2]
    assert (head.predict(X2) == y2).mean() > 0.95


def test_save_load_roundtrip(kind: str, tmp_path: Path) -> None:
    X, y = clusters()
    head = make_head(kind, seed=0).fit(X, y)
    head.save(tmp_path / "h.npz")
    again = load_head(tmp_path / "h.npz")
    assert type(again) is type(head)
    np.testing.assert_array_equal(again.predict_proba(X), head.predict_proba(X))
    with np.load(tmp_path / "h.npz", allow_pickle=False) as data:  # no pickled object inside
        assert all(data[k].dtype != object for k in data.files)


def test_rejects_one_class_and_bad_shapes(kind: str) -> None:
    X, _ = clusters()
    with pytest.raises(DataError, match="two classes"):
        make_head(kind).fit(X, np.zeros(len(X), dtype=np.int64))
    with pytest.raises(DataError, match="labels"):
        make_head(kind).fit(X, np.zeros(3, dtype=np.int64))
    head = make_head(kind).fit(*clusters())
    with pytest.raises(DataError, match="features"):
        head.predict(np.zeros((2, 7), dtype=np.float32))
    with pytest.raises(DataError, match="NaN"):
        head.predict(np.full((2, 32), np.nan, dtype=np.float32))


def test_deterministic_with_seed(kind: str) -> None:
    X, y = clusters()
    a = make_head(kind, seed=3).fit(X, y).predict_proba(X)
    b = make_head(kind, seed=3).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)


def test_unknown_head() -> None:
    with pytest.raises(DataError, match="unknown head"):
        make_head("forest")


@pytest.mark.parametrize("kind", ["ncm", "knn", "imprint"])
def test_partial_fit_adds_a_class_without_forgetting(kind: str) -> None:
    X, y = clusters(classes=4)
    head = make_head(kind).fit(X[y < 3], y[y < 3])
    head.partial_fit(X[y == 3], y[y == 3])
    X2, y2 = clusters(classes=4, seed=0)
    X2 = X2 + np.random.default_rng(9).normal(0, 0.5, X2.shape).astype(np.float32)
    assert (head.predict(X2) == y2).mean() > 0.95


def test_imprint_partial_fit_is_exact() -> None:
    X, y = clusters()
    whole = make_head("imprint", scale=10.0).fit(X, y)
    parts = make_head("imprint", scale=10.0).fit(X[::2], y[::2]).partial_fit(X[1::2], y[1::2])
    np.testing.assert_allclose(parts.prototypes(), whole.prototypes(), atol=1e-6)


@pytest.mark.parametrize("kind", ["ncm", "imprint"])
def test_prototype_scale_minimises_training_nll(kind: str) -> None:
    from edgetl.heads.base import softmax

    X, y = clusters(classes=5, seed=2)
    X = X + np.random.default_rng(4).normal(0, 10, X.shape).astype(np.float32)  # overlapping: a finite best scale
    head = make_head(kind).fit(X, y)

    def nll(s: float) -> float:
        p = softmax(head._cosines(X) * s)
        return float(-np.log(p[np.arange(len(y)), y]).mean())

    grid = np.geomspace(1.0, 100.0, 400)
    best = grid[np.argmin([nll(s) for s in grid])]
    assert 1.0 < best < 100.0
    assert abs(np.log(float(head.scale_) / best)) < 0.02


def test_imprint_refinement_lowers_the_loss_and_keeps_untouched_classes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Imprinting then a few softmax steps (Qi et al. 2018): better on overlapping classes; old files still load."""
    from edgetl.heads import ImprintHead, load_head

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16))
    y = rng.integers(0, 4, 600)
    X = centres[y] + 1.2 * rng.standard_normal((600, 16))  # overlapping clusters: class means are not optimal
    Xt, yt = X[400:], y[400:]
    plain = ImprintHead().fit(X[:400], y[:400])
    refined = ImprintHead(refine_steps=30).fit(X[:400], y[:400])
    assert (refined.predict(Xt) == yt).mean() >= (plain.predict(Xt) == yt).mean()
    np.testing.assert_allclose(np.linalg.norm(refined.weights_, axis=1), 1.0, rtol=1e-5)

    def nll(head: ImprintHead) -> float:
        return float(-np.log(head.predict_proba(X[:400])[np.arange(400), y[:400]]).mean())

    assert nll(refined) < nll(plain)
    before = refined.weights_.copy()
    refined.partial_fit(X[400:450][y[400:450] == 2], np.full(int((y[400:450] == 2).sum()), 2))
    np.testing.assert_array_equal(refined.weights_[[0, 1, 3]], before[[0, 1, 3]])  # untouched classes keep theirs
    # a head file from before refinement existed (no weights_ array) loads and predicts as imprinting did
    path = tmp_path / "old.npz"
    plain.save(path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "weights_"}
    np.savez(path, **arrays)
    np.testing.assert_allclose(load_head(path).decision_function(Xt), plain.decision_function(Xt), rtol=1e-5)
