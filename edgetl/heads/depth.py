"""A head on features from several depths of the frozen backbone (Head2Toe, Evci et al., ICML 2022), in numpy.

A multi-depth extractor (``edgetl export --features multi``) outputs one vector: the pooled final features followed by
the globally averaged output of every stage, described by the bundle's ``feature_groups``. :class:`DepthHead` takes
the columns of some groups, normalises each group (features standardised, then scaled by ``1/sqrt(group size)`` so a
16-channel early stage and the 1280-d final features weigh the same), optionally **selects** the most relevant
features, and fits an ordinary head (``inner``) on them.

Selection: an L2-regularised softmax on all normalised features; a feature's relevance is the norm of its weights over
the classes (Head2Toe ranks features by the norm of their group-lasso weights; with one weight group per feature the
L2 fit's norms give the same kind of ranking at the cost of one L-BFGS fit). The ``keep`` most relevant features stay;
by default as many as the largest group (the final features) has, so the head is no larger than a last-layer head.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any, ClassVar

import numpy as np
import numpy.typing as npt

from edgetl.errors import DataError, NotFittedError, StateError
from edgetl.heads.base import FloatArray, Head, check_features, check_Xy


class DepthHead(Head):
    """``inner`` head on selected, group-normalised columns.

    ``groups``: ``[[offset, size], ...]`` column ranges to use (None: every column, one group). ``normalise``: the
    per-group normalisation above (False: raw columns, e.g. the final group alone). ``keep``: number of features to
    select (None: as many as the largest group has; 0 or ≥ the column count: no selection).
    Learned: ``columns_`` (K,) indices into the embedding, ``mean_`` / ``scale_`` (K,), and the inner head.
    """

    kind: ClassVar[str] = "depth"
    _arrays: ClassVar[tuple[str, ...]] = ("columns_", "mean_", "scale_", "n_features_")

    def __init__(self, inner: str = "softmax", groups: list[list[int]] | None = None, normalise: bool = True,
                 keep: int | None = None, inner_params: dict[str, Any] | None = None, seed: int = 0):
        self.inner = inner
        self.groups = groups
        self.normalise = normalise
        self.keep = keep
        self.inner_params = inner_params or {}
        self.seed = seed

    def _make_inner(self) -> Head:
        from edgetl.heads import make_head

        if self.inner == self.kind:
            raise DataError("a depth head cannot wrap another depth head")
        return make_head(self.inner, **({"seed": self.seed} | self.inner_params))

    def _ranges(self, dim: int) -> list[tuple[int, int]]:
        ranges = [(int(o), int(s)) for o, s in (self.groups or [[0, dim]])]
        if any(o < 0 or s < 1 or o + s > dim for o, s in ranges):
            raise DataError(f"feature groups {self.groups} do not fit embeddings of {dim} features; the head was made "
                            "for another extractor")
        return ranges

    @classmethod
    def around(cls, head: Head, offset: int, size: int, n_features: int) -> DepthHead:
        """A fitted head applying an already fitted ``head`` to columns ``[offset, offset + size)`` unchanged (e.g. the
        host's fine-tuned classifier on the final group of a multi-depth embedding)."""
        wrapped = cls(inner=head.kind, groups=[[offset, size]], normalise=False, keep=0)
        wrapped.columns_ = np.arange(offset, offset + size, dtype=np.int64)
        wrapped.mean_, wrapped.scale_ = np.zeros(size, np.float32), np.ones(size, np.float32)
        wrapped.n_features_ = np.int64(n_features)
        wrapped.head_ = head
        return wrapped

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> DepthHead:
        X, y = check_Xy(X, y)
        assert y is not None
        ranges = self._ranges(X.shape[1])
        columns = np.concatenate([np.arange(o, o + s) for o, s in ranges])
        Z = X[:, columns]
        if self.normalise:
            mean = Z.mean(axis=0)
            group_size = np.concatenate([np.full(s, s, dtype=np.float32) for _, s in ranges])
            scale = (Z.std(axis=0) + 1e-6) * np.sqrt(group_size)
        else:
            mean, scale = np.zeros(len(columns), np.float32), np.ones(len(columns), np.float32)
        Z = (Z - mean) / scale
        keep = max(s for _, s in ranges) if self.keep is None else int(self.keep)
        if 0 < keep < len(columns):
            from edgetl.heads.softmax import DEFAULT_L2, SoftmaxHead

            # a fixed l2: the ranking needs no cross-validated strength (and stays as fast as before)
            ranker = SoftmaxHead(l2=DEFAULT_L2, seed=self.seed, max_iter=100).fit(Z, y)
            relevance = np.linalg.norm(ranker.coef_, axis=0)  # per standardised feature, over the classes
            chosen = np.sort(np.argsort(-relevance, kind="stable")[:keep])
            columns, mean, scale, Z = columns[chosen], mean[chosen], scale[chosen], Z[:, chosen]
        self.columns_ = columns.astype(np.int64)
        self.mean_ = np.asarray(mean, np.float32)
        self.scale_ = np.asarray(scale, np.float32)
        self.n_features_ = np.int64(X.shape[1])
        self.head_ = self._make_inner().fit(Z, y)
        return self

    def transform(self, X: npt.ArrayLike) -> FloatArray:
        """Embeddings ``(N, D)`` → the selected, normalised features ``(N, K)`` the inner head sees."""
        self._check_fitted()
        X, _ = check_Xy(X)
        check_features(X, int(self.n_features_))
        return ((X[:, self.columns_] - self.mean_) / self.scale_).astype(np.float32)

    def decision_function(self, X: npt.ArrayLike) -> FloatArray:
        Z = self.transform(X)  # checks that the head is fitted
        return self.head_.decision_function(Z)

    def _check_fitted(self) -> None:
        super()._check_fitted()
        if not hasattr(self, "head_"):
            raise NotFittedError("this DepthHead has no inner head; call fit(X, y) first")

    def save(self, file: str | os.PathLike[str] | IO[bytes]) -> None:
        """One ``.npz``: this head's arrays and settings plus the inner head's, prefixed ``inner.``."""
        self._check_fitted()
        import io

        buf = io.BytesIO()
        self.head_.save(buf)
        buf.seek(0)
        with np.load(buf, allow_pickle=False) as inner:
            inner_arrays = {f"inner.{k}": inner[k] for k in inner.files}
        meta = json.dumps({"kind": self.kind, "params": self.get_params()}, default=float)
        np.savez(file, __meta__=np.array(meta), **{k: np.asarray(getattr(self, k)) for k in self._arrays},
                 **inner_arrays)

    @classmethod
    def _from_arrays(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> Head:
        from edgetl.heads import HEADS

        head = super()._from_arrays(params, {k: v for k, v in arrays.items() if not k.startswith("inner.")})
        inner = {k[len("inner."):]: v for k, v in arrays.items() if k.startswith("inner.")}
        try:
            meta = json.loads(str(inner.pop("__meta__")))
            inner_cls = HEADS[meta["kind"]]
        except (KeyError, ValueError) as exc:
            raise StateError(f"depth head file lacks a valid inner head ({exc}); it is truncated or damaged") from exc
        head.head_ = inner_cls._from_arrays(meta.get("params", {}), inner)  # type: ignore[attr-defined]
        return head
