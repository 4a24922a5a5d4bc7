"""Mixed precision by measured sensitivity, shared by the three INT8 exporters (ONNX Runtime, OpenVINO, LiteRT).

A network's first convolutions see raw normalised pixels and have the widest activation ranges; quantizing them costs
the most fidelity per byte saved. Each exporter quantizes with the first ``k`` convolutions kept in float, for
``k`` in a rising sequence of candidates (``0, 1, 2, …``), and keeps the smallest ``k`` whose calibration images' mean cosine to the FP32 graph
reaches the exporter's target — the best ``k`` tried when none does. Only calibration images are used here; held-out
images judge the result afterwards, in the export gate (:mod:`edgetl.host.gate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

import numpy as np

Q = TypeVar("Q")


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over rows of the cosine between ``reference`` and ``candidate`` (float64)."""
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return float(((ref * cand).sum(axis=1) / np.maximum(norms, 1e-12)).mean())


@dataclass(frozen=True)
class Trial:
    """One quantization attempt: how many leading convolutions stayed float, and the fidelity it measured."""

    float_convs: int
    calibration_mean_cosine: float


@dataclass(frozen=True)
class Search(Generic[Q]):
    """The attempt kept (``best``, with what ``quantize`` returned for it) and every attempt made, in order."""

    best: Trial
    quantized: Q
    trials: list[Trial]
    candidates: list[int]  #: the k that could be tried, in order

    def record(self, target: float) -> dict[str, Any]:
        """What goes into the manifest's quantization settings."""
        return {"sensitivity": [asdict(t) for t in self.trials],
                "mixed_precision": {"rule": "first k convolutions float, smallest k whose calibration mean cosine to "
                                            "the FP32 graph reaches the target (the best k tried when none does)",
                                    "target_calibration_cosine": target, "candidates": self.candidates}}


def candidates(steps: Sequence[int], n_convs: int) -> list[int]:
    """The ``steps`` (rising, from 0) that a graph with ``n_convs`` convolutions allows."""
    return [k for k in steps if k <= n_convs]


def first_float_convs(quantize: Callable[[int], Q], embed: Callable[[Q], np.ndarray], reference: np.ndarray,
                      ks: Sequence[int], target: float) -> Search[Q]:
    """Quantize with ``k`` leading convolutions in float (``quantize(k)``, ``k`` in ``ks`` in order) until the
    calibration embeddings (``embed(quantized)``) reach mean cosine ``target`` to ``reference``; keep the first that
    does, else the best. ``quantize`` must return an independent result per call (a model object or a file of its
    own)."""
    if not ks:
        raise ValueError("no candidate number of float convolutions")
    trials: list[Trial] = []
    best: tuple[Trial, Q] | None = None
    for k in ks:
        quantized = quantize(k)
        trial = Trial(k, round(mean_cosine(reference, embed(quantized)), 5))
        trials.append(trial)
        if best is None or trial.calibration_mean_cosine > best[0].calibration_mean_cosine:
            best = (trial, quantized)
        if trial.calibration_mean_cosine >= target:
            break
    assert best is not None  # ks is not empty: at least one trial
    return Search(best=best[0], quantized=best[1], trials=trials, candidates=list(ks))
