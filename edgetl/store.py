"""On-device embedding store: a cache of embeddings keyed by the image's content hash, one file per extractor sha256
so that embeddings of different extractors (FP32 vs INT8, old vs new bundle) never mix. float16 on disk."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgetl._atomic import atomic_write


def content_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (renaming or moving an image keeps its cached embedding)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class EmbeddingStore:
    """Embeddings of one extractor, held in memory and persisted to ``folder/<extractor sha256[:16]>.npz``."""

    def __init__(self, folder: Path, extractor_sha256: str):
        self.path = folder / f"{extractor_sha256[:16]}.npz"
        self._index: dict[str, int] = {}
        self._rows: list[np.ndarray] = []
        self._dirty = False
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    keys, emb = data["keys"], data["embeddings"]
                self._rows = list(emb)
                self._index = {str(k): i for i, k in enumerate(keys)}
            except (OSError, ValueError, KeyError, EOFError):
                # a damaged cache is only a cache: start again, the images are re-embedded
                self._index, self._rows = {}, []

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: str) -> npt.NDArray[np.float32] | None:
        i = self._index.get(key)
        return None if i is None else self._rows[i].astype(np.float32)

    def put(self, key: str, embedding: np.ndarray) -> None:
        row = np.asarray(embedding, dtype=np.float16)
        if key in self._index:
            self._rows[self._index[key]] = row
        else:
            self._index[key] = len(self._rows)
            self._rows.append(row)
        self._dirty = True

    def retain(self, keys: set[str]) -> int:
        """Drop every embedding whose key is not in ``keys`` (call :meth:`save` to persist). Returns how many."""
        drop = [k for k in self._index if k not in keys]
        if drop:
            kept = [k for k in self._index if k in keys]
            self._rows = [self._rows[self._index[k]] for k in kept]
            self._index = {k: i for i, k in enumerate(kept)}
            self._dirty = True
        return len(drop)

    def save(self) -> None:
        """Persist atomically (no-op when nothing changed)."""
        if not self._dirty:
            return
        keys = np.array(list(self._index), dtype="U64")
        emb = np.stack(self._rows) if self._rows else np.zeros((0, 0), dtype=np.float16)
        atomic_write(self.path, lambda fh: np.savez(fh, keys=keys, embeddings=emb))
        self._dirty = False


def reservoir(y: np.ndarray, n_old: int, budget: int, seen: dict[int, int], seed: int = 0
              ) -> tuple[np.ndarray, dict[int, int]]:
    """Per-class reservoir sampling (Vitter's algorithm R) over a stream of labelled samples.

    ``y[:n_old]`` is the current reservoir (rows already kept), ``y[n_old:]`` the new samples in arrival order;
    ``seen[c]`` counts the samples of class ``c`` offered so far (at least its kept rows). Each class keeps at most
    ``budget`` rows, a uniform random sample of every sample of that class ever offered. Returns the sorted indices
    of the rows to keep and the updated counts.
    """
    rng = np.random.default_rng(seed)
    kept: dict[int, list[int]] = {}
    for i in range(n_old):
        kept.setdefault(int(y[i]), []).append(i)
    counts = {c: max(seen.get(c, 0), len(rows)) for c, rows in kept.items()}
    for c, rows in kept.items():
        if len(rows) > budget:  # a smaller budget than before: a uniform subsample of the reservoir stays uniform
            kept[c] = sorted(rng.choice(rows, size=budget, replace=False).tolist())
    for i in range(n_old, len(y)):
        c = int(y[i])
        rows = kept.setdefault(c, [])
        n = counts.get(c, 0)
        if len(rows) < budget:
            rows.append(i)
        else:
            j = int(rng.integers(0, n + 1))
            if j < budget:
                rows[j] = i
        counts[c] = n + 1
    keep = np.sort(np.fromiter((i for rows in kept.values() for i in rows), dtype=np.int64))
    return keep, counts
