"""The device-side facade (numpy + one inference runtime, never torch): :class:`DeviceRuntime`.

A camera or ground-station application uses it directly; the ``edgetl device`` commands are a thin layer over it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl._atomic import atomic_write_json
from edgetl.budget import memory_settings
from edgetl.bundle import Bundle
from edgetl.data import ImageFolder, batches, stratified_split
from edgetl.domain import DomainReference
from edgetl.errors import BundleError, DataError, NotFittedError, StateError
from edgetl.heads import Head, load_head, make_head
from edgetl.modality import Loader, make_loader
from edgetl.novelty import Novelty, calibrated_proba, fit_temperature
from edgetl.preprocess import preprocess_image
from edgetl.registry import sha256_file
from edgetl.report import classification_metrics
from edgetl.runtime import FeatureExtractor, load_extractor
from edgetl.selection import choose
from edgetl.state import BUNDLE_HEAD, DeviceState
from edgetl.store import SUFFIX as STORE_SUFFIX
from edgetl.store import EmbeddingStore, reservoir, store_path

log = logging.getLogger(__name__)

#: progress callback: (stage, done, total)
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class TrainReport:
    version: str
    head: str
    classes: list[str]
    n_train: int
    n_val: int
    val_accuracy: float | None
    fit_seconds: float
    embedded: int
    cached: int
    promoted: bool = True
    reason: str = ""
    #: local data vs the host's reference embeddings (:mod:`edgetl.domain`); None when the bundle has none
    domain: dict[str, Any] | None = None
    #: which features the head uses (last | multi) and why (``train(features="auto")`` decides on held-out data)
    features: dict[str, Any] | None = None


def _current_head_extractor(bundle: Bundle) -> tuple[str | None, str | None]:
    """(backend, precision) of the extractor the bundle's current head was trained on, when the bundle has it and its
    runtime is installed here; (None, None) otherwise (the profile decides)."""
    from edgetl.runtime import installed_backends

    state = DeviceState(bundle.state_dir)
    try:
        version = state.current()
        owner = state.meta(version).get("extractor") if version and version != BUNDLE_HEAD else None
    except StateError:
        return None, None
    entry = next((e for e in bundle.extractors() if e.file == owner), None)
    if entry is None or entry.format not in installed_backends():
        return None, None
    return entry.format, entry.precision


class DeviceRuntime:
    """Load and verify a bundle; embed, train a head, predict, evaluate.

    The extractor session is created on first use and reused for the life of the object.
    """

    def __init__(self, bundle: str | os.PathLike[str], backend: str | None = None, precision: str | None = None,
                 profile: str | None = None, threads: int | None = None, batch_size: int | None = None,
                 trust: str | os.PathLike[str] | None = None):
        # the profile (which may name a trusted key) is chosen from the manifest; then one full verification pass.
        # Heads belong to extractors: unless told otherwise, the device runs the extractor its current head was
        # trained on (when this bundle has it and its runtime is installed here)
        unverified = Bundle.load(bundle, verify=False)
        if backend is None and precision is None:
            backend, precision = _current_head_extractor(unverified)
        choice = choose(unverified, backend, precision, profile, threads)
        trust = trust if trust is not None else choice.profile.trust
        self.bundle = Bundle.load(bundle, trust=trust)
        if trust is not None:
            self._check_replay()
        self.profile = choice.profile
        self.entry = self.bundle.extractor(choice.entry.format, choice.entry.precision)  # from the verified manifest
        self.backend = self.entry.format
        self.precision = self.entry.precision
        self.threads = choice.threads
        self.providers = choice.providers
        # a memory budget (the profile's memory_budget_mb) sets the batch size and the runtime's arena settings
        self.memory = memory_settings(
            choice.profile.memory_budget_mb, self._input_size(), int(self.bundle.manifest["feature_dim"]),
            max_batch=batch_size or choice.profile.batch_size or 32) if self.bundle.modality == "image" else None
        self.batch_size = batch_size or (self.memory.batch_size if self.memory else None) or \
            choice.profile.batch_size or 32
        self.extractor_sha256 = self.bundle.sha256(self.entry.file)
        self._extractor: FeatureExtractor | None = None
        self._golden: dict[str, Any] = {}

    def _input_size(self) -> int:
        return int(self.bundle.manifest["preprocessing"]["input_size"])

    def _check_replay(self) -> None:
        """A signed bundle older than one this device already accepted is a replay: refuse it; else record it."""
        created = float(self.bundle.manifest.get("created_unix", 0.0))
        accepted_file = self.bundle.state_dir / "accepted.json"
        try:
            accepted = json.loads(accepted_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            accepted = {}
        newest = float(accepted.get("created_unix", 0.0))
        if created < newest:
            raise BundleError(f"bundle {self.bundle.path} is a signed manifest older than the one this device already "
                              f"accepted ({accepted.get('created')}); refusing a replayed bundle")
        if created > newest:
            try:
                atomic_write_json(accepted_file, {"created_unix": created, "created": self.bundle.manifest.get("created"),
                                                  "manifest_sha256": sha256_file(self.bundle.path / "manifest.json")})
            except OSError as exc:
                log.warning("could not record the accepted manifest (%s)", exc)

    # ------------------------------------------------------------------------------------------------------ embedding
    @property
    def extractor(self) -> FeatureExtractor:
        """The runtime session, created once; before first use it must reproduce the bundle's golden vectors."""
        if self._extractor is None:
            options: dict[str, Any] = {"providers": self.providers} if self.providers else {}
            if self.backend in ("onnx", "tflite") and self.memory is not None and self.memory.budget_mb is not None:
                options["memory"] = self.memory
            extractor = load_extractor(self.backend, self.bundle.file(self.entry.file), entry=self.entry.raw,
                                       threads=self.threads, modality=self.bundle.modality, **options)
            self._golden = self._check_golden(extractor)
            self._extractor = extractor
        return self._extractor

    @property
    def loader(self) -> Loader:
        """How this bundle's items (image files, text documents) become extractor inputs: chosen once from the
        bundle's modality (:func:`edgetl.modality.make_loader`)."""
        if "_loader" not in self.__dict__:
            self.__dict__["_loader"] = make_loader(self.bundle)
        return self.__dict__["_loader"]  # type: ignore[no-any-return]

    def embed_items(self, items: Sequence[Any], progress: Progress = _no_progress) -> npt.NDArray[np.float32]:
        """Items of this bundle's modality (image files; ``.txt`` files or :class:`edgetl.text.TextRecord`) →
        embeddings ``(N, D)``, in batches, without the store. ``progress("embed", done, total)`` after each batch."""
        out = np.empty((len(items), self.bundle.feature_dim), dtype=np.float32)
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            out[start:start + len(chunk)] = self.extractor.embed(self.loader.inputs(chunk))
            progress("embed", start + len(chunk), len(items))
        return out

    def embed_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Documents (strings) → embeddings ``(N, D)`` with a text bundle's tokenizer and encoder."""
        from edgetl.text import TextRecord

        return self.embed_items([TextRecord(t) for t in texts])

    def embed_arrays(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Preprocessed images ``(N, 3, S, S)`` (packed tokens ``(N, 2, L)`` for text) → embeddings ``(N, D)``."""
        return self.extractor.embed(batch)

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

    def embed_paths(self, paths: Sequence[Path], cache: bool = True,
                    progress: Progress = _no_progress) -> tuple[npt.NDArray[np.float32], int]:
        """Embed image files, reading cached embeddings from the store. Returns (embeddings (N, D), number cached)."""
        embeddings, _, cached = self._embed_keyed(paths, cache, progress)
        return embeddings, cached

    def _embed_keyed(self, paths: Sequence[Path], cache: bool = True, progress: Progress = _no_progress,
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
            chunk = self.memory.store_chunk if self.memory is not None else None
            hits = store.get_many(keys, chunk) if store is not None else [None] * len(keys)
            for i, hit in enumerate(hits):
                if hit is None or hit.shape != (self.bundle.feature_dim,):
                    todo.append(i)
                else:
                    out[i] = hit
            del hits
            cached = len(paths) - len(todo)
            progress("embed", cached, len(paths))
            done = cached
            for chunk in batches(todo, self.batch_size):
                emb = self.embed_items([paths[i] for i in chunk])
                for j, i in enumerate(chunk):
                    out[i] = emb[j]
                    if store is not None:
                        store.put(keys[i], emb[j])
                done += len(chunk)
                progress("embed", done, len(paths))
            if store is not None:
                try:
                    store.save()
                except StateError as exc:
                    if writer:
                        raise
                    log.warning("embedding cache not saved (%s); embeddings will be recomputed next time", exc)
        finally:
            if store is not None:
                store.close()
        return out, np.array(keys, dtype="U64"), cached

    def _open_store(self, writer: bool = True) -> EmbeddingStore | None:
        """This extractor's embedding store; for a reader, None (with a warning) when it cannot be opened."""
        try:
            return EmbeddingStore(self.bundle.state_dir / "store", self.extractor_sha256)
        except StateError as exc:
            if writer:
                raise
            log.warning("embedding cache unavailable (%s); embedding without it", exc)
            return None

    # ---------------------------------------------------------------------------------------------------- head state
    @property
    def state(self) -> DeviceState:
        return DeviceState(self.bundle.state_dir)

    def current_version(self) -> str | None:
        """The name of the current head version, ``"bundle"`` for the host's initial head, or None."""
        return self.state.current() or (BUNDLE_HEAD if self.bundle.manifest.get("head") else None)

    def _log(self, action: str, **fields: Any) -> None:
        """An audit entry; every one names the extractor of the change (and its reason, where the caller gives one)."""
        self.state.log(action, extractor=self.entry.file, **fields)

    def _current_head_owner(self) -> str | None:
        """The extractor file the current head was trained on (None: no head, or the bundle's initial head, which
        belongs to every FP32-faithful graph of the bundle)."""
        version = self.current_version()
        if version is None or version == BUNDLE_HEAD:
            return None
        try:
            return self.state.meta(version).get("extractor")
        except StateError:
            return None

    def _load_version(self, version: str) -> tuple[Head, list[str]]:
        if version == BUNDLE_HEAD:
            if not self.bundle.manifest.get("head"):
                raise StateError(f"bundle {self.bundle.path} packs no initial head")
            return load_head(self.bundle.file(self.bundle.manifest["head"]["file"])), self.bundle.labels
        meta = self.state.meta(version)
        if meta.get("extractor_sha256") != self.extractor_sha256:
            owner = next((e for e in self.bundle.extractors() if e.file == meta.get("extractor")), None)
            use = f"run with --backend {owner.format} --precision {owner.precision} (the extractor it was trained " \
                  f"on), " if owner is not None else ""
            raise StateError(f"head {version} was trained for {meta.get('extractor', 'another extractor')}, not "
                             f"{self.entry.file} (in use here); {use}roll back to a head of this extractor "
                             f"(edgetl device history {self.bundle.path}), or train one for it: edgetl device train "
                             f"{self.bundle.path} --data DIR --backend {self.backend} --precision {self.precision}")
        return load_head(self.state.head_file(version)), list(meta["classes"])

    def load_current_head(self) -> tuple[Head, list[str], str]:
        """(head, class names, version) of the current head; raises :class:`NotFittedError` when there is none."""
        version = self.current_version()
        if version is None:
            raise NotFittedError(f"bundle {self.bundle.path} has no head yet; train one: "
                                 f"edgetl device train {self.bundle.path} --data DIR")
        head, labels = self._load_version(version)
        return head, labels, version

    def history(self) -> list[dict[str, Any]]:
        """Every head version, oldest first, with its status (current / candidate / previous) and metrics."""
        current = self.current_version()
        rows = []
        if self.bundle.manifest.get("head"):
            rows.append({"version": BUNDLE_HEAD, "status": "current" if current == BUNDLE_HEAD else "previous",
                         "head": self.bundle.manifest["head"]["kind"], "classes": self.bundle.labels,
                         "metrics": {}, "created": self.bundle.manifest.get("created")})
        for version in self.state.versions():
            meta = self.state.meta(version)
            status = "current" if version == current else meta.get("status", "previous")
            rows.append({"version": version, "status": status, "head": meta.get("head"), "classes": meta["classes"],
                         "metrics": meta.get("metrics", {}), "created": meta.get("created"),
                         "extractor": meta.get("extractor"), "extractor_sha256": meta.get("extractor_sha256"),
                         "reason": meta.get("reason")})
        return rows

    def rollback(self, to: str | None = None, wait: float = 0.0, reason: str | None = None) -> str:
        """Make ``to`` (default: the version that was current before the current one) current again. ``reason``
        replaces the default reason recorded in the audit log (e.g. an operator promoting a candidate)."""
        to_given = to is not None
        with self.state.writer(wait):
            current = self.current_version()
            if to is None:
                promoted = [e["version"] for e in self.state.audit() if e["action"] in ("promote", "rollback")]
                earlier = [v for v in reversed(promoted) if v != current]
                if not earlier and current != BUNDLE_HEAD and self.bundle.manifest.get("head"):
                    earlier = [BUNDLE_HEAD]
                if not earlier:
                    raise StateError(f"no earlier head to roll back to (current: {current}); see `edgetl device "
                                     "history`")
                to = earlier[0]
            self._load_version(to)  # exists, is readable and fits this extractor
            self.state.set_current(to)
            self._log("rollback", version=to, previous=current,
                      reason=reason or ("--to given" if to_given else "back to the version current before"))
        return to

    # ------------------------------------------------------------------------------------------------------ training
    def train(self, data: str | os.PathLike[str] | ImageFolder, head: str = "softmax", val_split: float = 0.2,
              seed: int = 0, tolerance: float = 0.02, force: bool = False, wait: float = 0.0,
              shots: int | None = None, incremental: bool = False, budget: int | None = None,
              features: str = "last", progress: Progress = _no_progress, **head_params: Any) -> TrainReport:
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
        self._check_train_request(head, features, incremental)  # everything the manifest/state can refuse, first
        folder = data if isinstance(data, ImageFolder) else self.loader.scan(data)
        if shots is not None:
            folder = _take_shots(folder, shots, seed)
        with self.state.writer(wait):
            embeddings, keys, cached = self._embed_keyed(folder.paths, progress=progress, writer=True)
            data_set = embeddings, keys, folder.labels, list(folder.classes)
            n_old, seen = 0, {}
            if incremental:
                current = self._training_set()
                data_set = _merge(current, data_set)
                n_old = len(data_set[0]) - len(embeddings)
                budget, seen = self._budget_state(budget)
            *data_set, retention = _retain(data_set, n_old, budget, seen, seed)
            kind, params, choice = self._features_head(features, head, head_params, data_set[0], data_set[2],
                                                       val_split, seed)
            report = self._fit_version(*data_set, kind, val_split, seed, tolerance, force, params,
                                       source=str(folder.root), retention=retention)
        return replace(report, embedded=len(folder) - cached, cached=cached, domain=self.domain_check(embeddings),
                       features=choice)

    def _check_train_request(self, head: str, features: str, incremental: bool) -> None:
        """Refuse, before any image is embedded, what the manifest and the state already rule out."""
        from edgetl.heads import HEADS

        if head not in HEADS:
            raise DataError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
        if features not in ("last", "multi", "auto"):
            raise DataError(f"unknown features {features!r}; use last, multi or auto")
        if features != "last" and self.bundle.feature_groups is None:
            raise DataError(f"bundle {self.bundle.path} has last-layer features only; re-export it with "
                            "`edgetl export … --features multi` for multi-depth heads")
        if incremental:
            version = self.current_version()
            if version is None or version == BUNDLE_HEAD:
                raise NotFittedError(f"--incremental adds to the current head's training set, but no head was "
                                     f"trained on this device yet; run `edgetl device train {self.bundle.path} --data "
                                     "DIR` first")
            self._load_version(version)  # the current head must belong to this extractor

    def _features_head(self, features: str, head: str, params: dict[str, Any], X: np.ndarray, y: np.ndarray,
                       val_split: float, seed: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """(head kind, its parameters, {"features": chosen, "reason": why}) for ``features`` = last | multi | auto."""
        groups = self.bundle.feature_groups
        if features not in ("last", "multi", "auto"):
            raise DataError(f"unknown features {features!r}; use last, multi or auto")
        if groups is None:
            if features != "last":
                raise DataError(f"bundle {self.bundle.path} has last-layer features only; re-export it with "
                                "`edgetl export … --features multi` for multi-depth heads")
            return head, params, {"features": "last", "reason": "last-layer extractor"}
        spans = [[g["offset"], g["size"]] for g in groups]
        options = {"last": ("depth", {"inner": head, "groups": spans[:1], "normalise": False, "keep": 0,
                                      "inner_params": params}),
                   "multi": ("depth", {"inner": head, "groups": spans, "inner_params": params})}
        if features != "auto":
            return (*options[features], {"features": features, "reason": "asked for"})
        train_idx, val_idx = stratified_split(y, val_split or 0.2, seed)
        if len(val_idx) == 0 or len(np.unique(y[train_idx])) < 2:
            return (*options["last"], {"features": "last", "reason": "too few images to compare on held-out data"})
        scores = {}
        for name, (kind, p) in options.items():
            model = make_head(kind, seed=seed, **p).fit(X[train_idx], y[train_idx])
            scores[name] = float((model.predict(X[val_idx]) == y[val_idx]).mean())
        best = "multi" if scores["multi"] > scores["last"] else "last"
        tie = "; a tie goes to the simpler last-layer head" if scores["multi"] == scores["last"] else ""
        reason = (f"held-out accuracy {scores['multi']:.3f} with every depth vs {scores['last']:.3f} with the last "
                  f"layer on {len(val_idx)} images{tie}")
        return (*options[best], {"features": best, "reason": reason, "held_out_accuracy": scores})

    def add_class(self, name: str, data: str | os.PathLike[str], wait: float = 0.0, force: bool = False,
                  progress: Progress = _no_progress) -> TrainReport:
        """Add class ``name`` from the images in ``data`` (a flat folder, or an ImageFolder's sub-folder) to the
        current head's classes; the other classes keep their stored training embeddings (nothing is forgotten)."""
        root = Path(data)
        paths = self.loader.list(root)
        if not paths:
            raise DataError(f"{root} holds no images for class {name!r}; pass a folder of that class's images")
        with self.state.writer(wait):
            X, keys, y, classes = self._training_set()
            if name in classes:
                raise DataError(f"class {name!r} exists already; add images with `edgetl device train … --incremental`")
            emb, new_keys, _ = self._embed_keyed(paths, progress=progress, writer=True)
            merged = _merge((X, keys, y, classes), (emb, new_keys, np.zeros(len(paths), np.int64), [name]))
            *merged, retention = _retain(merged, len(merged[0]) - len(emb), *self._budget_state(None), 0)
            kind, params = self._current_head_spec()
            return self._fit_version(*merged, kind, 0.2, 0, 0.0, force, params, source=f"add-class {name} from {root}",
                                     retention=retention)

    def remove_class(self, name: str, wait: float = 0.0) -> TrainReport:
        """A new version without class ``name`` (its stored embeddings are left out of the refit)."""
        with self.state.writer(wait):
            X, keys, y, classes = self._training_set()
            if name not in classes:
                raise DataError(f"class {name!r} is not in the current head; classes: {', '.join(classes)}")
            keep = y != classes.index(name)
            remaining = [c for c in classes if c != name]
            remap = np.array([remaining.index(c) if c != name else -1 for c in classes])
            kept = X[keep], keys[keep], remap[y[keep]], remaining
            *kept, retention = _retain(kept, len(kept[0]), *self._budget_state(None), 0)
            kind, params = self._current_head_spec()
            return self._fit_version(*kept, kind, 0.2, 0, 0.0, False, params, source=f"remove-class {name}",
                                     retention=retention)

    def rename_class(self, old: str, new: str, wait: float = 0.0) -> str:
        """A new version identical to the current one but with class ``old`` called ``new``."""
        with self.state.writer(wait):
            version = self.current_version()
            if version is None or version == BUNDLE_HEAD:
                raise NotFittedError("rename-class needs a head trained on the device; run `edgetl device train`")
            head, classes = self._load_version(version)
            if old not in classes or new in classes:
                raise DataError(f"cannot rename {old!r} to {new!r}; classes: {', '.join(classes)}")
            meta = self.state.meta(version)
            classes = [new if c == old else c for c in classes]
            kept = {k: meta.get(k) for k in ("metrics", "extractor_sha256", "extractor", "temperature", "retention",
                                             "head_params")}
            if kept["retention"]:
                kept["retention"] = {**kept["retention"], "seen": {new if c == old else c: n for c, n in
                                                                   kept["retention"]["seen"].items()}}
            renamed = self.state.write_version(head, kept | {"classes": classes, "status": "promoted",
                                                             "reason": f"renamed {old} to {new}"},
                                               train_keys=self.state.train_keys(version),
                                               train_labels=self.state.train_labels(version),
                                               novelty=self.novelty_model(version))
            self.state.set_current(renamed)
            self._log("promote", version=renamed, previous=version, reason=f"renamed {old} to {new}")
        return renamed

    def domain_check(self, embeddings: npt.NDArray[np.float32]) -> dict[str, Any] | None:
        """Compare local embeddings ``(N, D)`` with the host's reference embeddings of this extractor: is a head update
        enough, or is the backbone a poor fit for this domain? None when the bundle carries no reference."""
        reference = self.bundle.reference(self.entry)
        if reference is None or len(embeddings) == 0:
            return None
        return DomainReference(reference).compare(embeddings)

    def store_info(self) -> dict[str, Any]:
        """Embedding files (one per extractor) and the current head's training images per class."""
        folder = self.bundle.state_dir / "store"
        files = []
        in_use = store_path(folder, self.extractor_sha256).name
        for path in sorted([*folder.glob(f"*{STORE_SUFFIX}"), *folder.glob("*.npz")]) if folder.is_dir() else []:
            if path.suffix == ".npz" and path.with_suffix(STORE_SUFFIX).exists():
                continue  # a legacy file that another process is migrating right now
            with EmbeddingStore(folder, path.stem) as store:  # opening migrates a legacy .npz store
                files.append({"file": store.path.name, "embeddings": len(store), "bytes": store.file_bytes(),
                              "in_use": store.path.name == in_use})
        per_class: dict[str, int] = {}
        version = self.current_version()
        if version and version != BUNDLE_HEAD and self.state.train_labels(version) is not None:
            classes = self.state.meta(version)["classes"]
            counts = np.bincount(self.state.train_labels(version), minlength=len(classes))
            per_class = {c: int(n) for c, n in zip(classes, counts)}
        budget, seen = self._budget_state(None)
        return {"files": files, "current_head": version, "current_head_classes": per_class, "budget": budget,
                "seen": seen}

    def _prune_store(self) -> None:
        """Drop stored embeddings that no head version trained on (what a per-class budget let go)."""
        referenced: set[str] = set()
        for version in self.state.versions():
            keys = self.state.train_keys(version)
            referenced.update(str(k) for k in (keys if keys is not None else ()))
        try:
            with EmbeddingStore(self.bundle.state_dir / "store", self.extractor_sha256) as store:
                dropped = store.retain(referenced)
        except StateError as exc:
            log.warning("embedding store not pruned (%s)", exc)
            return
        if dropped:
            log.info("dropped %d stored embeddings that no head version trained on", dropped)

    def _training_set(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """The current head's training embeddings from the store: (X (N, D), keys, labels, classes)."""
        version = self.current_version()
        if version is None or version == BUNDLE_HEAD:
            raise NotFittedError(f"no head trained on this device yet; run `edgetl device train {self.bundle.path} "
                                 "--data DIR` first")
        keys, labels = self.state.train_keys(version), self.state.train_labels(version)
        if keys is None or labels is None:
            raise StateError(f"head {version} does not record its training images; retrain it with `device train`")
        with EmbeddingStore(self.bundle.state_dir / "store", self.extractor_sha256) as store:
            rows = store.get_many((str(k) for k in keys), self.memory.store_chunk if self.memory else None)
        missing = sum(r is None for r in rows)
        if missing:
            raise StateError(f"{missing} training embeddings of head {version} are missing from the store; retrain "
                             "it with `device train` on its images")
        X = np.stack(rows) if rows else np.zeros((0, self.bundle.feature_dim), np.float32)
        return X, keys, labels, list(self.state.meta(version)["classes"])

    def _current_head_spec(self) -> tuple[str, dict[str, Any]]:
        """Kind and parameters of the current head (refits after adding or removing a class keep them)."""
        meta = self.state.meta(self.current_version() or "")
        return meta.get("head", "softmax"), dict(meta.get("head_params") or {})

    def _budget_state(self, budget: int | None) -> tuple[int | None, dict[str, int]]:
        """(per-class budget, images seen per class) of the current head; an explicit ``budget`` wins."""
        version = self.current_version()
        meta = self.state.meta(version) if version and version != BUNDLE_HEAD else {}
        retention = meta.get("retention") or {}
        return budget or retention.get("budget"), dict(retention.get("seen", {}))

    def _fit_version(self, X: np.ndarray, keys: np.ndarray, y: np.ndarray, classes: list[str], head: str,
                     val_split: float, seed: int, tolerance: float, force: bool, head_params: dict[str, Any],
                     source: str, retention: dict[str, Any] | None = None) -> TrainReport:
        """Fit, gate and write one version (the writer lock is held by the caller)."""
        train_idx, val_idx = stratified_split(y, val_split, seed)
        if len(np.unique(y[train_idx])) < 2:
            raise DataError(f"{source}: too few images of at least two classes to train after holding out "
                            f"{val_split:.0%}; add images")
        model = make_head(head, seed=seed, **head_params)
        start = time.perf_counter()
        model.fit(X[train_idx], y[train_idx])
        fit_seconds = time.perf_counter() - start
        val_acc = float((model.predict(X[val_idx]) == y[val_idx]).mean()) if len(val_idx) else None
        temperature = fit_temperature(model.decision_function(X[val_idx]), y[val_idx]) \
            if len(val_idx) and head != "knn" else None
        novelty = Novelty.fit(X[train_idx], y[train_idx], X[val_idx])
        promote, reason, current_acc = self._gate(classes, model, X[val_idx], y[val_idx], keys[val_idx], val_acc,
                                                  tolerance, force)
        if len(val_idx):
            # the held-out part served its purpose; the kept head learns from every image
            model = make_head(head, seed=seed, **head_params).fit(X, y)
        metrics = {"val_accuracy": val_acc, "current_val_accuracy": current_acc, "n_train": int(len(train_idx)),
                   "n_val": int(len(val_idx)), "fit_seconds": round(fit_seconds, 4), "data": source}
        l2 = getattr(getattr(model, "head_", model), "l2_", None)  # a softmax head's L2 (cross-validated by default)
        if l2 is not None:
            metrics["l2"] = float(l2)
        previous = self.current_version()
        version = self.state.write_version(model, {"classes": classes, "metrics": metrics,
                                                   "extractor_sha256": self.extractor_sha256,
                                                   "extractor": self.entry.file, "temperature": temperature,
                                                   "status": "promoted" if promote else "candidate",
                                                   "reason": reason, "retention": retention,
                                                   "head_params": head_params},
                                           train_keys=keys, train_labels=y, novelty=novelty)
        if retention and retention.get("budget"):
            self._prune_store()
        if promote:
            self.state.set_current(version)
        self._log("promote" if promote else "candidate", version=version, previous=previous,
                  val_accuracy=val_acc, current_val_accuracy=current_acc, reason=reason)
        return TrainReport(version, head, classes, int(len(train_idx)), int(len(val_idx)), val_acc, fit_seconds,
                           0, 0, promote, reason)

    def _gate(self, classes: Sequence[str], new: Head, X_val: np.ndarray, y_val: np.ndarray, val_keys: np.ndarray,
              new_acc: float | None, tolerance: float, force: bool) -> tuple[bool, str, float | None]:
        """(promote?, why, current head's accuracy). Both heads are compared on held-out images the current head was
        not trained on; when too few such images exist, the new accuracy is compared with the current head's own
        recorded held-out accuracy."""
        if force:
            return True, "promoted with --force", None
        owner = self._current_head_owner()
        if owner is not None and owner != self.entry.file:
            return False, (f"the current head {self.current_version()} belongs to {owner}, this head to "
                           f"{self.entry.file}; kept as a candidate (to switch the device to this extractor, make "
                           f"it current with `edgetl device rollback {self.bundle.path} --to <this version> --backend "
                           f"{self.backend} --precision {self.precision}`, or train with --force)"), None
        try:
            head, labels, version = self.load_current_head()
        except (NotFittedError, StateError):
            return True, "no usable current head", None
        if list(labels) != list(classes):
            return True, f"classes differ from the current head {version}", None
        if new_acc is None or not len(y_val):
            return True, "no held-out images to compare on (--val-split 0)", None
        seen = self.state.train_keys(version) if version != BUNDLE_HEAD else None
        unseen = ~np.isin(val_keys, seen) if seen is not None else np.ones(len(y_val), dtype=bool)
        if unseen.sum() >= 10:
            current_acc = float((head.predict(X_val[unseen]) == y_val[unseen]).mean())
            new_acc = float((new.predict(X_val[unseen]) == y_val[unseen]).mean())
            basis = f"on {int(unseen.sum())} held-out images neither head trained on"
        else:
            recorded = self.state.meta(version).get("metrics", {}).get("val_accuracy")
            if recorded is None:
                return True, f"current head {version} has no held-out accuracy to compare with", None
            current_acc, basis = float(recorded), "(the current head's own held-out accuracy, recorded at training)"
        if new_acc < current_acc - tolerance:
            return False, (f"held-out accuracy {new_acc:.3f} is worse than the current head {version}'s "
                           f"{current_acc:.3f} {basis} by more than {tolerance:.3f}; kept as a candidate (--force "
                           "promotes it)"), current_acc
        return True, f"held-out accuracy {new_acc:.3f} vs current {version} {current_acc:.3f} {basis}", current_acc

    # ---------------------------------------------------------------------------------------------------- inference
    def predict(self, paths: Sequence[str | os.PathLike[str]], top_k: int = 1,
                progress: Progress = _no_progress) -> list[dict[str, Any]]:
        """Top-k classes with calibrated probabilities for each image file, and whether it looks unlike every known
        class (``unknown``: its novelty score exceeds the threshold set on held-out local data)."""
        head, labels, version = self.load_current_head()
        X = self.embed_items(list(paths), progress=progress)
        meta = self.state.meta(version) if version != BUNDLE_HEAD else {}
        temperature = meta.get("temperature")
        proba = calibrated_proba(head, X, temperature)
        novelty = self.novelty_model(version)
        scores = novelty.score(X) if novelty is not None else None
        k = max(1, min(top_k, len(labels)))
        results = []
        for i, (path, row) in enumerate(zip(paths, proba)):
            order = np.argsort(-row)[:k]
            result = {"path": str(path), "label": labels[order[0]], "probability": float(row[order[0]]),
                      "top_k": [{"label": labels[j], "probability": float(row[j])} for j in order],
                      "head_version": version, "calibrated": bool(temperature)}
            if scores is not None and novelty is not None:
                result |= {"novelty": float(scores[i]), "unknown": bool(scores[i] > novelty.threshold)}
            results.append(result)
        return results

    def novelty_model(self, version: str) -> Novelty | None:
        """The novelty model head ``version`` was trained with (None for the bundle's head or without one)."""
        path = self.state.heads / version / "novelty.npz"
        if version == BUNDLE_HEAD or not path.is_file():
            return None
        try:
            return Novelty.load(path)
        except (OSError, ValueError, KeyError) as exc:
            raise StateError(f"{path} is unreadable ({exc}); roll back or retrain") from exc

    def drift(self, data: str | os.PathLike[str], progress: Progress = _no_progress) -> dict[str, Any]:
        """Compare a folder of images (any layout) with what the current head was trained on."""
        version = self.current_version()
        novelty = self.novelty_model(version) if version else None
        if novelty is None:
            raise NotFittedError("drift needs a head trained on this device (it compares with its training data); "
                                 f"run `edgetl device train {self.bundle.path} --data DIR`")
        root = Path(data)
        paths = self.loader.list(root)
        if not paths:
            raise DataError(f"{root} holds no images to compare")
        scores = novelty.score(self.embed_paths(paths, progress=progress)[0])
        score = float(np.median(scores))
        return {"score": score, "threshold": novelty.threshold, "drifted": score > novelty.threshold,
                "n": len(paths), "unknown_fraction": float((scores > novelty.threshold).mean()),
                "head_version": version}

    def evaluate(self, data: str | os.PathLike[str], progress: Progress = _no_progress) -> dict[str, Any]:
        """Accuracy of the current head on a labelled ImageFolder whose class names the head knows."""
        head, labels, version = self.load_current_head()
        folder = self.loader.scan(data, min_classes=1)
        unknown = sorted(set(folder.classes) - set(labels))
        if unknown:
            raise DataError(f"{folder.root} has classes the head does not know: {', '.join(unknown)}; "
                            f"known: {', '.join(labels)}")
        to_head = np.array([labels.index(c) for c in folder.classes])
        truth = to_head[folder.labels]
        embeddings, _ = self.embed_paths(folder.paths, progress=progress)
        pred = head.predict(embeddings)
        present = sorted(set(truth.tolist()) | set(pred.tolist()))  # classes in the data or predicted
        index = np.searchsorted(present, truth), np.searchsorted(present, pred)
        result = classification_metrics(*index, [labels[c] for c in present])
        return result | {"n": int(len(truth)), "head_version": version, "data": str(folder.root)}

    def verify(self) -> dict[str, Any]:
        """Every check: schema and every file's sha256 (done when the bundle was loaded), the signature when a trusted
        key was given, and the golden vectors run through this device's runtime. Returns the measured error."""
        self.extractor  # noqa: B018 - creating the session runs the golden check
        return self._golden

    def _check_golden(self, extractor: FeatureExtractor) -> dict[str, Any]:
        golden = self.bundle.golden(self.entry)
        if golden is None:
            return {"golden": "absent"}
        inputs, expected, tolerance = golden
        from edgetl.metrics import compare_embeddings

        spec = self.entry.raw["golden"]
        compared_to = "the FP32 reference" if spec.get("compare_to", spec["key"]) == "pytorch" else \
            "the host's output of this graph"

        try:
            report = compare_embeddings(expected, extractor.embed(inputs))
        except DataError as exc:
            raise BundleError(f"golden vectors of {self.entry.file} do not fit its graph ({exc}); re-export the bundle") \
                from exc
        if report["max_abs_diff"] > tolerance.get("max_abs", np.inf) or report["min_cosine"] < tolerance["min_cosine"]:
            raise BundleError(f"golden vectors fail for {self.entry.file} on this device's {self.backend} runtime: max "
                              f"abs diff {report['max_abs_diff']:.2e}, min cosine {report['min_cosine']:.6f} to "
                              f"{compared_to} (limits {tolerance}); the runtime or the extractor file is wrong for this "
                              "bundle")
        return {"golden": "ok", "n": int(len(inputs)), "extractor": self.entry.file, "compared_to": compared_to} | \
            report

    def info(self) -> dict[str, Any]:
        m = self.bundle.manifest
        version = self.current_version()
        current: dict[str, Any] | None = None
        if version and version != BUNDLE_HEAD:
            current = self.state.meta(version)
        return {"bundle": str(self.bundle.path), "schema_version": m["schema_version"], "profile": self.profile.id,
                "selected": {"file": self.entry.file, "backend": self.backend, "precision": self.precision,
                             "threads": self.threads},
                "edgetl_version": m.get("edgetl_version"), "backbone": m["backbone"], "feature_dim": m["feature_dim"],
                "preprocessing": m["preprocessing"], "extractors": m["extractors"], "labels": m.get("labels"),
                "current_head": version, "current_head_meta": current}

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
        if extractor_sha256 is not None and extractor_sha256 != self.extractor_sha256:
            raise BundleError(f"head {head_file} was built for extractor {extractor_sha256[:12]}…, this device runs "
                              f"{self.entry.file} ({self.extractor_sha256[:12]}…); install the fleet's bundle first")
        model = load_head(head_file)
        labels = [str(c) for c in labels]
        try:
            n_classes = model.decision_function(np.zeros((1, self.bundle.feature_dim), np.float32)).shape[1]
        except DataError as exc:
            raise DataError(f"head {head_file} does not fit this bundle's extractor ({exc})") from exc
        if n_classes != len(labels) or len(set(labels)) != len(labels):
            raise DataError(f"head {head_file} scores {n_classes} classes but {len(labels)} distinct labels were given; "
                            "pass the labels.json written with the head")
        with self.state.writer(wait):
            try:
                X, keys, y, classes = self._training_set()
            except (NotFittedError, StateError):
                X, keys, y, classes = (np.zeros((0, self.bundle.feature_dim), np.float32), np.zeros(0, "U64"),
                                       np.zeros(0, np.int64), [])
            to_new = np.array([labels.index(c) if c in labels else -1 for c in classes], dtype=np.int64)
            y_new = to_new[y] if len(y) else y
            keep = y_new >= 0
            X, keys, y_new = X[keep], keys[keep], y_new[keep]
            acc = float((model.predict(X) == y_new).mean()) if len(y_new) else None
            promote, reason, current_acc = self._gate(labels, model, X, y_new, keys, acc, tolerance, force)
            novelty = Novelty.fit(X, y_new, X) if len(np.unique(y_new)) >= 2 else None
            # not a held-out accuracy (the fleet head learned from these images too): recorded apart, so that later
            # gates do not compare against it as if it were one
            metrics = {"val_accuracy": None, "local_accuracy": acc, "current_val_accuracy": current_acc, "n_train": 0,
                       "n_val": 0, "fit_seconds": 0.0, "data": source,
                       "accuracy_basis": "this device's stored training embeddings, which the adopted head also "
                                         "learned from"}
            previous = self.current_version()
            version = self.state.write_version(model, {"classes": labels, "metrics": metrics,
                                                       "extractor_sha256": self.extractor_sha256,
                                                       "extractor": self.entry.file, "temperature": None,
                                                       "status": "promoted" if promote else "candidate",
                                                       "reason": reason, "source": source},
                                               train_keys=keys, train_labels=y_new, novelty=novelty)
            if promote:
                self.state.set_current(version)
            self._log("promote" if promote else "candidate", version=version, previous=previous,
                      val_accuracy=acc, current_val_accuracy=current_acc, reason=reason, source=source)
        return TrainReport(version, model.kind, labels, 0, int(len(y_new)), acc, 0.0, 0, 0, promote, reason)


def _take_shots(folder: ImageFolder, shots: int, seed: int) -> ImageFolder:
    """At most ``shots`` images of each class, drawn with ``seed``."""
    if shots < 1:
        raise DataError(f"--shots must be at least 1, found {shots}")
    rng = np.random.default_rng(seed)
    labels = folder.labels
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)])
    return folder.subset(np.sort(keep))


