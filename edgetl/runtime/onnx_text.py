"""ONNX Runtime backend for text encoders: a two-input graph (``input_ids``, ``attention_mask``) → pooled embedding.

The extractor contract stays one array in, one array out: a batch of tokenized documents is packed as int64
``(N, 2, L)`` — ``[:, 0]`` the token ids, ``[:, 1]`` the attention mask (see :func:`edgetl.text.pack`) — so the
embedding store, the golden vectors and the export gate treat text exactly as images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl.errors import BundleError, DataError
from edgetl.runtime.base import FeatureExtractor
from edgetl.runtime.onnx import open_session

#: the graph's input names, in the packed array's order
TEXT_INPUTS = ("input_ids", "attention_mask")


def check_tokens(batch: np.ndarray) -> np.ndarray:
    """A contiguous int64 ``(N, 2, L)`` batch of token ids and 0/1 masks, or a :class:`DataError` saying what was
    found."""
    batch = np.asarray(batch)
    if batch.ndim != 3 or batch.shape[1] != 2 or batch.shape[2] < 1 or batch.dtype.kind not in "iu":
        raise DataError(f"text encoder expects packed integer tokens (N, 2, L) (ids, mask), found {batch.dtype} "
                        f"{batch.shape}")
    return np.ascontiguousarray(batch, dtype=np.int64)


class OnnxTextExtractor(FeatureExtractor):
    """Packed tokens ``(N, 2, L)`` int64 → embeddings ``(N, D)`` float32 with ONNX Runtime.

    Columns past the longest document of the batch are cut before the run (pooling is masked, so padding never
    changes an embedding, only costs time)."""

    backend = "onnx"

    def __init__(self, path: Path, entry: dict[str, Any] | None = None, threads: int | None = None,
                 providers: list[str] | None = None):
        self.session = open_session(path, threads, providers)
        self.providers = self.session.get_providers()
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(TEXT_INPUTS):
            raise BundleError(f"{Path(path).name} takes inputs {names}; a text encoder takes {list(TEXT_INPUTS)}; "
                              "re-export the bundle")
        self.output_name = self.session.get_outputs()[0].name
        dims = self.session.get_outputs()[0].shape
        self.feature_dim = dims[-1] if isinstance(dims[-1], int) else None

    def embed(self, batch: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        batch = check_tokens(batch)
        if len(batch) == 0:
            return np.empty((0, self.feature_dim or 0), dtype=np.float32)
        used = np.flatnonzero(batch[:, 1].any(axis=0))
        length = int(used[-1]) + 1 if len(used) else 1
        feeds = {name: np.ascontiguousarray(batch[:, i, :length]) for i, name in enumerate(TEXT_INPUTS)}
        return self.session.run([self.output_name], feeds)[0].astype(np.float32, copy=False)
