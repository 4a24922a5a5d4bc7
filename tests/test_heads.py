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


# ------------------------------------------------------------------------------- what the fleet builds heads from
def test_l2_normalise_gives_unit_rows_and_keeps_zero_rows() -> None:
    from edgetl.heads.base import l2_normalise

    X = np.array([[3.0, 4.0], [0.0, 0.0], [1e-20, 0.0]])
    Z = l2_normalise(X)
    assert Z.dtype == np.float64
    np.testing.assert_allclose(Z, [[0.6, 0.8], [0.0, 0.0], [1e-8, 0.0]])
    assert l2_normalise(X, np.float32).dtype == np.float32


def test_ncm_head_from_sums_is_the_fitted_head(tmp_path: Path) -> None:
    from edgetl.heads import NCMHead

    X, y = clusters()
    fitted = NCMHead().fit(X, y)
    head = NCMHead.from_sums(fitted.centre_, fitted.sums_, fitted.counts_, float(fitted.scale_))
    np.testing.assert_array_equal(head.decision_function(X), fitted.decision_function(X))
    head.save(tmp_path / "h.npz")
    again = load_head(tmp_path / "h.npz")
    assert isinstance(again, NCMHead) and again.get_params() == fitted.get_params()
    np.testing.assert_array_equal(again.decision_function(X), fitted.decision_function(X))


def test_scale_moments_of_parts_add_up_to_the_heads_scale() -> None:
    """The scale fit driven by moments summed over two halves of the data finds the head's own scale."""
    from edgetl.heads import NCMHead
    from edgetl.heads.base import l2_normalise
    from edgetl.heads.prototype import ScaleSearch, scale_moments

    X, y = clusters(classes=5, dim=16)
    X += np.random.default_rng(1).normal(0, 3, X.shape).astype(np.float32)  # overlapping classes: a finite scale
    head = NCMHead().fit(X, y)
    cos = (l2_normalise(X - head.centre_) @ head.prototypes().T).astype(np.float64)
    halves = (slice(0, 150), slice(150, None))
    search = ScaleSearch()
    while not search.done:
        parts = [scale_moments(cos[h], y[h], search.scale) for h in halves]
        np.testing.assert_allclose(sum(parts), scale_moments(cos, y, search.scale), rtol=1e-9)
        search.update(sum(parts))
    assert 1.0 < search.scale < 100.0 and search.steps < 30
    assert search.scale == pytest.approx(float(head.scale_), rel=1e-5)


def test_softmax_objective_of_a_fitted_head_and_of_its_parts() -> None:
    """``SoftmaxHead.objective`` is the head's objective on raw embeddings: nearly stationary at a fitted head, and
    the sum of its terms over parts of the data (weighted as the whole) is the whole's."""
    from edgetl.heads import SoftmaxHead
    from edgetl.heads.softmax import LinearWeights, add_l2

    X, y = clusters(classes=3, dim=8)
    X += np.random.default_rng(2).normal(0, 3, X.shape).astype(np.float32)
    head = SoftmaxHead(l2=0.1, tol=1e-9, max_iter=500).fit(X, y)
    weights = np.full(len(y), 1.0 / len(y))  # balanced classes: the head's weights
    settings = {"l2": 0.1, "mean": head.mean_, "scale": head.scale_}
    objective = SoftmaxHead.objective(X, y, 3, sample_weight=weights, **settings)
    theta = LinearWeights(head.coef_, head.intercept_).theta()
    _, grad = objective(theta)
    _, grad0 = objective(np.zeros_like(theta))
    assert float(np.linalg.norm(grad)) < 1e-3 * float(np.linalg.norm(grad0))
    parts = [SoftmaxHead.objective(X[h], y[h], 3, sample_weight=weights[h], l2=0.0, mean=head.mean_,
                                   scale=head.scale_) for h in (slice(0, 100), slice(100, None))]

    def summed(t: np.ndarray) -> tuple[float, np.ndarray]:
        terms = [part(t) for part in parts]
        return sum(v for v, _ in terms), np.sum([g for _, g in terms], axis=0)

    whole_loss, whole_grad = objective(theta)
    loss, grad = add_l2(summed, 0.1, 8 * 3)(theta)
    assert loss == pytest.approx(whole_loss, rel=1e-5)
    np.testing.assert_allclose(grad, whole_grad, atol=1e-5)


def test_softmax_head_from_linear_weights_with_standardisation(tmp_path: Path) -> None:
    from edgetl.heads import SoftmaxHead
    from edgetl.heads.softmax import LinearWeights

    rng = np.random.default_rng(0)
    coef, intercept = rng.normal(size=(3, 5)), rng.normal(size=3)
    mean, scale = rng.normal(size=5), rng.uniform(0.5, 2.0, 5)
    head = SoftmaxHead.from_linear(coef, intercept, mean, scale, l2=0.2)
    X = rng.normal(size=(7, 5)).astype(np.float32)
    expected = ((X - mean.astype(np.float32)) / scale.astype(np.float32)) @ coef.T.astype(np.float32) + intercept
    np.testing.assert_allclose(head.decision_function(X), expected, rtol=1e-5, atol=1e-5)
    head.save(tmp_path / "h.npz")
    again = load_head(tmp_path / "h.npz")
    assert again.get_params()["l2"] == 0.2 and float(again.l2_) == pytest.approx(0.2)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(again.decision_function(X), head.decision_function(X))
    weights = LinearWeights.from_theta(LinearWeights(head.coef_, head.intercept_).theta(), 3)
    np.testing.assert_array_equal(weights.coef, head.coef_)
    np.testing.assert_array_equal(weights.intercept, head.intercept_)
