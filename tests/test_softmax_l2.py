"""The softmax head's L2 strength chosen by cross-validation on the training embeddings (issue 21 item 4).

Fit time is measured by ``tools/measure_softmax_l2.py`` (a benchmark, not a test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgetl.errors import DataError
from edgetl.heads import DepthHead, SoftmaxHead, load_head, make_head, softmax
from edgetl.heads.softmax import CV_MIN_PER_CLASS, DEFAULT_L2, L2_GRID


def correlated(n: int = 600, dim: int = 20, seed: int = 0, draw: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clean labels from a low-variance direction of strongly correlated features: a strong penalty pulls the
    weights towards the class-mean difference (the high-variance direction), so a weak one wins. ``draw``: another
    sample of the same problem."""
    rng = np.random.default_rng(seed)
    L = np.linalg.cholesky(0.9 * np.ones((dim, dim)) + 0.1 * np.eye(dim))
    X = rng.normal(size=(n, dim)) @ L.T
    w = rng.normal(size=dim)
    w -= w.mean()
    if draw:
        X = np.random.default_rng([seed, draw]).normal(size=(n, dim)) @ L.T
    return X.astype(np.float32), (X @ w > 0).astype(np.int64)


def noisy(n_per_class: int = 40, dim: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Few samples in many dimensions with barely separated classes: a strong penalty wins."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    X = rng.normal(size=(len(y), dim)) + 0.05 * rng.normal(size=(3, dim))[y]
    return X.astype(np.float32), y


def clusters(n_per_class: int = 30, classes: int = 4, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (classes, dim))
    X = np.concatenate([c + rng.normal(0, 1, (n_per_class, dim)) for c in centres]).astype(np.float32)
    return X, np.repeat(np.arange(classes), n_per_class)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cv_picks_a_weak_penalty_on_clean_data_and_a_strong_one_on_noisy_data(seed: int) -> None:
    clean = SoftmaxHead(seed=seed).fit(*correlated(seed=seed))
    rough = SoftmaxHead(seed=seed).fit(*noisy(seed=seed))
    assert float(clean.l2_) <= 0.02 and float(rough.l2_) >= 0.3
    for head in (clean, rough):  # the walk ran from the strongest value and recorded each score
        assert head.l2_cv_.shape[1] == 2 and head.l2_cv_[0, 0] == max(L2_GRID)
        assert np.all(np.diff(head.l2_cv_[:, 0]) < 0) and np.all((0 <= head.l2_cv_[:, 1]) & (head.l2_cv_[:, 1] <= 1))
    # the clean problem really is better off with the weak penalty (on fresh samples)
    X, y = correlated(seed=seed, draw=1)
    assert (clean.predict(X) == y).mean() > (SoftmaxHead(l2=1.0).fit(*correlated(seed=seed)).predict(X) == y).mean()


def test_chosen_value_is_rescaled_to_the_whole_training_set() -> None:
    head = SoftmaxHead(cv=2).fit(*correlated())
    best = head.l2_cv_[np.argmax(head.l2_cv_[:, 1]), 0]
    assert float(head.l2_) == pytest.approx(best / 2)  # the fold fits saw half of the samples


def test_explicit_l2_fixes_it_without_cross_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("cross-validated although l2 was given")

    monkeypatch.setattr(SoftmaxHead, "_choose_l2", refuse)
    head = SoftmaxHead(l2=0.2).fit(*clusters())
    assert float(head.l2_) == 0.2 and head.l2_cv_.shape == (0, 2)
    assert float(make_head("softmax", l2=0.0).fit(*clusters()).l2_) == 0.0


@pytest.mark.parametrize("per_class", [1, 2, CV_MIN_PER_CLASS - 1])
def test_too_little_data_falls_back_to_the_default(per_class: int) -> None:
    X, y = clusters(n_per_class=per_class)
    head = SoftmaxHead().fit(X, y)
    assert float(head.l2_) == DEFAULT_L2 and head.l2_cv_.shape == (0, 2)
    fixed = SoftmaxHead(l2=DEFAULT_L2).fit(X, y)  # the very same fit as the old fixed default
    np.testing.assert_array_equal(head.coef_, fixed.coef_)


def test_one_class_with_fewer_samples_than_folds() -> None:
    X, y = clusters(n_per_class=40)
    keep = np.ones(len(y), dtype=bool)
    keep[np.flatnonzero(y == 2)[1:]] = False  # class 2 keeps one sample
    head = SoftmaxHead(cv=3).fit(X[keep], y[keep])
    assert float(head.l2_) == DEFAULT_L2
    assert head.predict(X[keep]).shape == (keep.sum(),)
    # missing class indices (labels 0, 1 and 3 only) are fine too
    mask = y != 2
    head = SoftmaxHead().fit(X[mask], y[mask])
    assert head.l2_cv_.shape[0] >= 2 and (head.predict(X[mask]) == y[mask]).mean() > 0.9


def test_deterministic_given_a_seed() -> None:
    X, y = noisy(seed=3)
    a, b = SoftmaxHead(seed=5).fit(X, y), SoftmaxHead(seed=5).fit(X, y)
    assert float(a.l2_) == float(b.l2_)
    np.testing.assert_array_equal(a.l2_cv_, b.l2_cv_)
    np.testing.assert_array_equal(a.coef_, b.coef_)


def test_three_folds_and_a_custom_grid() -> None:
    X, y = correlated()
    head = SoftmaxHead(cv=3, l2_grid=[0.01, 1.0, 0.1]).fit(X, y)  # any order: walked strongest first
    assert head.l2_cv_[:, 0].tolist()[:2] == [1.0, 0.1]
    assert any(float(head.l2_) == pytest.approx(v * 2 / 3) for v in (1.0, 0.1, 0.01))
    single = SoftmaxHead(l2_grid=[0.3]).fit(X, y)  # one value: nothing to choose
    assert float(single.l2_) == 0.3 and single.l2_cv_.shape == (0, 2)


@pytest.mark.parametrize("params", [{"l2": -1.0}, {"l2_grid": [0.1, 0.0]}, {"l2_grid": []}])
def test_bad_settings_are_refused(params: dict[str, object]) -> None:
    with pytest.raises(DataError, match="l2"):
        SoftmaxHead(**params).fit(*clusters())  # type: ignore[arg-type]


def test_early_stopping_part_and_cv_together() -> None:
    X, y = clusters(n_per_class=60)
    head = SoftmaxHead(val_fraction=0.2).fit(X, y)
    assert head.l2_cv_.shape[0] >= 2 and (head.predict(X) == y).mean() > 0.95


def test_save_load_keeps_the_chosen_l2(tmp_path: Path) -> None:
    head = SoftmaxHead(seed=1).fit(*noisy())
    head.save(tmp_path / "h.npz")
    again = load_head(tmp_path / "h.npz")
    assert isinstance(again, SoftmaxHead) and again.l2 is None
    assert float(again.l2_) == float(head.l2_)
    np.testing.assert_array_equal(again.l2_cv_, head.l2_cv_)
    np.testing.assert_array_equal(again.predict_proba(noisy()[0]), head.predict_proba(noisy()[0]))


def test_heads_saved_before_the_cv_still_load(tmp_path: Path) -> None:
    """A head file of the previous version: fixed l2 in its settings, no l2_ / l2_cv_ arrays."""
    head = SoftmaxHead(l2=0.05).fit(*clusters())
    old_params = {"l2": 0.05, "max_iter": 200, "tol": 0.001, "memory": 20, "val_fraction": 0.0, "patience": 10,
                  "class_weight": "balanced", "seed": 0}
    np.savez(tmp_path / "old.npz", __meta__=np.array(json.dumps({"kind": "softmax", "params": old_params})),
             coef_=head.coef_, intercept_=head.intercept_, mean_=head.mean_, scale_=head.scale_)
    again = load_head(tmp_path / "old.npz")
    assert float(again.l2_) == 0.05  # type: ignore[attr-defined]
    np.testing.assert_array_equal(again.predict(clusters()[0]), head.predict(clusters()[0]))
    again.save(tmp_path / "resaved.npz")  # and saves again
    assert float(load_head(tmp_path / "resaved.npz").l2_) == 0.05  # type: ignore[attr-defined]


def test_linear_head_from_the_host_saves_without_an_l2(tmp_path: Path) -> None:
    head = SoftmaxHead.from_linear(np.eye(3, 4), np.zeros(3))
    head.save(tmp_path / "h.npz")
    assert load_head(tmp_path / "h.npz").predict(np.eye(4, dtype=np.float32)).shape == (4,)


def test_depth_head_inner_softmax_cross_validates_and_round_trips(tmp_path: Path) -> None:
    X, y = correlated(dim=24)
    head = DepthHead(groups=[[0, 16], [16, 8]], keep=12).fit(X, y)
    assert head.head_.l2_cv_.shape[0] >= 2  # type: ignore[attr-defined]
    head.save(tmp_path / "d.npz")
    again = load_head(tmp_path / "d.npz")
    assert float(again.head_.l2_) == float(head.head_.l2_)  # type: ignore[attr-defined]


def test_cross_validation_costs_a_few_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Objective evaluations (in samples) against one fit at a fixed l2 — a machine-independent proxy for the fit
    time measured by tools/measure_softmax_l2.py."""
    X, y = clusters(n_per_class=200, classes=5, dim=64)
    samples = [0]
    make = softmax.softmax_objective

    def counted(Z: np.ndarray, *args: object) -> object:
        objective = make(Z, *args)  # type: ignore[arg-type]

        def run(theta: np.ndarray) -> object:
            samples[0] += len(Z)
            return objective(theta)
        return run

    monkeypatch.setattr(softmax, "softmax_objective", counted)
    SoftmaxHead(l2=DEFAULT_L2).fit(X, y)
    fixed, samples[0] = samples[0], 0
    SoftmaxHead().fit(X, y)
    assert samples[0] <= 4 * fixed
