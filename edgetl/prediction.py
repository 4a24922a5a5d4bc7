"""The one prediction path of a device: :class:`Predictor` turns embeddings into :class:`Prediction` s with the
current head — top-k classes with calibrated probabilities, the unknown flag and novelty score against the version's
own threshold, and the rolling drift (median novelty of the last images). ``device predict``, the inbox watcher and
the camera stream all go through it; each converts a :class:`Prediction` to its own output at its edge
(:meth:`Prediction.as_dict`, :meth:`Prediction.as_record`).

Also here: ``drift`` (a folder against what the head was trained on) and ``evaluate`` (accuracy on a labelled
folder), which use the same head and novelty model.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl.embedding import Embedder, Progress, no_progress
from edgetl.errors import DataError, NotFittedError
from edgetl.heads import Head
from edgetl.novelty import Novelty, calibrated_proba
from edgetl.report import classification_metrics
from edgetl.versions import VersionHistory

log = logging.getLogger(__name__)

DRIFT_WINDOW = 100  #: images in the rolling drift median


@dataclass(frozen=True)
class Prediction:
    """One item's prediction. ``top_k``: (label, probability) best first, ``label``/``probability`` its first entry
    (probabilities calibrated when ``calibrated``: the version has a temperature). ``novelty``, ``unknown`` (novelty
    above the version's threshold), ``drift`` (median novelty of the last images, this one included) and ``drifted``
    are None when the version has no novelty model (the bundle's own head); ``drift`` and ``drifted`` also when the
    predictor keeps no drift window (one-off predictions)."""

    label: str
    probability: float
    top_k: tuple[tuple[str, float], ...]
    head_version: str
    calibrated: bool
    novelty: float | None = None
    unknown: bool | None = None
    drift: float | None = None
    drifted: bool | None = None
    path: str | None = None  #: the item it was made for, when it came from a file or document

    def as_dict(self) -> dict[str, Any]:
        """The ``device predict --json`` object: path, label, probability, top_k, head_version, calibrated, and
        novelty and unknown when the version has a novelty model."""
        result = {"path": self.path, "label": self.label, "probability": self.probability,
                  "top_k": [{"label": label, "probability": p} for label, p in self.top_k],
                  "head_version": self.head_version, "calibrated": self.calibrated}
        if self.novelty is not None:
            result |= {"novelty": self.novelty, "unknown": self.unknown}
        return result

    def as_record(self) -> dict[str, Any]:
        """The fields of a watch journal line or a stream line: label, probability, calibrated, unknown, novelty,
        drift, drifted (None where absent), head_version; floats rounded to 6 decimals."""
        return {"label": self.label, "probability": round(self.probability, 6), "calibrated": self.calibrated,
                "unknown": self.unknown, "novelty": None if self.novelty is None else round(self.novelty, 6),
                "drift": None if self.drift is None else round(self.drift, 6), "drifted": self.drifted,
                "head_version": self.head_version}


class Predictor:
    """The current head of a device (``versions``), loaded once and reloaded only when the current version changes
    (a field-learning run or another process promoted or rolled back); the drift window restarts with each head."""

    def __init__(self, versions: VersionHistory, window: int | None = DRIFT_WINDOW):
        self.versions = versions
        self.version: str | None = None
        #: novelty scores of the last ``window`` images (None: no rolling drift, e.g. for one-off predictions)
        self._recent: deque[float] | None = deque(maxlen=window) if window is not None else None
        self._head: Head | None = None
        self._labels: list[str] = []
        self._novelty: Novelty | None = None
        self._temperature: float | None = None

    def refresh(self) -> str:
        """Reload the head when the current version changed; return the version in use."""
        version = self.versions.current_version()
        if version is None:
            path = self.versions.bundle.path
            raise NotFittedError(f"bundle {path} has no head yet; train one: edgetl device train {path} --data DIR")
        if version != self.version:
            head, labels, version = self.versions.load_current()
            meta = self.versions.meta(version)
            self._head, self._labels, self._novelty = head, list(labels), self.versions.novelty_model(version)
            self._temperature = meta.get("temperature")
            self.version = version
            if self._recent is not None:
                self._recent.clear()  # drift is measured against the head in use
            log.info("using head %s (%d classes)", version, len(self._labels))
        return version

    def classify(self, X: npt.NDArray[np.float32], top_k: int = 1, paths: Sequence[Any] | None = None
                 ) -> list[Prediction]:
        """Embeddings ``(N, D)`` → one :class:`Prediction` per row with the ``top_k`` best classes (``paths``: the
        items the rows were made from, named in the predictions)."""
        version = self.refresh()
        if not len(X):
            return []
        t, novelty, labels = self._temperature, self._novelty, self._labels
        proba = calibrated_proba(self._head, X, t)
        scores = novelty.score(X) if novelty is not None else None
        k = max(1, min(top_k, len(labels)))
        order = proba.argmax(axis=1)[:, None] if k == 1 else np.argsort(-proba, axis=1, kind="stable")[:, :k]
        out = []
        for i, row in enumerate(proba):
            ranked = tuple((labels[j], float(row[j])) for j in order[i])
            extra: dict[str, Any] = {}
            if scores is not None and novelty is not None:
                extra = {"novelty": float(scores[i]), "unknown": bool(scores[i] > novelty.threshold)}
                if self._recent is not None:
                    self._recent.append(float(scores[i]))
                    drift = float(np.median(self._recent))
                    extra |= {"drift": drift, "drifted": drift > novelty.threshold}
            out.append(Prediction(ranked[0][0], ranked[0][1], ranked, version, bool(t),
                                  path=None if paths is None else str(paths[i]), **extra))
        return out


def drift(embedder: Embedder, versions: VersionHistory, data: str | os.PathLike[str],
          progress: Progress = no_progress) -> dict[str, Any]:
    """Compare a folder of images (any layout) with what the current head was trained on."""
    version = versions.current_version()
    novelty = versions.novelty_model(version) if version else None
    if novelty is None:
        raise NotFittedError("drift needs a head trained on this device (it compares with its training data); "
                             f"run `edgetl device train {versions.bundle.path} --data DIR`")
    root = Path(data)
    paths = embedder.loader.list(root)
    if not paths:
        raise DataError(f"{root} holds no images to compare")
    scores = novelty.score(embedder.embed_keyed(paths, progress=progress)[0])
    score = float(np.median(scores))
    return {"score": score, "threshold": novelty.threshold, "drifted": score > novelty.threshold,
            "n": len(paths), "unknown_fraction": float((scores > novelty.threshold).mean()),
            "head_version": version}


def evaluate(embedder: Embedder, versions: VersionHistory, data: str | os.PathLike[str],
             progress: Progress = no_progress) -> dict[str, Any]:
    """Accuracy of the current head on a labelled ImageFolder whose class names the head knows."""
    head, labels, version = versions.load_current()
    folder = embedder.loader.scan(data, min_classes=1)
    unknown = sorted(set(folder.classes) - set(labels))
    if unknown:
        raise DataError(f"{folder.root} has classes the head does not know: {', '.join(unknown)}; "
                        f"known: {', '.join(labels)}")
    to_head = np.array([labels.index(c) for c in folder.classes])
    truth = to_head[folder.labels]
    embeddings = embedder.embed_keyed(folder.paths, progress=progress)[0]
    pred = head.predict(embeddings)
    present = sorted(set(truth.tolist()) | set(pred.tolist()))  # classes in the data or predicted
    index = np.searchsorted(present, truth), np.searchsorted(present, pred)
    result = classification_metrics(*index, [labels[c] for c in present])
    return result | {"n": len(truth), "head_version": version, "data": str(folder.root)}


__all__ = ["DRIFT_WINDOW", "Prediction", "Predictor", "drift", "evaluate"]
