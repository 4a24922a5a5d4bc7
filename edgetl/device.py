"""The device-side facade (numpy + one inference runtime, never torch): :class:`DeviceRuntime`.

A camera or ground-station application uses it directly; the ``edgetl device`` commands are a thin layer over it.
It opens and verifies a bundle and chooses the extractor, then hands each concern to one part:

- :class:`edgetl.embedding.Embedder` (``runtime.embedder``): the extractor session, golden check, embedding and the
  embedding store;
- :class:`edgetl.versions.VersionHistory` (``runtime.versions``): head versions, history, rollback, the audit log;
- :class:`edgetl.training.Trainer` (``runtime.training``): training, class edits, adoption, the promote gate and
  ``commit_version``;
- :class:`edgetl.prediction.Predictor` (``runtime.predictor()``): the one prediction path (``predict``, ``watch``,
  ``stream``), plus ``drift`` and ``evaluate``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl import prediction
from edgetl._atomic import atomic_write_json
from edgetl.budget import memory_settings
from edgetl.bundle import Bundle
from edgetl.data import ImageFolder
from edgetl.embedding import Embedder, Progress, no_progress
from edgetl.errors import BundleError
from edgetl.heads import Head
from edgetl.labelled import LabelledEmbeddings
from edgetl.modality import Loader
from edgetl.novelty import Novelty
from edgetl.prediction import DRIFT_WINDOW, Prediction, Predictor
from edgetl.registry import sha256_file
from edgetl.runtime import FeatureExtractor
from edgetl.selection import choose
from edgetl.state import BUNDLE_HEAD, DeviceState
from edgetl.training import Trainer, TrainReport
from edgetl.versions import VersionHistory, head_extractor

log = logging.getLogger(__name__)
_no_progress = no_progress  # the name callers used before the parts existed


class _Part:
    """An extractor setting that lives in the embedding part; reading or setting it on the facade reaches it there
    (e.g. ``runtime.providers = [...]`` before the session is created)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: DeviceRuntime | None, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.embedder, self.name)

    def __set__(self, obj: DeviceRuntime, value: Any) -> None:
        setattr(obj.embedder, self.name, value)


