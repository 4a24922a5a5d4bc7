"""Mixed precision by measured sensitivity, shared by the three INT8 exporters (ONNX Runtime, OpenVINO, LiteRT).

A network's first convolutions see raw normalised pixels and have the widest activation ranges; quantizing them costs
the most fidelity per byte saved. Each exporter quantizes with the first ``k`` convolutions kept in float, for
``k`` in a rising sequence of candidates (``0, 1, 2, …``), and keeps the smallest ``k`` whose calibration images' mean
cosine to the FP32 graph reaches the exporter's target. When none does, it keeps the smallest ``k`` within
:data:`PLATEAU` of the best cosine tried: every float convolution costs speed, and past the plateau it buys nothing the
held-out images can see (MobileNetV2 in ONNX Runtime: 3 float 0.9878, 12 float 0.9884). Only calibration images are
used here; held-out images judge the result afterwards, in the export gate (:mod:`edgetl.host.gate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

import numpy as np

Q = TypeVar("Q")

#: when no candidate reaches the target: the smallest k whose calibration mean cosine is within this of the best
PLATEAU = 0.001


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
    """The attempt kept (``kept``, with what ``quantize`` returned for it) and every attempt made, in order."""

    kept: Trial
    quantized: Q
    trials: list[Trial]
    candidates: list[int]  #: the k that could be tried, in order

    def record(self, target: float) -> dict[str, Any]:
        """What goes into the manifest's quantization settings."""
        return {"sensitivity": [asdict(t) for t in self.trials],
                "mixed_precision": {"rule": "first k convolutions float, smallest k whose calibration mean cosine to "
                                            "the FP32 graph reaches the target (when none does: the smallest k "
                                            "within the plateau of the best)",
                                    "target_calibration_cosine": target, "plateau": PLATEAU,
                                    "candidates": self.candidates}}


def candidates(steps: Sequence[int], n_convs: int) -> list[int]:
    """The ``steps`` (rising, from 0) that a graph with ``n_convs`` convolutions allows."""
    return [k for k in steps if k <= n_convs]


def first_float_convs(quantize: Callable[[int], Q], embed: Callable[[Q], np.ndarray], reference: np.ndarray,
                      ks: Sequence[int], target: float) -> Search[Q]:
    """Quantize with ``k`` leading convolutions in float (``quantize(k)``, ``k`` in ``ks`` in order) until the
    calibration embeddings (``embed(quantized)``) reach mean cosine ``target`` to ``reference``; keep the first that
    does, else the smallest ``k`` within :data:`PLATEAU` of the best. ``quantize`` must return an independent result
    per call (a model object or a file of its own; the attempts not kept are not cleaned up here)."""
    if not ks:
        raise ValueError("no candidate number of float convolutions")
    attempts: list[tuple[Trial, Q]] = []
    for k in ks:
        quantized = quantize(k)
        attempts.append((Trial(k, round(mean_cosine(reference, embed(quantized)), 5)), quantized))
        if attempts[-1][0].calibration_mean_cosine >= target:
            break
    trials = [trial for trial, _ in attempts]
    top = max(t.calibration_mean_cosine for t in trials)
    # the first attempt that reached the target is the last one made; else the first on the best one's plateau
    kept = attempts[-1] if top >= target else \
        next(a for a in attempts if a[0].calibration_mean_cosine >= top - PLATEAU)
    return Search(kept=kept[0], quantized=kept[1], trials=trials, candidates=list(ks))
