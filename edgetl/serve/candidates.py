"""The label queue as the console serves it: the recent unlabelled inbox images, embedded through the device's
embedding store, ranked by :func:`edgetl.serve.queue.rank` under the current head."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edgetl.errors import DataError, NotFittedError, StateError
from edgetl.serve.inbox import InboxLog, Item
from edgetl.serve.labels import LabelBook
from edgetl.serve.queue import COLD_START_PER_CLASS, describe, rank_head
from edgetl.state import BUNDLE_HEAD

if TYPE_CHECKING:
    from edgetl.device import DeviceRuntime

#: classes shown with each queue entry
TOP_K = 3


@dataclass(frozen=True)
class ClassScore:
    label: str
    probability: float


@dataclass(frozen=True)
class QueueEntry:
    """One image of the label queue with why it got its place."""

    item: Item
    placed_by: str  #: "novelty", "typical" (the cold start) or "uncertainty"
    priority: float  #: the uncertainty 1 - margin
    margin: float
    entropy: float
    novelty_now: float | None  #: the current head's novelty score (None without a novelty model)
    top_k: tuple[ClassScore, ...]

    def public(self) -> dict[str, Any]:
        return self.item.public() | {
            "placed_by": self.placed_by, "priority": round(self.priority, 6), "margin": round(self.margin, 6),
            "entropy": round(self.entropy, 6),
            "novelty_now": None if self.novelty_now is None else round(self.novelty_now, 6),
            "predicted": self.top_k[0].label,
            "top_k": [{"label": c.label, "probability": round(c.probability, 6)} for c in self.top_k]}


@dataclass(frozen=True)
class QueuePage:
    """The top of the label queue under head ``head_version`` (of ``classes``); ``length`` images wait in all."""

    head_version: str
    classes: list[str]
    length: int
    entries: list[QueueEntry]
    inbox: str | None

    def public(self) -> dict[str, Any]:
        return {"head_version": self.head_version, "classes": self.classes, "length": self.length,
                "items": [e.public() for e in self.entries], "inbox": self.inbox, "ranking": describe()}


class CandidatePool:
    """The ``size`` most recent unlabelled images of ``log`` with their embeddings (read through the runtime's
    embedding store, so training on them later re-embeds nothing)."""

    def __init__(self, runtime: DeviceRuntime, log: InboxLog, labels: LabelBook, size: int):
        self.runtime, self.log, self.labels, self.size = runtime, log, labels, size
        self._lock = threading.Lock()
        self._embeddings: dict[str, npt.NDArray[np.float32]] = {}

    def embedding(self, key: str) -> npt.NDArray[np.float32] | None:
        with self._lock:
            return self._embeddings.get(key)

    def unlabelled(self) -> list[Item]:
        items = [i for i in self.log.items() if i.status == "ok"][-self.size:]
        return [i for i in items if i.key is None or i.key not in self.labels]

    def embedded(self) -> tuple[list[Item], npt.NDArray[np.float32] | None]:
        """The unlabelled images that could be read, and their embeddings ``(N, D)`` (None when there are none);
        images gone or unreadable are marked ``gone`` and leave the queue."""
        items = self.unlabelled()
        with self._lock:
            todo = [i for i in items if i.key is None or i.key not in self._embeddings]
        readable: list[Item] = []
        for item in todo:
            try:
                self.log.safe_file(item.path)
                item.key = self.runtime.loader.key(item.path)
                readable.append(item)
            except (DataError, OSError):
                item.status = "gone"
        if readable:
            X, _ = self.runtime.embed_paths([i.path for i in readable])
            with self._lock:
                for item, row in zip(readable, X):
                    self._embeddings[str(item.key)] = row
        items = [i for i in items if i.status == "ok" and i.key is not None and i.key not in self.labels]
        if not items:
            return items, None
        with self._lock:
            return items, np.stack([self._embeddings[str(i.key)] for i in items])

    def _cold_start_set(self, version: str, classes: int) -> npt.NDArray[np.float32] | None:
        """The training embeddings of head ``version`` while it has fewer than the queue's cold-start number of
        labels per class (:data:`edgetl.serve.queue.COLD_START_PER_CLASS`); None otherwise, and for a head this
        device did not train (the bundle's, a fleet's), whose training images it does not hold."""
        keys = self.runtime.state.train_keys(version) if version != BUNDLE_HEAD else None
        if keys is None or len(keys) >= COLD_START_PER_CLASS * classes:
            return None
        try:
            return self.runtime.training_set().X
        except (NotFittedError, StateError):
            return None

    def page(self, limit: int, inbox: str | None = None) -> QueuePage:
        """The ``limit`` images at the top of the queue under the current head (:func:`edgetl.serve.queue.rank`);
        ``inbox`` is shown with them."""
        head, classes, version = self.runtime.load_current_head()
        items, X = self.embedded()
        entries: list[QueueEntry] = []
        if X is not None:
            meta = self.runtime.state.meta(version) if version != BUNDLE_HEAD else {}
            ranked = rank_head(head, X, meta.get("temperature"), self.runtime.novelty_model(version),
                               labelled=self._cold_start_set(version, len(classes)))
            ranking, proba, scores = ranked.ranking, ranked.proba, ranked.novelty
            for j in ranking.order[:limit]:
                top = np.argsort(-proba[j])[:TOP_K]
                placed_by = "novelty" if ranking.by_novelty[j] else "typical" if ranking.by_typical[j] else "uncertainty"
                entries.append(QueueEntry(
                    items[j], placed_by, float(ranking.priority[j]),
                    float(ranking.margin[j]), float(ranking.entropy[j]),
                    None if scores is None else float(scores[j]),
                    tuple(ClassScore(classes[int(c)], float(proba[j, c])) for c in top)))
        return QueuePage(version, classes, len(items), entries, inbox)


__all__ = ["CandidatePool", "ClassScore", "QueueEntry", "QueuePage"]
