"""The embedding part of a device (:class:`edgetl.device.DeviceRuntime`): :class:`Embedder` owns the extractor
session (created once, after the bundle's golden vectors are reproduced), the bundle's loader, every way of turning
items into embeddings, and this extractor's embedding store (read, add, prune, list).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl.budget import MemorySettings
from edgetl.bundle import Bundle, ExtractorEntry
from edgetl.data import batches
from edgetl.domain import DomainReference
from edgetl.errors import BundleError, DataError, StateError
from edgetl.modality import Loader, make_loader
from edgetl.preprocess import preprocess_image
from edgetl.runtime import FeatureExtractor, load_extractor
from edgetl.store import SUFFIX as STORE_SUFFIX
from edgetl.store import EmbeddingStore, store_path

log = logging.getLogger(__name__)

#: progress callback: (stage, done, total)
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    return None


class Embedder:
    """Items → embeddings ``(N, D)`` with one extractor of ``bundle`` (``entry``, whose file has ``extractor_sha256``).

    ``threads``, ``providers``, ``memory`` (the profile's memory settings, None without a budget) and ``batch_size``
    are read when the session is created / on each call, so a caller may change them before first use."""

    def __init__(self, bundle: Bundle, entry: ExtractorEntry, extractor_sha256: str, threads: int | None,
                 providers: Sequence[str] | None, memory: MemorySettings | None, batch_size: int):
        self.bundle, self.entry, self.extractor_sha256 = bundle, entry, extractor_sha256
        self.threads, self.providers, self.memory, self.batch_size = threads, providers, memory, batch_size
        self._extractor: FeatureExtractor | None = None
        self._loader: Loader | None = None
        self.golden: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------- the session
    @property
    def extractor(self) -> FeatureExtractor:
        """The runtime session, created once; before first use it must reproduce the bundle's golden vectors."""
        if self._extractor is None:
            options: dict[str, Any] = {"providers": self.providers} if self.providers else {}
            if self.entry.format in ("onnx", "tflite") and self.memory is not None and \
                    self.memory.budget_mb is not None:
                options["memory"] = self.memory
            extractor = load_extractor(self.entry.format, self.bundle.file(self.entry.file), entry=self.entry.raw,
                                       threads=self.threads, modality=self.bundle.modality, **options)
            self.golden = self._check_golden(extractor)
            self._extractor = extractor
        return self._extractor

    def _check_golden(self, extractor: FeatureExtractor) -> dict[str, Any]:
        golden = self.bundle.golden(self.entry)
        if golden is None:
            return {"golden": "absent"}
        inputs, expected, tolerance = golden
        from edgetl.metrics import compare_embeddings

        check = self.entry.golden
        compared_to = "the FP32 reference" if check is not None and check.expected == "pytorch" else \
            "the host's output of this graph"

        try:
            report = compare_embeddings(expected, extractor.embed(inputs))
        except DataError as exc:
            raise BundleError(f"golden vectors of {self.entry.file} do not fit its graph ({exc}); re-export the bundle") \
                from exc
        if report["max_abs_diff"] > tolerance.get("max_abs", np.inf) or report["min_cosine"] < tolerance["min_cosine"]:
            raise BundleError(f"golden vectors fail for {self.entry.file} on this device's {self.entry.format} runtime: "
                              f"max abs diff {report['max_abs_diff']:.2e}, min cosine {report['min_cosine']:.6f} to "
                              f"{compared_to} (limits {tolerance}); the runtime or the extractor file is wrong for this "
                              "bundle")
        return {"golden": "ok", "n": len(inputs), "extractor": self.entry.file, "compared_to": compared_to} | \
            report

    @property
    def loader(self) -> Loader:
        """How this bundle's items (image files, text documents) become extractor inputs: chosen once from the
        bundle's modality (:func:`edgetl.modality.make_loader`)."""
        if self._loader is None:
            self._loader = make_loader(self.bundle)
        return self._loader

    # ------------------------------------------------------------------------------------------------- embedding
    def embed_items(self, items: Sequence[Any], progress: Progress = no_progress) -> npt.NDArray[np.float32]:
        """Items of this bundle's modality (image files; ``.txt`` files or :class:`edgetl.text.TextRecord`) →
        embeddings ``(N, D)``, in batches, without the store. ``progress("embed", done, total)`` after each batch."""
        out = np.empty((len(items), self.bundle.feature_dim), dtype=np.float32)
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            out[start:start + len(chunk)] = self.extractor.embed(self.loader.inputs(chunk))
            progress("embed", start + len(chunk), len(items))
        return out

    def embed_images(self, images: Sequence[Any]) -> npt.NDArray[np.float32]:
        """PIL images or uint8 arrays → embeddings ``(N, D)`` (same preprocessing as the host)."""
        pp = self.bundle.preprocessing
        out = np.empty((len(images), self.bundle.feature_dim), dtype=np.float32)
        buf = np.empty((min(self.batch_size, len(images)), 3, pp.input_size, pp.input_size), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            for i, image in enumerate(chunk):
                preprocess_image(image, pp, out=buf[i])
            out[start:start + len(chunk)] = self.extractor.embed(buf[:len(chunk)])
        return out

    def embed_keyed(self, paths: Sequence[Path], cache: bool = True, progress: Progress = no_progress,
                    writer: bool = False) -> tuple[npt.NDArray[np.float32], np.ndarray, int]:
        """(embeddings (N, D), content hashes (N,), number read from the store).

        New embeddings are *added* to the store (one transaction; what other processes added meanwhile is kept), so a
        read-only command (drift, evaluate) never loses another command's writes. ``writer``: the caller trains a head
        on these embeddings (and holds the writer lock): a store that cannot be written is an error, since the head's
        training embeddings must stay retrievable; for a reader it is only a warning (the cache is skipped)."""
        store = self._open_store(writer) if cache else None
        try:
            keys = [self.loader.key(p) for p in paths]
            out = np.empty((len(paths), self.bundle.feature_dim), dtype=np.float32)
            todo: list[int] = []
            hits = store.get_many(keys, self._chunk) if store is not None else [None] * len(keys)
            for i, hit in enumerate(hits):
                if hit is None or hit.shape != (self.bundle.feature_dim,):
                    todo.append(i)
                else:
                    out[i] = hit
            del hits
            cached = len(paths) - len(todo)
            progress("embed", cached, len(paths))
            self._embed_missing(paths, keys, todo, out, store, cached, progress)
            if store is not None:
                self._save(store, writer)
        finally:
            if store is not None:
                store.close()
        return out, np.array(keys, dtype="U64"), cached

    def _embed_missing(self, paths: Sequence[Path], keys: list[str], todo: list[int], out: np.ndarray,
                       store: EmbeddingStore | None, done: int, progress: Progress) -> None:
        """Embed the items ``todo`` (not in the store) into ``out``, adding each to the store's buffer."""
        for chunk in batches(todo, self.batch_size):
            emb = self.embed_items([paths[i] for i in chunk])
            for j, i in enumerate(chunk):
                out[i] = emb[j]
                if store is not None:
                    store.put(keys[i], emb[j])
            done += len(chunk)
            progress("embed", done, len(paths))

    @staticmethod
    def _save(store: EmbeddingStore, writer: bool) -> None:
        try:
            store.save()
        except StateError as exc:
            if writer:
                raise
            log.warning("embedding cache not saved (%s); embeddings will be recomputed next time", exc)

    # ------------------------------------------------------------------------------------------------- the store
    @property
    def _chunk(self) -> int | None:
        return self.memory.store_chunk if self.memory is not None else None

    def _open_store(self, writer: bool = True) -> EmbeddingStore | None:
        """This extractor's embedding store; for a reader, None (with a warning) when it cannot be opened."""
        try:
            return EmbeddingStore(self.bundle.state_dir / "store", self.extractor_sha256)
        except StateError as exc:
            if writer:
                raise
            log.warning("embedding cache unavailable (%s); embedding without it", exc)
            return None

    def stored(self, keys: Iterable[str]) -> list[npt.NDArray[np.float32] | None]:
        """The stored embeddings of ``keys`` (None where one is missing); a store that cannot be read is an error."""
        with EmbeddingStore(self.bundle.state_dir / "store", self.extractor_sha256) as store:
            return store.get_many(keys, self._chunk)

    def prune_store(self, referenced: set[str]) -> None:
        """Drop stored embeddings whose keys are not in ``referenced`` (what a per-class budget let go)."""
        try:
            with EmbeddingStore(self.bundle.state_dir / "store", self.extractor_sha256) as store:
                dropped = store.retain(referenced)
        except StateError as exc:
            log.warning("embedding store not pruned (%s)", exc)
            return
        if dropped:
            log.info("dropped %d stored embeddings that no head version trained on", dropped)

    def store_files(self) -> list[dict[str, Any]]:
        """Every embedding file (one per extractor): name, embeddings, bytes, whether this extractor's."""
        folder = self.bundle.state_dir / "store"
        files = []
        in_use = store_path(folder, self.extractor_sha256).name
        for path in sorted([*folder.glob(f"*{STORE_SUFFIX}"), *folder.glob("*.npz")]) if folder.is_dir() else []:
            if path.suffix == ".npz" and path.with_suffix(STORE_SUFFIX).exists():
                continue  # a legacy file that another process is migrating right now
            with EmbeddingStore(folder, path.stem) as store:  # opening migrates a legacy .npz store
                files.append({"file": store.path.name, "embeddings": len(store), "bytes": store.file_bytes(),
                              "in_use": store.path.name == in_use})
        return files

    def domain_check(self, embeddings: npt.NDArray[np.float32]) -> dict[str, Any] | None:
        """Compare local embeddings ``(N, D)`` with the host's reference embeddings of this extractor: is a head update
        enough, or is the backbone a poor fit for this domain? None when the bundle carries no reference."""
        reference = self.bundle.reference(self.entry)
        if reference is None or len(embeddings) == 0:
            return None
        return DomainReference(reference).compare(embeddings)


__all__ = ["Embedder", "Progress", "no_progress"]
