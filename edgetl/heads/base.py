"""The head contract shared by every device head (scikit-learn style).

``__init__`` stores settings only; ``fit(X, y)`` returns ``self``; learned attributes end in ``_``; predicting before
fitting raises :class:`~edgetl.errors.NotFittedError`; ``save``/``load`` use ``.npz`` without pickle.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np
import numpy.typing as npt

from edgetl.errors import DataError, NotFittedError, StateError

FloatArray = npt.NDArray[np.float32]


class Head(ABC):
    """A classifier on embeddings ``X`` of shape ``(N, D)`` with integer labels ``y`` in ``[0, C)``."""

    kind: ClassVar[str]
    #: names of learned array attributes written by :meth:`save`
    _arrays: ClassVar[tuple[str, ...]]
    #: learned array attributes written when present and optional on load (heads saved by older versions lack them)
    _optional_arrays: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> Head: ...

    @abstractmethod
    def decision_function(self, X: npt.ArrayLike) -> FloatArray:
        """Class scores, shape ``(N, C)``."""

    def predict_proba(self, X: npt.ArrayLike) -> FloatArray:
        """Class probabilities, shape ``(N, C)``; rows sum to 1."""
        return softmax(self.decision_function(X))

    def predict(self, X: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Most likely class index, shape ``(N,)``."""
        return np.argmax(self.decision_function(X), axis=1).astype(np.int64)

    def get_params(self) -> dict[str, Any]:
        """Settings given to ``__init__`` (attributes not ending in ``_``)."""
        return {k: v for k, v in vars(self).items() if not k.endswith("_")}

    def _check_fitted(self) -> None:
        if not all(hasattr(self, name) for name in self._arrays):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X, y) first")

    def save(self, file: str | os.PathLike[str] | IO[bytes]) -> None:
        """Write settings and learned arrays to one ``.npz`` path or binary file (no pickled objects)."""
        self._check_fitted()
        arrays = {name: np.asarray(getattr(self, name)) for name in self._arrays}
        arrays |= {name: np.asarray(getattr(self, name)) for name in self._optional_arrays if hasattr(self, name)}
        meta = json.dumps({"kind": self.kind, "params": self.get_params()}, default=float)
        np.savez(file, __meta__=np.array(meta), **arrays)

    @classmethod
    def _from_arrays(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> Head:
        head = cls(**params)
        for name in cls._arrays:
            if name not in arrays:
                raise StateError(f"head file lacks array {name!r}; it is truncated or from another version")
            setattr(head, name, arrays[name])
        for name in cls._optional_arrays:
            if name in arrays:
                setattr(head, name, arrays[name])
        return head


def softmax(scores: np.ndarray) -> FloatArray:
    """Row-wise softmax, numerically stable."""
    z = scores - scores.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32, copy=False)


def l2_normalise(X: npt.ArrayLike, dtype: npt.DTypeLike = None) -> np.ndarray:
    """Rows of ``X`` (N, D) divided by their Euclidean norm (at least 1e-12, so zero rows stay zero), in ``X``'s dtype
    or ``dtype``. The one normalisation of the cosine heads, the novelty score and the fleet's NCM sums."""
    X = np.asarray(X, dtype=dtype)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def check_Xy(X: npt.ArrayLike, y: npt.ArrayLike | None = None) -> tuple[FloatArray, npt.NDArray[np.int64] | None]:
    """Validate embeddings (2-D, finite) and labels (1-D integers, same length)."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0:
        raise DataError(f"expected embeddings of shape (N, D) with N ≥ 1, found {X.shape}")
    if not np.isfinite(X).all():
        raise DataError("embeddings contain NaN or infinity; re-embed the data (is the extractor file intact?)")
    if y is None:
        return X, None
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(X):
        raise DataError(f"expected {len(X)} labels in a 1-D array, found shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise DataError("labels must be non-negative integers (class indices)")
    return X, y.astype(np.int64)


def check_features(X: np.ndarray, expected: int) -> None:
    """Embeddings must have the feature count the head was trained on."""
    if X.shape[1] != expected:
        raise DataError(f"expected embeddings with {expected} features, found {X.shape[1]}; the head was trained for "
                        "another extractor")


def load_head(path: str | os.PathLike[str]) -> Head:
    """Read a head written by :meth:`Head.save`, dispatching on its recorded kind."""
    from edgetl.heads import HEADS

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(str(arrays.pop("__meta__")))
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise StateError(f"cannot read head {path} ({exc}); the file is damaged — roll back or retrain") from exc
    kind = meta.get("kind")
    if kind not in HEADS:
        raise StateError(f"head {path} has unknown kind {kind!r}; known: {', '.join(HEADS)}")
    return HEADS[kind]._from_arrays(meta.get("params", {}), arrays)
