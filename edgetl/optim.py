"""Limited-memory BFGS in numpy: the one optimiser of edgetl's heads and of the fleet's federated softmax head.

:func:`lbfgs` minimises ``fun(x) -> (value, gradient)`` from ``x0``: the two-loop recursion over the last ``memory``
curvature pairs gives the direction (steepest descent, scaled to a largest step of at most 1, when there are none; a
restart from steepest descent when the direction does not descend), and a backtracking Armijo line search (``c = 1e-4``,
halving from a step of 1) the step. It stops

- by default when an iteration lowers the value by at most ``tol`` (relative to ``max(1, |value|)``) or the gradient's
  largest entry is at most ``tol``;
- with ``gtol`` when the gradient's Euclidean norm is at most ``gtol`` (a warm start lowers the value little, yet may be
  far from the optimum);
- with ``val_loss`` (early stopping) after ``patience`` iterations without a lower held-out loss, returning the iterate
  of lowest held-out loss;
- after ``max_iter`` iterations in any case.

Curvature pairs (:class:`CurvaturePair`) can be carried from one fit to a nearby one (``history``, updated in place);
:func:`shift_history` moves them to an objective whose L2 penalty on the first entries changed.

Every function here is deterministic (no random numbers) and works in the dtype of ``x0`` (float32 for the heads).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: ``x -> (value, gradient)``; the gradient has the shape of ``x``
Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]

#: a step is accepted when it lowers the value by this share of the slope (Armijo's constant)
ARMIJO = 1e-4
#: pairs with ``s·y`` at most this are skipped (no positive curvature along the step). The bound is absolute: steps
#: shorter than about 1e-5 (on unit curvature) add no pairs, so the memory stops renewing there and convergence turns
#: linear — far below what float32 heads resolve, but a limit for tighter ``gtol`` on small-scale problems
MIN_CURVATURE = 1e-10


@dataclass(frozen=True, slots=True)
class CurvaturePair:
    """One L-BFGS memory entry: the step ``s``, the gradient change ``y`` along it and ``rho = 1 / s·y``."""

    s: np.ndarray
    y: np.ndarray
    rho: float

    @classmethod
    def of(cls, s: np.ndarray, y: np.ndarray) -> CurvaturePair | None:
        """The pair of step ``s`` and gradient change ``y``; None when ``s·y`` shows no positive curvature."""
        sy = float(s @ y)
        return cls(s, y, 1.0 / sy) if sy > MIN_CURVATURE else None


History = deque[CurvaturePair]


@dataclass(frozen=True)
class LBFGSResult:
    """Where :func:`lbfgs` stopped: the solution ``x``, iterations run, and the value and gradient at the last
    iterate (with early stopping ``x`` is the best held-out iterate, which may be an earlier one)."""

    x: np.ndarray
    n_iter: int
    value: float
    gradient: np.ndarray


def lbfgs(fun: Objective, x0: np.ndarray, max_iter: int, tol: float, memory: int,
          val_loss: Callable[[np.ndarray], float] | None = None, patience: int = 10, history: History | None = None,
          gtol: float | None = None, start: tuple[float, np.ndarray] | None = None) -> LBFGSResult:
    """Minimise ``fun`` from ``x0`` (see the module docstring for the stopping rules).

    ``history``: curvature pairs to start from (e.g. of a fit of a nearby objective), updated in place.
    ``start``: value and gradient at ``x0`` when already known (saves one evaluation)."""
    x = x0.copy()
    f, g = fun(x) if start is None else start
    if history is None:
        history = deque(maxlen=memory)
    best_x, best_val, stale = x.copy(), np.inf, 0
    it = 0
    for it in range(1, max_iter + 1):
        d, slope = _descent_direction(g, history)
        x_new, f_new, g_new = _armijo_step(fun, x, f, d, slope)
        pair = CurvaturePair.of(x_new - x, g_new - g)
        if pair is not None:
            history.append(pair)
        converged = _converged(f, f_new, g_new, tol, gtol)
        x, f, g = x_new, f_new, g_new
        if val_loss is not None:
            v = val_loss(x)
            if v < best_val - 1e-6:
                best_x, best_val, stale = x.copy(), v, 0
            else:
                stale += 1
                if stale >= patience:
                    return LBFGSResult(best_x, it, f, g)
        if converged:
            break
    return LBFGSResult(best_x if val_loss is not None else x, it, f, g)


def two_loop(g: np.ndarray, history: History) -> np.ndarray:
    """``H g`` for the L-BFGS inverse-Hessian estimate ``H`` of ``history`` (Nocedal & Wright, algorithm 7.4); the
    initial estimate is ``s·y / y·y`` of the newest pair, or ``1 / max(1, max|g|)`` without pairs."""
    q = g.copy()
    alphas = []
    for pair in reversed(history):
        a = pair.rho * float(pair.s @ q)
        alphas.append(a)
        q -= a * pair.y
    if history:
        newest = history[-1]
        q *= float(newest.s @ newest.y) / float(newest.y @ newest.y)
    else:
        q /= max(1.0, float(np.abs(g).max()))
    for pair, a in zip(history, reversed(alphas)):
        q += pair.s * (a - pair.rho * float(pair.y @ q))
    return q


def _descent_direction(g: np.ndarray, history: History) -> tuple[np.ndarray, float]:
    """``(d, g·d)``: the L-BFGS direction, or steepest descent (and a cleared history) when that does not descend."""
    d = -two_loop(g, history)
    slope = float(g @ d)
    if slope >= 0:
        history.clear()
        d, slope = -g, -float(g @ g)
    return d, slope


def _armijo_step(fun: Objective, x: np.ndarray, f: float, d: np.ndarray, slope: float
                 ) -> tuple[np.ndarray, float, np.ndarray]:
    """Backtracking line search from a step of 1: the first halving that satisfies Armijo's condition (or a step
    below 1e-10). Returns the new point with its value and gradient."""
    step = 1.0
    while True:
        x_new = x + step * d
        f_new, g_new = fun(x_new)
        if f_new <= f + ARMIJO * step * slope or step < 1e-10:
            return x_new, f_new, g_new
        step *= 0.5


def _converged(f: float, f_new: float, g_new: np.ndarray, tol: float, gtol: float | None) -> bool:
    if gtol is None:
        return abs(f - f_new) <= tol * max(1.0, abs(f)) or float(np.abs(g_new).max()) <= tol
    return float(np.linalg.norm(g_new)) <= gtol


def shift_history(history: History, delta: float, n_penalised: int) -> None:
    """Curvature pairs of an objective → those of the same objective plus ``delta / 2 ||x[:n_penalised]||²``: the
    Hessian changes by ``delta`` on those entries, so ``y += delta * s`` there. Pairs that lose positive curvature
    are dropped. In place."""
    shifted = []
    for pair in history:
        y = pair.y.copy()
        y[:n_penalised] += delta * pair.s[:n_penalised]
        moved = CurvaturePair.of(pair.s, y)
        if moved is not None:
            shifted.append(moved)
    history.clear()
    history.extend(shifted)
