"""The export gate: every exported graph is judged on real held-out inputs the quantizers never saw, and the limits it
was judged by travel in the manifest with the measured values.

A reduced-precision graph passes only when it is **faithful** to the FP32 reference — mean cosine of its embeddings to
PyTorch's, and top-1 agreement of a head fitted on PyTorch's embeddings (the head a device already has) when it reads
the graph's embeddings — **and** a head retrained on its own embeddings stays accurate (accuracy drop). The accuracy
drop alone can be fooled: a graph whose embeddings a retrained head still separates may no longer match the FP32
graph the device's current head and golden vectors were made with.

Golden vectors of a reduced-precision graph are checked against the FP32 reference within a bound measured at export
(:func:`golden_spec`): the host's own INT8 output is not what another CPU's integer kernels must reproduce.

Every modality's graphs go through this one gate (:mod:`edgetl.host.export`); a graph that fails it is left out of
the bundle and named by :class:`QuantizationAccuracyError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetl.bundle import GoldenCheck
from edgetl.errors import ExportValidationError
from edgetl.heads import SoftmaxHead
from edgetl.metrics import compare_embeddings

#: FP32 parity with PyTorch on every held-out input
FP32_TOLERANCE = {"max_abs": 1e-3, "min_cosine": 0.9999}
#: device-side golden check of an FP32 graph: the device's runtime must reproduce PyTorch
GOLDEN_FP32_TOLERANCE = dict(FP32_TOLERANCE)
#: device-side golden check of a reduced-precision graph: cosine to the FP32 reference at least the host's measured
#: golden cosine minus this margin (other CPUs' integer / half-precision kernels round differently; a wrong graph or
#: runtime loses far more: see README "Golden vectors across architectures")
GOLDEN_MARGIN = 0.02


class QuantizationAccuracyError(ExportValidationError):
    """A reduced-precision graph failed the gate; ``report`` holds the per-graph figures and ``bundle`` the bundle
    written with the graphs that passed (None when nothing was written)."""

    def __init__(self, message: str, report: list[dict[str, Any]], bundle: Path | None = None):
        super().__init__(message)
        self.report = report
        self.bundle = bundle


@dataclass(frozen=True)
class GateLimits:
    """What a reduced-precision graph must hold on the held-out inputs."""

    max_drop: float = 1.0  #: accuracy points a head retrained on the graph's embeddings may lose
    min_mean_cosine: float = 0.97  #: mean cosine of the graph's embeddings to PyTorch FP32
    min_agreement: float = 0.95  #: top-1 agreement of the FP32 reference head on the graph's embeddings

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Check:
    """One measured number against its limit."""

    name: str
    value: float
    limit: float
    higher_is_better: bool

    @property
    def ok(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def describe(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        return f"{self.name} {self.value:.4g} (limit {sign} {self.limit:g})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit,
                "higher_is_better": self.higher_is_better, "ok": self.ok}


def embed_batches(fn: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch: int = 32) -> np.ndarray:
    """``fn`` over ``inputs`` in batches, concatenated."""
    return np.concatenate([fn(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])


#: the L2 strength of every softmax head the gate fits. Fixed, not the device default's per-fit cross-validated choice:
#: the gate compares FP32 and reduced-precision embeddings under identical head settings, so a graph's accuracy drop
#: is not mixed with the noise of two different L2 choices on 50-250 held-out inputs
GATE_L2 = 0.05


def cv_accuracy(X: np.ndarray, y: np.ndarray, folds: np.ndarray) -> float:
    """Mean k-fold accuracy of a softmax head (``l2`` = :data:`GATE_L2`) on these embeddings (held-out inputs only)."""
    correct = 0
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        head = SoftmaxHead(l2=GATE_L2).fit(X[train], y[train])
        correct += int((head.predict(X[test]) == y[test]).sum())
    return correct / len(y)


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``(N, D)`` arrays → ``(N,)`` float64."""
    ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return (ref * cand).sum(axis=1) / np.maximum(norms, 1e-12)


