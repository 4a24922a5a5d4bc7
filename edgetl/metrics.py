"""Comparisons shared by the host's export validation and the device's golden-vector check."""

from __future__ import annotations

import numpy as np


def compare_embeddings(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max absolute difference and the smallest per-row cosine similarity between two ``(N, D)`` arrays."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        return {"max_abs_diff": float("inf"), "min_cosine": -1.0}
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = (ref * cand).sum(axis=1) / np.maximum(norms, 1e-12)
    return {"max_abs_diff": float(np.abs(ref - cand).max()), "min_cosine": float(cosine.min())}
