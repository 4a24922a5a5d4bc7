"""edgetl.optim: L-BFGS against problems with a known optimum, and its memory, warm starts and stopping rules."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from edgetl.heads.softmax import softmax_objective
from edgetl.optim import CurvaturePair, lbfgs, shift_history, two_loop


def quadratic(dim: int = 20, cond: float = 100.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A symmetric positive definite ``A`` with eigenvalues from 1 to ``cond`` and a ``b``."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    A = Q @ np.diag(np.geomspace(1.0, cond, dim)) @ Q.T
    return (A + A.T) / 2, rng.normal(size=dim)


def quadratic_objective(A: np.ndarray, b: np.ndarray):  # type: ignore[no-untyped-def]
    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        return float(0.5 * x @ A @ x - b @ x), A @ x - b
    return fun


def rosenbrock(x: np.ndarray) -> tuple[float, np.ndarray]:
    a, b = x
    value = (1 - a) ** 2 + 100 * (b - a * a) ** 2
    return float(value), np.array([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)])


def test_convex_quadratic_reaches_its_closed_form_minimum() -> None:
    A, b = quadratic()  # eigenvalues 1 … 100
    result = lbfgs(quadratic_objective(A, b), np.zeros(len(b)), 200, 0.0, 10, gtol=1e-4)
    gnorm = float(np.linalg.norm(result.gradient))
    assert gnorm <= 1e-4 and result.n_iter < 60  # far fewer than steepest descent needs at condition 100
    optimum = np.linalg.solve(A, b)
    # at gradient norm g a quadratic with smallest eigenvalue 1 is within g of its minimiser and g² / 2 of its minimum
    assert float(np.linalg.norm(result.x - optimum)) <= gnorm
    assert 0.0 <= result.value - (-0.5 * b @ optimum) <= 0.5 * gnorm ** 2 + 1e-15


def test_rosenbrock_from_the_standard_start() -> None:
    result = lbfgs(rosenbrock, np.array([-1.2, 1.0]), 500, 0.0, 10, gtol=1e-8)
    np.testing.assert_allclose(result.x, [1.0, 1.0], atol=1e-6)
    assert result.value < 1e-12 and result.n_iter < 200


def test_softmax_intercepts_reach_the_class_frequencies() -> None:
    """With uninformative features (all zero) the optimum is closed-form: ``W = 0`` and softmax(b) the class
    frequencies; from zero the intercepts keep summing to zero, so ``b_c = log n_c - mean(log n)``."""
    counts = np.array([10, 30, 60])
    y = np.repeat(np.arange(3), counts)
    Z = np.zeros((len(y), 4))
    fun = softmax_objective(Z, y, 3, np.full(len(y), 1.0 / len(y)), 0.1)
    result = lbfgs(fun, np.zeros(4 * 3 + 3), 200, 0.0, 10, gtol=1e-12)
    np.testing.assert_allclose(result.x[:12], 0.0, atol=1e-12)
    np.testing.assert_allclose(result.x[12:], np.log(counts) - np.log(counts).mean(), atol=1e-9)


def test_penalised_softmax_matches_scipy() -> None:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    Z = rng.normal(size=(300, 8)) + np.eye(4, 8)[y] * 1.5
    fun = softmax_objective(Z, y, 4, np.full(300, 1.0 / 300), 0.05)
    ours = lbfgs(fun, np.zeros(8 * 4 + 4), 500, 0.0, 20, gtol=1e-10)
    ref = scipy_optimize.minimize(fun, np.zeros(8 * 4 + 4), jac=True, method="L-BFGS-B",
                                  options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 2000})
    assert ours.value == pytest.approx(ref.fun, rel=1e-10)
    # the penalised objective is strictly convex in W; the bias is defined up to a constant shift
    np.testing.assert_allclose(ours.x[:32], ref.x[:32], atol=1e-5)
    np.testing.assert_allclose(ours.x[32:] - ours.x[32:].mean(), ref.x[32:] - ref.x[32:].mean(), atol=1e-5)


def test_default_rule_stops_when_the_value_stops_falling() -> None:
    A, b = quadratic(cond=1000.0)
    fun = quadratic_objective(A, b)
    loose = lbfgs(fun, np.zeros(len(b)), 500, 1e-2, 10)
    tight = lbfgs(fun, np.zeros(len(b)), 500, 1e-12, 10)
    assert loose.n_iter < tight.n_iter
    assert tight.value <= loose.value
    assert lbfgs(fun, np.zeros(len(b)), 3, 0.0, 10).n_iter == 3  # max_iter bounds the iterations


def test_early_stopping_keeps_the_best_held_out_iterate() -> None:
    A, b = quadratic()
    target = np.linalg.solve(A, b) * 0.5  # the held-out optimum lies half way: the loss falls, then rises
    seen: list[tuple[float, np.ndarray]] = []

    def val_loss(x: np.ndarray) -> float:
        seen.append((float(np.sum((x - target) ** 2)), x.copy()))
        return seen[-1][0]

    result = lbfgs(quadratic_objective(A, b), np.zeros(len(b)), 500, 0.0, 10, val_loss=val_loss, patience=3,
                   gtol=1e-12)
    best = int(np.argmin([v for v, _ in seen]))
    np.testing.assert_array_equal(result.x, seen[best][1])
    assert result.n_iter == len(seen) == best + 1 + 3  # stopped after three iterations without improvement


def test_a_known_start_saves_one_evaluation_and_changes_nothing() -> None:
    A, b = quadratic()
    calls = [0]

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        calls[0] += 1
        return quadratic_objective(A, b)(x)

    x0 = np.full(len(b), 0.3)
    plain = lbfgs(fun, x0, 50, 0.0, 10, gtol=1e-8)
    plain_calls, calls[0] = calls[0], 0
    started = lbfgs(fun, x0, 50, 0.0, 10, gtol=1e-8, start=quadratic_objective(A, b)(x0))
    assert calls[0] == plain_calls - 1
    np.testing.assert_array_equal(started.x, plain.x)


def test_history_carries_over_to_a_nearby_fit() -> None:
    A, b = quadratic()
    history: deque[CurvaturePair] = deque(maxlen=10)
    first = lbfgs(quadratic_objective(A, b), np.zeros(len(b)), 500, 0.0, 10, history=history, gtol=1e-4)
    assert len(history) == 10
    b2 = b + 0.01 * np.random.default_rng(3).normal(size=len(b))
    warm = lbfgs(quadratic_objective(A, b2), first.x, 500, 0.0, 10, history=history, gtol=1e-4)
    cold = lbfgs(quadratic_objective(A, b2), first.x, 500, 0.0, 10, gtol=1e-4)
    assert float(np.linalg.norm(warm.x - np.linalg.solve(A, b2))) <= 1e-4
    assert warm.n_iter < cold.n_iter


def test_shift_history_gives_the_pairs_of_the_penalised_objective() -> None:
    """On a quadratic ``y = A s`` exactly; adding ``delta / 2 ||x[:k]||²`` makes it ``(A + delta P_k) s``."""
    A, b = quadratic(dim=6)
    history: deque[CurvaturePair] = deque(maxlen=5)
    lbfgs(quadratic_objective(A, b), np.zeros(6), 4, 0.0, 5, history=history, gtol=0.0)
    steps = [pair.s for pair in history]
    delta, k = 0.7, 4
    shift_history(history, delta, k)
    penalised = A + delta * np.diag([1.0] * k + [0.0] * (6 - k))
    assert [pair.s for pair in history] == steps
    for pair in history:
        np.testing.assert_allclose(pair.y, penalised @ pair.s, rtol=1e-9, atol=1e-12)
        assert pair.rho == pytest.approx(1.0 / float(pair.s @ pair.y))
    shift_history(history, -1e6, k)  # a penalty that removes all curvature: every pair goes
    assert not history


def test_curvature_pairs_and_the_two_loop_recursion() -> None:
    assert CurvaturePair.of(np.array([1.0, 0.0]), np.array([-1.0, 0.0])) is None
    # one pair of a 1-D quadratic a/2 x² gives the exact inverse Hessian: H g = g / a
    pair = CurvaturePair.of(np.array([2.0]), np.array([6.0]))
    assert pair is not None and pair.rho == pytest.approx(1 / 12)
    np.testing.assert_allclose(two_loop(np.array([3.0]), deque([pair])), [1.0])
    # without pairs: the gradient scaled to a largest entry of at most one
    np.testing.assert_allclose(two_loop(np.array([4.0, -2.0]), deque()), [1.0, -0.5])


def test_works_in_float32_as_the_heads_do() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    Z = (rng.normal(size=(200, 5)) + np.eye(3, 5)[y]).astype(np.float32)
    fun = softmax_objective(Z, y, 3, np.full(200, 1 / 200, dtype=np.float32), 0.1)
    result = lbfgs(fun, np.zeros(18, dtype=np.float32), 200, 1e-6, 10)
    assert result.x.dtype == np.float32 and result.gradient.dtype == np.float32
    assert float(np.abs(result.gradient).max()) < 1e-3
