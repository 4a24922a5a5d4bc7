"""The version history part of a device (:class:`edgetl.device.DeviceRuntime`): :class:`VersionHistory` reads the
head versions in ``BUNDLE/state/`` (:mod:`edgetl.state`) for one extractor — which is current, loading a version's
head and novelty model (refusing a head of another extractor), the history table, rollback and the audit log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgetl.bundle import Bundle, ExtractorEntry
from edgetl.errors import NotFittedError, StateError
from edgetl.heads import Head, load_head
from edgetl.novelty import Novelty
from edgetl.state import BUNDLE_HEAD, DeviceState


def head_extractor(bundle: Bundle) -> tuple[str | None, str | None]:
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


class VersionHistory:
    """Head versions of ``bundle`` as seen by the extractor ``entry`` (whose file has ``extractor_sha256``)."""

    def __init__(self, bundle: Bundle, entry: ExtractorEntry, extractor_sha256: str):
        self.bundle, self.entry, self.extractor_sha256 = bundle, entry, extractor_sha256
        self.state = DeviceState(bundle.state_dir)

    # ------------------------------------------------------------------------------------------------------ reading
    def current_version(self) -> str | None:
        """The name of the current head version, ``"bundle"`` for the host's initial head, or None."""
        return self.state.current() or (BUNDLE_HEAD if self.bundle.manifest.head is not None else None)

    def trained_version(self) -> str | None:
        """The current version when it was trained on this device (None: no head, or the bundle's initial head)."""
        version = self.current_version()
        return None if version is None or version == BUNDLE_HEAD else version

    def meta(self, version: str) -> dict[str, Any]:
        """The record of ``version`` (``{}`` for the bundle's initial head)."""
        return self.state.meta(version) if version != BUNDLE_HEAD else {}

    def current_owner(self) -> str | None:
        """The extractor file the current head was trained on (None: no head, or the bundle's initial head, which
        belongs to every FP32-faithful graph of the bundle)."""
        version = self.trained_version()
        if version is None:
            return None
        try:
            return self.state.meta(version).get("extractor")
        except StateError:
            return None

    def load(self, version: str) -> tuple[Head, list[str]]:
        """(head, class names) of ``version``; a head trained for another extractor is a :class:`StateError` that
        says how to run or roll back to a head of this one."""
        if version == BUNDLE_HEAD:
            packed = self.bundle.manifest.head
            if packed is None:
                raise StateError(f"bundle {self.bundle.path} packs no initial head")
            return load_head(self.bundle.file(packed.file)), self.bundle.labels
        meta = self.state.meta(version)
        if meta.get("extractor_sha256") != self.extractor_sha256:
            path, entry = self.bundle.path, self.entry
            owner = next((e for e in self.bundle.extractors() if e.file == meta.get("extractor")), None)
            use = f"run with --backend {owner.format} --precision {owner.precision} (the extractor it was trained " \
                  f"on), " if owner is not None else ""
            raise StateError(f"head {version} was trained for {meta.get('extractor', 'another extractor')}, not "
                             f"{entry.file} (in use here); {use}roll back to a head of this extractor "
                             f"(edgetl device history {path}), or train one for it: edgetl device train "
                             f"{path} --data DIR --backend {entry.format} --precision {entry.precision}")
        return load_head(self.state.head_file(version)), list(meta["classes"])

    def load_current(self) -> tuple[Head, list[str], str]:
        """(head, class names, version) of the current head; raises :class:`NotFittedError` when there is none."""
        version = self.current_version()
        if version is None:
            raise NotFittedError(f"bundle {self.bundle.path} has no head yet; train one: "
                                 f"edgetl device train {self.bundle.path} --data DIR")
        head, labels = self.load(version)
        return head, labels, version

    def novelty_model(self, version: str) -> Novelty | None:
        """The novelty model head ``version`` was trained with (None for the bundle's head or without one)."""
        path = self.state.heads / version / "novelty.npz"
        if version == BUNDLE_HEAD or not path.is_file():
            return None
        try:
            return Novelty.load(path)
        except (OSError, ValueError, KeyError) as exc:
            raise StateError(f"{path} is unreadable ({exc}); roll back or retrain") from exc

    def head_spec(self) -> tuple[str, dict[str, Any]]:
        """Kind and parameters of the current head (refits after adding or removing a class keep them)."""
        meta = self.state.meta(self.current_version() or "")
        return meta.get("head", "softmax"), dict(meta.get("head_params") or {})

    def budget_state(self, budget: int | None) -> tuple[int | None, dict[str, int]]:
        """(per-class budget, images seen per class) of the current head; an explicit ``budget`` wins."""
        version = self.current_version()
        meta = self.state.meta(version) if version and version != BUNDLE_HEAD else {}
        retention = meta.get("retention") or {}
        return budget or retention.get("budget"), dict(retention.get("seen", {}))

    def class_counts(self) -> dict[str, int]:
        """The current head's training images per class (empty for the bundle's head or without a record)."""
        version = self.trained_version()
        if version is None or self.state.train_labels(version) is None:
            return {}
        classes = self.state.meta(version)["classes"]
        counts = np.bincount(self.state.train_labels(version), minlength=len(classes))
        return {c: int(n) for c, n in zip(classes, counts)}

    def referenced_keys(self) -> set[str]:
        """Content hashes of every image any head version trained on."""
        referenced: set[str] = set()
        for version in self.state.versions():
            keys = self.state.train_keys(version)
            referenced.update(str(k) for k in (keys if keys is not None else ()))
        return referenced

    def history(self) -> list[dict[str, Any]]:
        """Every head version, oldest first, with its status (current / candidate / previous) and metrics."""
        current = self.current_version()
        rows = []
        packed = self.bundle.manifest.head
        if packed is not None:
            rows.append({"version": BUNDLE_HEAD, "status": "current" if current == BUNDLE_HEAD else "previous",
                         "head": packed.kind, "classes": self.bundle.labels, "metrics": {},
                         "created": self.bundle.manifest.created})
        for version in self.state.versions():
            meta = self.state.meta(version)
            status = "current" if version == current else meta.get("status", "previous")
            rows.append({"version": version, "status": status, "head": meta.get("head"), "classes": meta["classes"],
                         "metrics": meta.get("metrics", {}), "created": meta.get("created"),
                         "extractor": meta.get("extractor"), "extractor_sha256": meta.get("extractor_sha256"),
                         "reason": meta.get("reason")})
        return rows

    # ------------------------------------------------------------------------------------------------------ writing
    def log(self, action: str, **fields: Any) -> None:
        """An audit entry; every one names the extractor of the change (and its reason, where the caller gives one)."""
        self.state.log(action, extractor=self.entry.file, **fields)

    def rollback(self, to: str | None = None, wait: float = 0.0, reason: str | None = None) -> str:
        """Make ``to`` (default: the version that was current before the current one) current again. ``reason``
        replaces the default reason recorded in the audit log (e.g. an operator promoting a candidate)."""
        to_given = to is not None
        with self.state.writer(wait):
            current = self.current_version()
            if to is None:
                to = self._earlier(current)
            self.load(to)  # exists, is readable and fits this extractor
            self.state.set_current(to)
            self.log("rollback", version=to, previous=current,
                     reason=reason or ("--to given" if to_given else "back to the version current before"))
        return to

    def _earlier(self, current: str | None) -> str:
        """The version that was current before ``current`` (from the audit log; else the bundle's own head)."""
        promoted = [e["version"] for e in self.state.audit() if e["action"] in ("promote", "rollback")]
        earlier: Sequence[str] = [v for v in reversed(promoted) if v != current]
        if not earlier and current != BUNDLE_HEAD and self.bundle.manifest.head is not None:
            earlier = [BUNDLE_HEAD]
        if not earlier:
            raise StateError(f"no earlier head to roll back to (current: {current}); see `edgetl device history`")
        return earlier[0]


__all__ = ["VersionHistory", "head_extractor"]
