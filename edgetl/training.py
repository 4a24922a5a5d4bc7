"""The training part of a device (:class:`edgetl.device.DeviceRuntime`): :class:`Trainer` fits heads on stored
embeddings, edits classes, adopts heads trained elsewhere, and passes every new head through the promote gate and
:meth:`Trainer.commit_version` — the one write / set-current / audit sequence. Every change holds the writer lock.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.bundle import ExtractorEntry
from edgetl.data import ImageFolder, stratified_split
from edgetl.embedding import Embedder, Progress, no_progress
from edgetl.errors import BundleError, DataError, NotFittedError, StateError
from edgetl.heads import Head, load_head, make_head
from edgetl.labelled import LabelledEmbeddings
from edgetl.novelty import Novelty, fit_temperature
from edgetl.state import BUNDLE_HEAD
from edgetl.versions import VersionHistory

#: embed keyed items: (paths, progress=, writer=) -> (embeddings (N, D), content hashes (N,), number from the store)
EmbedKeyed = Callable[..., tuple[np.ndarray, np.ndarray, int]]
FEATURES = ("last", "multi", "auto")


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


@dataclass(frozen=True)
class Gate:
    """The promote gate's verdict on a new head: promote it or keep it as a candidate, why, and the current head's
    accuracy it was compared with (None when there was no comparison)."""

    promote: bool
    reason: str
    current_accuracy: float | None = None


def take_shots(folder: ImageFolder, shots: int, seed: int) -> ImageFolder:
    """At most ``shots`` images of each class, drawn with ``seed``."""
    if shots < 1:
        raise DataError(f"--shots must be at least 1, found {shots}")
    rng = np.random.default_rng(seed)
    labels = folder.labels
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)])
    return folder.subset(np.sort(keep))


class PromoteGate:
    """Whether a new head of the extractor ``entry`` replaces the current head of ``versions`` or is kept as a
    candidate: the device never silently gets worse."""

    def __init__(self, versions: VersionHistory, entry: ExtractorEntry):
        self.versions, self.entry = versions, entry

    def decide(self, classes: Sequence[str], new: Head, held_out: LabelledEmbeddings, new_acc: float | None,
             tolerance: float, force: bool) -> Gate:
        """Promote ``new`` or keep it as a candidate. Both heads are compared on ``held_out`` images the current head
        was not trained on; when too few such images exist, the new accuracy is compared with the current head's own
        recorded held-out accuracy."""
        if force:
            return Gate(True, "promoted with --force")
        owner, entry, path = self.versions.current_owner(), self.entry, self.versions.bundle.path
        if owner is not None and owner != entry.file:
            return Gate(False, f"the current head {self.versions.current_version()} belongs to {owner}, this head to "
                               f"{entry.file}; kept as a candidate (to switch the device to this extractor, make it "
                               f"current with `edgetl device rollback {path} --to <this version> --backend "
                               f"{entry.format} --precision {entry.precision}`, or train with --force)")
        try:
            head, labels, version = self.versions.load_current()
        except (NotFittedError, StateError):
            return Gate(True, "no usable current head")
        if list(labels) != list(classes):
            return Gate(True, f"classes differ from the current head {version}")
        if new_acc is None or not len(held_out.y):
            return Gate(True, "no held-out images to compare on (--val-split 0)")
        return self._compare(version, head, new, held_out, new_acc, tolerance)

    def _compare(self, version: str, head: Head, new: Head, held_out: LabelledEmbeddings, new_acc: float,
                 tolerance: float) -> Gate:
        X_val, y_val = held_out.X, held_out.y
        seen = self.versions.state.train_keys(version) if version != BUNDLE_HEAD else None
        unseen = ~np.isin(held_out.keys, seen) if seen is not None else np.ones(len(y_val), dtype=bool)
        if unseen.sum() >= 10:
            current_acc = float((head.predict(X_val[unseen]) == y_val[unseen]).mean())
            new_acc = float((new.predict(X_val[unseen]) == y_val[unseen]).mean())
            basis = f"on {int(unseen.sum())} held-out images neither head trained on"
        else:
            recorded = self.versions.state.meta(version).get("metrics", {}).get("val_accuracy")
            if recorded is None:
                return Gate(True, f"current head {version} has no held-out accuracy to compare with")
            current_acc, basis = float(recorded), "(the current head's own held-out accuracy, recorded at training)"
        if new_acc < current_acc - tolerance:
            return Gate(False, f"held-out accuracy {new_acc:.3f} is worse than the current head {version}'s "
                               f"{current_acc:.3f} {basis} by more than {tolerance:.3f}; kept as a candidate (--force "
                               "promotes it)", current_acc)
        return Gate(True, f"held-out accuracy {new_acc:.3f} vs current {version} {current_acc:.3f} {basis}",
                    current_acc)


class Trainer:
    """Heads for one extractor (``embedder``) written as versions of ``versions``."""

    def __init__(self, embedder: Embedder, versions: VersionHistory):
        self.embedder, self.versions = embedder, versions
        self.gate = PromoteGate(versions, embedder.entry)

    @property
    def _path(self) -> Path:
        return self.versions.bundle.path

    # ---------------------------------------------------------------------------------------------------- training
    def train(self, data: str | os.PathLike[str] | ImageFolder, head: str = "softmax", val_split: float = 0.2,
              seed: int = 0, tolerance: float = 0.02, force: bool = False, wait: float = 0.0,
              shots: int | None = None, incremental: bool = False, budget: int | None = None,
              features: str = "last", progress: Progress = no_progress, embed: EmbedKeyed | None = None,
              **head_params: Any) -> TrainReport:
        """See :meth:`edgetl.device.DeviceRuntime.train`. ``embed``: how the images are embedded (default: through
        the embedding store, :meth:`Embedder.embed_keyed`)."""
        self._check_request(head, features, incremental)  # everything the manifest/state can refuse, first
        folder = data if isinstance(data, ImageFolder) else self.embedder.loader.scan(data)
        if shots is not None:
            folder = take_shots(folder, shots, seed)
        with self.versions.state.writer(wait):
            embeddings, keys, cached = (embed or self.embedder.embed_keyed)(folder.paths, progress=progress,
                                                                            writer=True)
            data_set = LabelledEmbeddings(embeddings, keys, folder.labels, list(folder.classes))
            n_old, seen = 0, {}
            if incremental:
                data_set = self.training_set().merge(data_set)
                n_old = len(data_set) - len(embeddings)
                budget, seen = self.versions.budget_state(budget)
            data_set, retention = data_set.retain(n_old, budget, seen, seed)
            kind, params, choice = self._features_head(features, head, head_params, data_set, val_split, seed)
            report = self.fit_version(data_set, kind, val_split=val_split, seed=seed, tolerance=tolerance,
                                      force=force, head_params=params, source=str(folder.root), retention=retention)
        return replace(report, embedded=len(folder) - cached, cached=cached,
                       domain=self.embedder.domain_check(embeddings), features=choice)

    def _check_request(self, head: str, features: str, incremental: bool) -> None:
        """Refuse, before any image is embedded, what the manifest and the state already rule out."""
        from edgetl.heads import HEADS

        if head not in HEADS:
            raise DataError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
        self._check_features(features)
        if incremental:
            version = self.versions.trained_version()
            if version is None:
                raise NotFittedError(f"--incremental adds to the current head's training set, but no head was "
                                     f"trained on this device yet; run `edgetl device train {self._path} --data "
                                     "DIR` first")
            self.versions.load(version)  # the current head must belong to this extractor

    def _check_features(self, features: str) -> None:
        if features not in FEATURES:
            raise DataError(f"unknown features {features!r}; use last, multi or auto")
        if features != "last" and self.versions.bundle.feature_groups is None:
            raise DataError(f"bundle {self._path} has last-layer features only; re-export it with "
                            "`edgetl export … --features multi` for multi-depth heads")

    def _features_head(self, features: str, head: str, params: dict[str, Any], data: LabelledEmbeddings,
                       val_split: float, seed: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """(head kind, its parameters, {"features": chosen, "reason": why}) for ``features`` = last | multi | auto."""
        groups = self.versions.bundle.feature_groups
        self._check_features(features)
        if groups is None:
            return head, params, {"features": "last", "reason": "last-layer extractor"}
        spans = [[g["offset"], g["size"]] for g in groups]
        options = {"last": ("depth", {"inner": head, "groups": spans[:1], "normalise": False, "keep": 0,
                                      "inner_params": params}),
                   "multi": ("depth", {"inner": head, "groups": spans, "inner_params": params})}
        if features != "auto":
            return (*options[features], {"features": features, "reason": "asked for"})
        X, y = data.X, data.y
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

    def training_set(self) -> LabelledEmbeddings:
        """The current head's training embeddings, read from the store."""
        version = self.versions.trained_version()
        if version is None:
            raise NotFittedError(f"no head trained on this device yet; run `edgetl device train {self._path} "
                                 "--data DIR` first")
        state = self.versions.state
        keys, labels = state.train_keys(version), state.train_labels(version)
        if keys is None or labels is None:
            raise StateError(f"head {version} does not record its training images; retrain it with `device train`")
        rows = self.embedder.stored(str(k) for k in keys)
        missing = sum(r is None for r in rows)
        if missing:
            raise StateError(f"{missing} training embeddings of head {version} are missing from the store; retrain "
                             "it with `device train` on its images")
        X = np.stack(rows) if rows else np.zeros((0, self.versions.bundle.feature_dim), np.float32)
        return LabelledEmbeddings(X, keys, labels, list(state.meta(version)["classes"]))

    # ------------------------------------------------------------------------------------------------ class edits
    def add_class(self, name: str, data: str | os.PathLike[str], wait: float = 0.0, force: bool = False,
                  progress: Progress = no_progress, embed: EmbedKeyed | None = None) -> TrainReport:
        """See :meth:`edgetl.device.DeviceRuntime.add_class`."""
        root = Path(data)
        paths = self.embedder.loader.list(root)
        if not paths:
            raise DataError(f"{root} holds no images for class {name!r}; pass a folder of that class's images")
        with self.versions.state.writer(wait):
            current = self.training_set()
            if name in current.classes:
                raise DataError(f"class {name!r} exists already; add images with `edgetl device train … --incremental`")
            emb, new_keys, _ = (embed or self.embedder.embed_keyed)(paths, progress=progress, writer=True)
            merged = current.merge(LabelledEmbeddings(emb, new_keys, np.zeros(len(paths), np.int64), [name]))
            merged, retention = merged.retain(len(merged) - len(emb), *self.versions.budget_state(None), 0)
            kind, params = self.versions.head_spec()
            return self.fit_version(merged, kind, val_split=0.2, seed=0, tolerance=0.0, force=force,
                                    head_params=params, source=f"add-class {name} from {root}", retention=retention)

    def remove_class(self, name: str, wait: float = 0.0) -> TrainReport:
        """A new version without class ``name`` (its stored embeddings are left out of the refit)."""
        with self.versions.state.writer(wait):
            current = self.training_set()
            classes = current.classes
            if name not in classes:
                raise DataError(f"class {name!r} is not in the current head; classes: {', '.join(classes)}")
            keep = current.y != classes.index(name)
            remaining = [c for c in classes if c != name]
            remap = np.array([remaining.index(c) if c != name else -1 for c in classes])
            kept = LabelledEmbeddings(current.X[keep], current.keys[keep], remap[current.y[keep]], remaining)
            kept, retention = kept.retain(len(kept), *self.versions.budget_state(None), 0)
            kind, params = self.versions.head_spec()
            return self.fit_version(kept, kind, val_split=0.2, seed=0, tolerance=0.0, force=False, head_params=params,
                                    source=f"remove-class {name}", retention=retention)

    def rename_class(self, old: str, new: str, wait: float = 0.0) -> str:
        """A new version identical to the current one but with class ``old`` called ``new``."""
        versions = self.versions
        with versions.state.writer(wait):
            version = versions.trained_version()
            if version is None:
                raise NotFittedError("rename-class needs a head trained on the device; run `edgetl device train`")
            head, classes = versions.load(version)
            if old not in classes or new in classes:
                raise DataError(f"cannot rename {old!r} to {new!r}; classes: {', '.join(classes)}")
            meta = versions.state.meta(version)
            classes = [new if c == old else c for c in classes]
            kept = {k: meta.get(k) for k in ("metrics", "extractor_sha256", "extractor", "temperature", "retention",
                                             "head_params")}
            if kept["retention"]:
                kept["retention"] = {**kept["retention"], "seen": {new if c == old else c: n for c, n in
                                                                   kept["retention"]["seen"].items()}}
            reason = f"renamed {old} to {new}"
            return self.commit_version(head, kept | {"classes": classes, "status": "promoted", "reason": reason},
                                       keys=versions.state.train_keys(version),
                                       labels=versions.state.train_labels(version),
                                       novelty=versions.novelty_model(version), promote=True, audit={"reason": reason})

    # ------------------------------------------------------------------------------------------------ new versions
    def fit_version(self, data: LabelledEmbeddings, head: str, *, val_split: float, seed: int, tolerance: float,
                    force: bool, head_params: dict[str, Any], source: str, retention: dict[str, Any] | None = None
                    ) -> TrainReport:
        """Fit a ``head`` on ``data`` (measured on a held-out part, then refit on every image), gate it and commit it
        (the writer lock is held by the caller)."""
        X, y = data.X, data.y
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
        gate = self.gate.decide(data.classes, model, data.take(val_idx), val_acc, tolerance, force)
        if len(val_idx):
            # the held-out part served its purpose; the kept head learns from every image
            model = make_head(head, seed=seed, **head_params).fit(X, y)
        metrics = {"val_accuracy": val_acc, "current_val_accuracy": gate.current_accuracy,
                   "n_train": len(train_idx), "n_val": len(val_idx), "fit_seconds": round(fit_seconds, 4),
                   "data": source}
        l2 = getattr(getattr(model, "head_", model), "l2_", None)  # a softmax head's L2 (cross-validated by default)
        if l2 is not None:
            metrics["l2"] = float(l2)
        record = self._record(data.classes, metrics, temperature, gate, retention=retention, head_params=head_params)
        version = self.commit_version(model, record, keys=data.keys, labels=y, novelty=novelty, promote=gate.promote,
                                      audit={"val_accuracy": val_acc, "current_val_accuracy": gate.current_accuracy,
                                             "reason": gate.reason},
                                      prune=bool(retention and retention.get("budget")))
        return TrainReport(version, head, data.classes, len(train_idx), len(val_idx), val_acc,
                           fit_seconds, 0, 0, gate.promote, gate.reason)

    def adopt_head(self, head_file: str | os.PathLike[str], labels: Sequence[str], source: str = "fleet",
                   extractor_sha256: str | None = None, tolerance: float = 0.02, force: bool = False,
                   wait: float = 0.0) -> TrainReport:
        """See :meth:`edgetl.device.DeviceRuntime.adopt_head`."""
        model, labels = self._check_adopted(head_file, labels, extractor_sha256)
        with self.versions.state.writer(wait):
            try:
                stored = self.training_set()
            except (NotFittedError, StateError):
                stored = LabelledEmbeddings.empty(self.versions.bundle.feature_dim)
            to_new = np.array([labels.index(c) if c in labels else -1 for c in stored.classes], dtype=np.int64)
            y_new = to_new[stored.y] if len(stored.y) else stored.y
            keep = y_new >= 0
            mine = LabelledEmbeddings(stored.X[keep], stored.keys[keep], y_new[keep], labels)
            acc = float((model.predict(mine.X) == mine.y).mean()) if len(mine.y) else None
            gate = self.gate.decide(labels, model, mine, acc, tolerance, force)
            novelty = Novelty.fit(mine.X, mine.y, mine.X) if len(np.unique(mine.y)) >= 2 else None
            # not a held-out accuracy (the fleet head learned from these images too): recorded apart, so that later
            # gates do not compare against it as if it were one
            metrics = {"val_accuracy": None, "local_accuracy": acc, "current_val_accuracy": gate.current_accuracy,
                       "n_train": 0, "n_val": 0, "fit_seconds": 0.0, "data": source,
                       "accuracy_basis": "this device's stored training embeddings, which the adopted head also "
                                         "learned from"}
            version = self.commit_version(model, self._record(labels, metrics, None, gate, source=source),
                                          keys=mine.keys, labels=mine.y, novelty=novelty, promote=gate.promote,
                                          audit={"val_accuracy": acc, "current_val_accuracy": gate.current_accuracy,
                                                 "reason": gate.reason, "source": source})
        return TrainReport(version, model.kind, labels, 0, len(mine.y), acc, 0.0, 0, 0, gate.promote,
                           gate.reason)

    def _check_adopted(self, head_file: str | os.PathLike[str], labels: Sequence[str],
                       extractor_sha256: str | None) -> tuple[Head, list[str]]:
        """The head in ``head_file`` and its labels, when it fits this extractor and names one label per class."""
        entry, sha = self.embedder.entry, self.embedder.extractor_sha256
        if extractor_sha256 is not None and extractor_sha256 != sha:
            raise BundleError(f"head {head_file} was built for extractor {extractor_sha256[:12]}…, this device runs "
                              f"{entry.file} ({sha[:12]}…); install the fleet's bundle first")
        model = load_head(head_file)
        names = [str(c) for c in labels]
        try:
            n_classes = model.decision_function(np.zeros((1, self.versions.bundle.feature_dim), np.float32)).shape[1]
        except DataError as exc:
            raise DataError(f"head {head_file} does not fit this bundle's extractor ({exc})") from exc
        if n_classes != len(names) or len(set(names)) != len(names):
            raise DataError(f"head {head_file} scores {n_classes} classes but {len(names)} distinct labels were given; "
                            "pass the labels.json written with the head")
        return model, names

    # --------------------------------------------------------------------------------------------------- commit
    def _record(self, classes: list[str], metrics: dict[str, Any], temperature: float | None, gate: Gate,
                **extra: Any) -> dict[str, Any]:
        """A new version's meta: classes, metrics, its extractor, temperature, status and reason, then ``extra``."""
        return {"classes": classes, "metrics": metrics, "extractor_sha256": self.embedder.extractor_sha256,
                "extractor": self.embedder.entry.file, "temperature": temperature,
                "status": "promoted" if gate.promote else "candidate", "reason": gate.reason} | extra

    def commit_version(self, model: Head, record: dict[str, Any], *, keys: np.ndarray | None,
                       labels: np.ndarray | None, novelty: Novelty | None, promote: bool, audit: dict[str, Any],
                       prune: bool = False) -> str:
        """Write ``model`` as a new immutable version (``record``: its meta; ``keys``/``labels``: its training images),
        drop stored embeddings no version trained on when ``prune``, make it current when ``promote``, and append the
        audit entry (``promote`` or ``candidate``, with ``audit``'s fields). The writer lock is held by the caller;
        a crash at any point leaves the previous head current or the new one complete."""
        versions = self.versions
        previous = versions.current_version()
        version = versions.state.write_version(model, record, train_keys=keys, train_labels=labels, novelty=novelty)
        if prune:
            self.embedder.prune_store(versions.referenced_keys())
        if promote:
            versions.state.set_current(version)
        versions.log("promote" if promote else "candidate", version=version, previous=previous, **audit)
        return version


__all__ = ["FEATURES", "Gate", "PromoteGate", "TrainReport", "Trainer", "take_shots"]
