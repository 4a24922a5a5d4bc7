"""The feature-extractor contract every runtime backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import numpy.typing as npt


class FeatureExtractor(ABC):
    """A frozen graph: preprocessed images ``(N, 3, S, S)`` float32 → embeddings ``(N, D)`` float32."""

    backend: str

    @abstractmethod
    def embed(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...
