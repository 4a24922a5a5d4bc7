"""Is the device's local data the kind of data the host validated the backbone on?

At export the host stores the embeddings of its held-out images (``reference.npz``, one array per extractor, computed
by that very graph). On the device, each local embedding gets a *domain distance*: one minus the mean cosine similarity
to its ``K`` nearest reference embeddings. (Centring on the reference mean was tried and separated worse: it pulls
dark-background grey photos towards Fashion-MNIST-like references.) The threshold comes from the reference
itself: the 95th percentile of each reference image's distance to its ``K`` nearest *other* reference images. When the
median local distance exceeds it, the typical local image is farther from the host's data than 95 % of the host's own
images are from each other: the frozen features were not validated on this domain, so a head update may not be
enough and a host fine-tune on local images is the remedy to try.
"""

from __future__ import annotations

from typing import Any

import numpy as np

K = 3
QUANTILE = 0.95


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class DomainReference:
    """Reference embeddings ``(M, D)`` of the host's held-out images and the data-derived distance threshold."""

    def __init__(self, reference: np.ndarray):
        if reference.ndim != 2 or len(reference) <= K:
            raise ValueError(f"need more than {K} reference embeddings, got shape {reference.shape}")
        self.reference = _unit(reference.astype(np.float32))
        sims = self.reference @ self.reference.T
        np.fill_diagonal(sims, -np.inf)  # leave-one-out: an image is not its own neighbour
        self.threshold = float(np.quantile(self._distance(sims), QUANTILE))

    @staticmethod
    def _distance(sims: np.ndarray) -> np.ndarray:
        top = -np.partition(-sims, K - 1, axis=1)[:, :K]
        return (1.0 - top.mean(axis=1)).astype(np.float32)

    def distance(self, X: np.ndarray) -> np.ndarray:
        """Domain distance of each embedding ``(N, D)`` → ``(N,)``."""
        return self._distance(_unit(X.astype(np.float32)) @ self.reference.T)

    def compare(self, X: np.ndarray) -> dict[str, Any]:
        """Median domain distance of local embeddings against the threshold, with plain-words advice."""
        d = self.distance(X)
        score = float(np.median(d))
        mismatch = score > self.threshold
        beyond = float((d > self.threshold).mean())
        if mismatch:
            advice = (f"local images are unlike the images the host validated this backbone on (median domain "
                      f"distance {score:.3f} > {self.threshold:.3f}; {beyond:.0%} of them beyond): the frozen features "
                      "may fit this domain poorly. If the held-out accuracy is not good enough, fine-tune the backbone "
                      "on the host with images like these (`edgetl finetune`), re-export and install the new bundle")
        else:
            advice = (f"local images resemble the host's reference images (median domain distance {score:.3f} <= "
                      f"{self.threshold:.3f}): a head update on the device is enough")
        return {"score": score, "threshold": self.threshold, "mismatch": mismatch, "fraction_beyond": beyond,
                "n_reference": int(len(self.reference)), "advice": advice}