def _retain(data: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]], n_old: int, budget: int | None,
            seen: dict[str, int], seed: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """Apply a per-class budget (reservoir sampling; rows before ``n_old`` are the current reservoir) to a labelled
    embedding set; returns it with the retention record kept in the version's meta (budget, images seen per class)."""
    X, keys, y, classes = data
    if not budget:
        counts = np.bincount(y, minlength=len(classes))
        return X, keys, y, classes, {"budget": None, "seen": {c: int(n) for c, n in zip(classes, counts)}}
    keep, counts = reservoir(y, n_old, budget, {classes.index(c): n for c, n in seen.items() if c in classes}, seed)
    return X[keep], keys[keep], y[keep], classes, {"budget": int(budget),
                                                   "seen": {classes[c]: int(n) for c, n in sorted(counts.items())}}


def _merge(old: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]],
           new: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Union of two labelled embedding sets, classes matched by name (new names appended, sorted order kept for the
    old ones); an image (content hash) present in both keeps the new label."""
    X0, k0, y0, c0 = old
    X1, k1, y1, c1 = new
    classes = list(c0) + [c for c in c1 if c not in c0]
    y1 = np.array([classes.index(c1[i]) for i in y1], dtype=np.int64)
    fresh = ~np.isin(k0, k1)
    return (np.concatenate([X0[fresh], X1]), np.concatenate([k0[fresh], k1]),
            np.concatenate([y0[fresh], y1]).astype(np.int64), classes)


__all__ = ["DeviceRuntime", "TrainReport"]