class Gate:
    """Fidelity and accuracy of every graph, on real held-out inputs the quantizers never saw."""

    def __init__(self, features: torch.nn.Module, held: np.ndarray, held_labels: np.ndarray, seed: int,
                 groups: list[dict[str, Any]] | None = None, limits: GateLimits | None = None):
        with torch.no_grad():
            self.ref_held = embed_batches(lambda b: features(torch.from_numpy(b)).numpy(), held)
        self.limits = limits or GateLimits()
        self.held, self.labels = held, held_labels
        self.folds = np.random.default_rng(seed).permutation(len(held)) % 5
        # the reference heads: device softmax heads fitted on FP32 embeddings (cross-fitted on the held-out folds, so
        # no head judges an input it was fitted on), as a device's current head would be; a graph must make them
        # predict what they predict on FP32
        self.reference_heads = [SoftmaxHead(l2=GATE_L2).fit(self.ref_held[self.folds != f],
                                                            held_labels[self.folds != f]) for f in range(5)]
        self.ref_pred = self._reference_predict(self.ref_held)
        self.ref_accuracy = cv_accuracy(self.ref_held, held_labels, self.folds)
        self.groups = [(g["name"], slice(g["offset"], g["offset"] + g["size"])) for g in groups or []]
        self.ref_group_accuracy = {name: cv_accuracy(self.ref_held[:, part], held_labels, self.folds)
                                   for name, part in self.groups}

    def _reference_predict(self, embeddings: np.ndarray) -> np.ndarray:
        pred = np.empty(len(embeddings), dtype=np.int64)
        for f, head in enumerate(self.reference_heads):
            pred[self.folds == f] = head.predict(embeddings[self.folds == f])
        return pred

    def agreement(self, embeddings: np.ndarray) -> float:
        """Top-1 agreement of the reference heads between a graph's embeddings of the held-out inputs and FP32's."""
        return float((self._reference_predict(embeddings) == self.ref_pred).mean())

    def measure(self, extractor: Any) -> tuple[dict[str, Any], np.ndarray]:
        """(fidelity and accuracy report, the graph's embeddings of the held-out inputs)."""
        emb = embed_batches(extractor.embed, self.held)
        cos = compare_embeddings(self.ref_held, emb)
        accuracy = cv_accuracy(emb, self.labels, self.folds)
        # a multi-depth graph: every group of features must keep its accuracy too
        group_drops = {name: round(100 * (self.ref_group_accuracy[name] - cv_accuracy(emb[:, part], self.labels,
                                                                                     self.folds)), 2)
                       for name, part in self.groups}
        return {"max_abs_diff": cos["max_abs_diff"], "min_cosine": cos["min_cosine"],
                "mean_cosine": float(row_cosines(self.ref_held, emb).mean()),
                "top1_agreement": self.agreement(emb),
                "accuracy": accuracy, "accuracy_pytorch_fp32": self.ref_accuracy,
                "drop_points": round(100 * (self.ref_accuracy - accuracy), 2), "n_images": len(self.held),
                **({"group_drop_points": group_drops} if group_drops else {})}, emb

    def judge(self, report: dict[str, Any], precision: str) -> dict[str, Any]:
        """``report`` plus ``passed``, ``reason`` and ``checks`` (every number against its limit)."""
        if precision == "fp32":
            checks = [Check("max abs diff vs PyTorch", report["max_abs_diff"], FP32_TOLERANCE["max_abs"], False),
                      Check("min cosine vs PyTorch", report["min_cosine"], FP32_TOLERANCE["min_cosine"], True)]
        else:
            # accuracy: the whole vector (what a multi-depth head reads) and the final features (what a last-layer
            # head reads); other groups' drops are reported only (an early 16-channel stage can lose much more under
            # INT8 while the whole vector loses nothing)
            checks = [Check("mean cosine to FP32", round(report["mean_cosine"], 5), self.limits.min_mean_cosine, True),
                      Check("reference-head agreement", round(report["top1_agreement"], 4), self.limits.min_agreement,
                            True),
                      Check("accuracy drop points", report["drop_points"], self.limits.max_drop, False)]
            if "last" in report.get("group_drop_points", {}):
                checks.append(Check("accuracy drop points on last", report["group_drop_points"]["last"],
                                    self.limits.max_drop, False))
        failed = [c for c in checks if not c.ok]
        reason = "; ".join(c.describe() for c in (failed or checks))
        return report | {"passed": not failed, "reason": reason, "checks": [c.to_dict() for c in checks]}


def golden_spec(precision: str, key: str, reference: np.ndarray, host_output: np.ndarray) -> GoldenCheck:
    """The golden-vector check of one graph (its manifest entry's ``golden``).

    FP32: the device must reproduce PyTorch (``reference``) within :data:`GOLDEN_FP32_TOLERANCE`. Reduced precision:
    the device's output is compared with the FP32 reference too (``compare_to: pytorch``), and must reach the cosine the
    host measured for the same graph minus :data:`GOLDEN_MARGIN`; ``key`` names the host's own output (kept for
    diagnosis and for the graph's reference embeddings)."""
    if precision == "fp32":
        return GoldenCheck("pytorch", dict(GOLDEN_FP32_TOLERANCE))
    measured = float(row_cosines(reference, host_output).min())
    return GoldenCheck(key, {"min_cosine": round(max(0.0, measured - GOLDEN_MARGIN), 4)}, compare_to="pytorch",
                       host_min_cosine=round(measured, 5))
