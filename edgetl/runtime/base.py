"""The feature-extractor contract every runtime backend implements.

A backend class is constructed as ``cls(path, entry=<manifest record of the graph>, threads=<int or None>)``; it
imports its engine inside ``__init__`` (raising :class:`~edgetl.errors.RuntimeMissingError` naming the extra to
install when the engine is absent, :class:`~edgetl.errors.BundleError` when the graph cannot be loaded), creates its
session once, and then serves any number of :meth:`embed` calls.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod

import numpy as np
import numpy.typing as npt

from edgetl.errors import DataError

log = logging.getLogger(__name__)


class FeatureExtractor(ABC):
    """A frozen graph: preprocessed images ``(N, 3, S, S)`` float32 (NCHW) → embeddings ``(N, D)`` float32."""

    backend: str

    @abstractmethod
    def embed(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...


def check_batch(batch: np.ndarray, size: int | None) -> np.ndarray:
    """A contiguous float32 ``(N, 3, S, S)`` batch, or a :class:`DataError` saying what was found."""
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1] != 3 or (size is not None and batch.shape[2:] != (size, size)):
        want = f"(N, 3, {size}, {size})" if size else "(N, 3, S, S)"
        raise DataError(f"extractor expects preprocessed input {want}, found {batch.shape}")
    return batch


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, so a container's or ``taskset``'s limit counts)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cap_threads(threads: int | None) -> int | None:
    """``threads`` for a runtime session, at most :func:`available_cores` (more only makes every image slower and
    loads the machine); capping is logged as a warning. ``None`` (the runtime's default) stays ``None``."""
    if threads is None:
        return None
    cores = available_cores()
    if threads > cores:
        log.warning("%d threads asked for, but this machine has %d CPU cores; using %d", threads, cores, cores)
        return cores
    return threads
