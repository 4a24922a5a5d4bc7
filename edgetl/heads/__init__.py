"""numpy heads trained on frozen embeddings; one contract (:class:`~edgetl.heads.base.Head`), one table of kinds."""

from __future__ import annotations

from edgetl.heads.base import Head, load_head
from edgetl.heads.depth import DepthHead
from edgetl.heads.prototype import ImprintHead, KNNHead, NCMHead
from edgetl.heads.softmax import SoftmaxHead

HEADS: dict[str, type[Head]] = {h.kind: h for h in (SoftmaxHead, NCMHead, KNNHead, ImprintHead, DepthHead)}


def make_head(kind: str, **params: object) -> Head:
    """A new, unfitted head of ``kind`` (one of :data:`HEADS`)."""
    from edgetl.errors import DataError

    if kind not in HEADS:
        raise DataError(f"unknown head {kind!r}; known: {', '.join(HEADS)}")
    return HEADS[kind](**params)  # type: ignore[arg-type]


__all__ = ["HEADS", "DepthHead", "Head", "ImprintHead", "KNNHead", "NCMHead", "SoftmaxHead", "load_head", "make_head"]
