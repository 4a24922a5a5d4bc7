"""A head's training data as one value: :class:`LabelledEmbeddings` (embeddings, the images' content hashes, class
indices and class names), with the set operations device training needs — merging by class name and a per-class
budget (reservoir sampling).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl.store import reservoir


@dataclass(frozen=True)
class LabelledEmbeddings:
    """``X`` embeddings ``(N, D)`` float32; ``keys`` the images' content hashes ``(N,)`` (``U64``, how the embedding
    store and a head version name its training images); ``y`` class indices ``(N,)`` into ``classes``."""

    X: npt.NDArray[np.float32]
    keys: npt.NDArray[np.str_]
    y: npt.NDArray[np.int64]
    classes: list[str]

    @classmethod
    def empty(cls, dim: int) -> LabelledEmbeddings:
        """No images, no classes (``dim`` features)."""
        return cls(np.zeros((0, dim), np.float32), np.zeros(0, "U64"), np.zeros(0, np.int64), [])

    def __len__(self) -> int:
        return len(self.X)

    def __iter__(self) -> Iterator[Any]:
        """``X, keys, y, classes = data``: the tuple this replaced (for callers that still unpack it)."""
        return iter((self.X, self.keys, self.y, self.classes))

    def take(self, index: npt.NDArray[Any]) -> LabelledEmbeddings:
        """The rows ``index`` (indices or a boolean mask), same classes."""
        return LabelledEmbeddings(self.X[index], self.keys[index], self.y[index], self.classes)

    def merge(self, new: LabelledEmbeddings) -> LabelledEmbeddings:
        """Union with ``new``, classes matched by name (new names appended, the order of this set's classes kept); an
        image (content hash) present in both keeps the new label."""
        classes = list(self.classes) + [c for c in new.classes if c not in self.classes]
        y1 = np.array([classes.index(new.classes[i]) for i in new.y], dtype=np.int64)
        fresh = ~np.isin(self.keys, new.keys)
        return LabelledEmbeddings(np.concatenate([self.X[fresh], new.X]), np.concatenate([self.keys[fresh], new.keys]),
                                  np.concatenate([self.y[fresh], y1]).astype(np.int64), classes)

    def retain(self, n_old: int, budget: int | None, seen: dict[str, int], seed: int
               ) -> tuple[LabelledEmbeddings, dict[str, Any]]:
        """Apply a per-class budget (reservoir sampling; rows before ``n_old`` are the current reservoir, ``seen`` the
        images seen so far per class name); returns the kept set and the retention record kept in a version's meta
        (budget, images seen per class). Without a budget every row is kept."""
        classes = self.classes
        if not budget:
            counts = np.bincount(self.y, minlength=len(classes))
            return self, {"budget": None, "seen": {c: int(n) for c, n in zip(classes, counts)}}
        keep, counts = reservoir(self.y, n_old, budget, {classes.index(c): n for c, n in seen.items() if c in classes},
                                 seed)
        return self.take(keep), {"budget": int(budget), "seen": {classes[c]: int(n) for c, n in sorted(counts.items())}}


__all__ = ["LabelledEmbeddings"]