class DeviceRuntime:
    """Load and verify a bundle; embed, train a head, predict, evaluate.

    The extractor session is created on first use and reused for the life of the object.
    """

    threads = _Part()
    providers = _Part()
    memory = _Part()
    batch_size = _Part()

    def __init__(self, bundle: str | os.PathLike[str], backend: str | None = None, precision: str | None = None,
                 profile: str | None = None, threads: int | None = None, batch_size: int | None = None,
                 trust: str | os.PathLike[str] | None = None):
        # the profile (which may name a trusted key) is chosen from the manifest; then one full verification pass.
        # Heads belong to extractors: unless told otherwise, the device runs the extractor its current head was
        # trained on (when this bundle has it and its runtime is installed here)
        unverified = Bundle.load(bundle, verify=False)
        if backend is None and precision is None:
            backend, precision = head_extractor(unverified)
        choice = choose(unverified, backend, precision, profile, threads)
        trust = trust if trust is not None else choice.profile.trust
        self.bundle = Bundle.load(bundle, trust=trust)
        if trust is not None:
            _check_replay(self.bundle)
        self.profile = choice.profile
        self.entry = self.bundle.extractor(choice.entry.format, choice.entry.precision)  # from the verified manifest
        self.backend = self.entry.format
        self.precision = self.entry.precision
        # a memory budget (the profile's memory_budget_mb) sets the batch size and the runtime's arena settings
        memory = memory_settings(
            choice.profile.memory_budget_mb, self._input_size(), self.bundle.feature_dim,
            max_batch=batch_size or choice.profile.batch_size or 32) if self.bundle.modality == "image" else None
        self.extractor_sha256 = self.bundle.sha256(self.entry.file)
        self.embedder = Embedder(self.bundle, self.entry, self.extractor_sha256, choice.threads, choice.providers,
                                 memory, batch_size or (memory.batch_size if memory else None) or
                                 choice.profile.batch_size or 32)
        self.versions = VersionHistory(self.bundle, self.entry, self.extractor_sha256)
        self.training = Trainer(self.embedder, self.versions)

    def _input_size(self) -> int:
        return int(self.bundle.preprocessing.input_size)

    # ------------------------------------------------------------------------------------------------------ embedding
    @property
    def extractor(self) -> FeatureExtractor:
        """The runtime session, created once; before first use it must reproduce the bundle's golden vectors."""
        return self.embedder.extractor

    @property
    def loader(self) -> Loader:
        """How this bundle's items (image files, text documents) become extractor inputs."""
        return self.embedder.loader

    def embed_items(self, items: Sequence[Any], progress: Progress = no_progress) -> npt.NDArray[np.float32]:
        """Items of this bundle's modality (image files; ``.txt`` files or :class:`edgetl.text.TextRecord`) →
        embeddings ``(N, D)``, in batches, without the store. ``progress("embed", done, total)`` after each batch."""
        return self.embedder.embed_items(items, progress)

    def embed_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Documents (strings) → embeddings ``(N, D)`` with a text bundle's tokenizer and encoder."""
        from edgetl.text import TextRecord

        return self.embedder.embed_items([TextRecord(t) for t in texts])

    def embed_arrays(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Preprocessed images ``(N, 3, S, S)`` (packed tokens ``(N, 2, L)`` for text) → embeddings ``(N, D)``."""
        return self.embedder.extractor.embed(batch)

    def embed_images(self, images: Sequence[Any]) -> npt.NDArray[np.float32]:
        """PIL images or uint8 arrays → embeddings ``(N, D)`` (same preprocessing as the host)."""
        return self.embedder.embed_images(images)

    def embed_paths(self, paths: Sequence[Path], cache: bool = True,
                    progress: Progress = no_progress) -> tuple[npt.NDArray[np.float32], int]:
        """Embed image files, reading cached embeddings from the store. Returns (embeddings (N, D), number cached)."""
        embeddings, _, cached = self.embedder.embed_keyed(paths, cache, progress)
        return embeddings, cached

    def _embed_keyed(self, paths: Sequence[Path], cache: bool = True, progress: Progress = no_progress,
                     writer: bool = False) -> tuple[npt.NDArray[np.float32], np.ndarray, int]:
        """What training embeds through (:meth:`Embedder.embed_keyed`); one place to watch or replace it."""
        return self.embedder.embed_keyed(paths, cache, progress, writer)

    def domain_check(self, embeddings: npt.NDArray[np.float32]) -> dict[str, Any] | None:
        """Local embeddings ``(N, D)`` vs the host's reference embeddings of this extractor (None without them)."""
        return self.embedder.domain_check(embeddings)

    def store_info(self) -> dict[str, Any]:
        """Embedding files (one per extractor) and the current head's training images per class."""
        budget, seen = self.versions.budget_state(None)
        return {"files": self.embedder.store_files(), "current_head": self.current_version(),
                "current_head_classes": self.versions.class_counts(), "budget": budget, "seen": seen}

    # ---------------------------------------------------------------------------------------------------- head state
    @property
    def state(self) -> DeviceState:
        return self.versions.state

    def current_version(self) -> str | None:
        """The name of the current head version, ``"bundle"`` for the host's initial head, or None."""
        return self.versions.current_version()

    def load_current_head(self) -> tuple[Head, list[str], str]:
        """(head, class names, version) of the current head; raises :class:`NotFittedError` when there is none."""
        return self.versions.load_current()

    def novelty_model(self, version: str) -> Novelty | None:
        """The novelty model head ``version`` was trained with (None for the bundle's head or without one)."""
        return self.versions.novelty_model(version)

    def history(self) -> list[dict[str, Any]]:
        """Every head version, oldest first, with its status (current / candidate / previous) and metrics."""
        return self.versions.history()

    def rollback(self, to: str | None = None, wait: float = 0.0, reason: str | None = None) -> str:
        """Make ``to`` (default: the version that was current before the current one) current again. ``reason``
        replaces the default reason recorded in the audit log (e.g. an operator promoting a candidate)."""
        return self.versions.rollback(to, wait, reason)

    # ------------------------------------------------------------------------------------------------------ training
    def train(self, data: str | os.PathLike[str] | ImageFolder, head: str = "softmax", val_split: float = 0.2,
              seed: int = 0, tolerance: float = 0.02, force: bool = False, wait: float = 0.0,
              shots: int | None = None, incremental: bool = False, budget: int | None = None,
              features: str = "last", progress: Progress = no_progress, **head_params: Any) -> TrainReport:
        """Embed ``data`` (ImageFolder), fit a new head, measure it on a held-out part and write it as a new version.

        ``shots``: use at most that many images per class (seeded). ``incremental``: the new images join the current
        head's training set (read from the embedding store, never re-embedded); classes are matched by name.
        ``budget``: keep at most that many embeddings per class for later retraining, a uniform sample of every image
        of the class seen so far (reservoir sampling); incremental training and ``add_class`` inherit the current
        head's budget. Images the new head does not keep are dropped from the embedding store.
        ``features`` (multi-depth bundles, ``export --features multi``): ``last`` uses the pooled final features only;
        ``multi`` every depth, normalised per group, with feature selection (:class:`edgetl.heads.DepthHead`);
        ``auto`` fits both on the training part and keeps the one more accurate on the held-out part.
        Promote gate: the new head becomes current unless the current head (same classes) is more accurate on
        held-out images by more than ``tolerance``; then it is kept as a candidate (``force`` promotes anyway).
        """
        return self.training.train(data, head=head, val_split=val_split, seed=seed, tolerance=tolerance, force=force,
                                   wait=wait, shots=shots, incremental=incremental, budget=budget, features=features,
                                   progress=progress, embed=self._embed_keyed, **head_params)

    def add_class(self, name: str, data: str | os.PathLike[str], wait: float = 0.0, force: bool = False,
                  progress: Progress = no_progress) -> TrainReport:
        """Add class ``name`` from the images in ``data`` (a flat folder, or an ImageFolder's sub-folder) to the
        current head's classes; the other classes keep their stored training embeddings (nothing is forgotten)."""
        return self.training.add_class(name, data, wait=wait, force=force, progress=progress, embed=self._embed_keyed)

    def remove_class(self, name: str, wait: float = 0.0) -> TrainReport:
        """A new version without class ``name`` (its stored embeddings are left out of the refit)."""
        return self.training.remove_class(name, wait)

    def rename_class(self, old: str, new: str, wait: float = 0.0) -> str:
        """A new version identical to the current one but with class ``old`` called ``new``."""
        return self.training.rename_class(old, new, wait)

    def training_set(self) -> LabelledEmbeddings:
        """The current head's training embeddings, read from the store."""
        return self.training.training_set()

    def adopt_head(self, head_file: str | os.PathLike[str], labels: Sequence[str], source: str = "fleet",
                   extractor_sha256: str | None = None, tolerance: float = 0.02, force: bool = False,
                   wait: float = 0.0) -> TrainReport:
        """Adopt a head trained elsewhere (e.g. aggregated by a fleet server from many devices' heads) as a new
        version, through the promote gate.

        The head must be for this bundle's extractor (``extractor_sha256`` when given, and the feature count) and name
        one label per class. It is measured on this device's stored training embeddings (classes matched by name; the
        images keep their content hashes, so later ``train --incremental`` and ``add_class`` build on it) and gated
        against the current head like a trained one: a head worse than the current one by more than ``tolerance`` is
        kept as a candidate (``force`` promotes anyway)."""
        return self.training.adopt_head(head_file, labels, source, extractor_sha256, tolerance, force, wait)

    # ---------------------------------------------------------------------------------------------------- inference
    def predictor(self, window: int | None = DRIFT_WINDOW) -> Predictor:
        """A :class:`Predictor` on this device's current head (reloaded when the current version changes), with a
        rolling drift window of ``window`` images (None: none): what ``watch`` and ``stream`` classify with."""
        return Predictor(self.versions, window)

    def predictions(self, paths: Sequence[str | os.PathLike[str]], top_k: int = 1,
                    progress: Progress = no_progress, predictor: Predictor | None = None) -> list[Prediction]:
        """Top-k classes with calibrated probabilities for each item, and whether it looks unlike every known class
        (``unknown``: its novelty score exceeds the threshold set on held-out local data). A long-running caller passes
        its own ``predictor`` (``self.predictor(window=None)``), so the head is read once, not at every call."""
        items = list(paths)
        predictor = predictor or self.predictor(window=None)  # one-off predictions: no rolling drift
        predictor.refresh()  # no head: refused before anything is embedded
        return predictor.classify(self.embed_items(items, progress=progress), top_k, items)

    def predict(self, paths: Sequence[str | os.PathLike[str]], top_k: int = 1,
                progress: Progress = no_progress) -> list[dict[str, Any]]:
        """:meth:`predictions` as JSON-ready dicts (``device predict --json`` prints one per line)."""
        return [p.as_dict() for p in self.predictions(paths, top_k, progress)]

    def drift(self, data: str | os.PathLike[str], progress: Progress = no_progress) -> dict[str, Any]:
        """Compare a folder of images (any layout) with what the current head was trained on."""
        return prediction.drift(self.embedder, self.versions, data, progress)

    def evaluate(self, data: str | os.PathLike[str], progress: Progress = no_progress) -> dict[str, Any]:
        """Accuracy of the current head on a labelled ImageFolder whose class names the head knows."""
        return prediction.evaluate(self.embedder, self.versions, data, progress)

    def verify(self) -> dict[str, Any]:
        """Every check: schema and every file's sha256 (done when the bundle was loaded), the signature when a trusted
        key was given, and the golden vectors run through this device's runtime. Returns the measured error."""
        self.embedder.extractor  # noqa: B018 - creating the session runs the golden check
        return self.embedder.golden

    def info(self) -> dict[str, Any]:
        """The bundle as this device runs it: the extractor selected here, the current head, and the manifest's fields
        echoed as written (its JSON: key order and keys of other edgetl versions included)."""
        m = self.bundle.manifest.raw
        version = self.current_version()
        current = self.state.meta(version) if version and version != BUNDLE_HEAD else None
        return {"bundle": str(self.bundle.path), "schema_version": m["schema_version"], "profile": self.profile.id,
                "selected": {"file": self.entry.file, "backend": self.backend, "precision": self.precision,
                             "threads": self.threads},
                "edgetl_version": m.get("edgetl_version"), "backbone": m["backbone"], "feature_dim": m["feature_dim"],
                "preprocessing": m["preprocessing"], "extractors": m["extractors"], "labels": m.get("labels"),
                "current_head": version, "current_head_meta": current}


def _check_replay(bundle: Bundle) -> None:
    """A signed bundle older than one this device already accepted is a replay: refuse it; else record it."""
    created = float(bundle.manifest.created_unix or 0.0)
    accepted_file = bundle.state_dir / "accepted.json"
    try:
        accepted = json.loads(accepted_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        accepted = {}
    newest = float(accepted.get("created_unix", 0.0))
    if created < newest:
        raise BundleError(f"bundle {bundle.path} is a signed manifest older than the one this device already "
                          f"accepted ({accepted.get('created')}); refusing a replayed bundle")
    if created > newest:
        try:
            atomic_write_json(accepted_file, {"created_unix": created, "created": bundle.manifest.created,
                                              "manifest_sha256": sha256_file(bundle.path / "manifest.json")})
        except OSError as exc:
            log.warning("could not record the accepted manifest (%s)", exc)


__all__ = ["DeviceRuntime", "LabelledEmbeddings", "Prediction", "Predictor", "Progress", "TrainReport"]
