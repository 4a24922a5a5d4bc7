"""Versioned, transactional device state inside ``BUNDLE/state/``.

- ``heads/vNNNN/`` — one immutable folder per trained head (``head.npz``, ``meta.json``: classes, extractor sha256,
  metrics, status). A version is written under a temporary name and renamed into place, so it is complete or absent.
- ``current`` — the name of the current version, replaced atomically (temporary file, fsync, rename, fsync folder).
  Readers (``predict``) need no lock: they read the pointer once and load an immutable folder.
- ``audit.jsonl`` — append-only log of every change (train, promote, candidate, rollback), one JSON object per line.
- ``lock`` — an exclusive ``flock`` held by a writer (``train``, ``rollback``); a second writer waits up to a timeout
  and then fails clearly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._atomic import atomic_write, atomic_write_json
from edgetl._lock import lock_exclusive
from edgetl.errors import StateError
from edgetl.heads import Head

BUNDLE_HEAD = "bundle"  #: pseudo-version: the initial head the host packed into the bundle
#: a head version's name: ``v`` and at least four ASCII digits (what :meth:`DeviceState.write_version` creates)
VERSION_PATTERN = re.compile(r"v[0-9]{4,9}")


def check_version(name: object, bundle_head: bool = False) -> str:
    """``name`` if it is a head version name (or, with ``bundle_head``, the bundle's own head ``"bundle"``); anything
    else (``../../x``, an absolute path, a name with control characters) is a :class:`StateError` — names come from
    users (``rollback --to``) and from files a user can edit (``state/current``), and become paths."""
    if isinstance(name, str) and (VERSION_PATTERN.fullmatch(name) or (bundle_head and name == BUNDLE_HEAD)):
        return name
    raise StateError(f"{name!r} is not a head version name; versions are named like v0001 ({BUNDLE_HEAD!r} is the "
                     "bundle's own head) — see `edgetl device history`")


class DeviceState:
    def __init__(self, folder: Path):
        self.folder = folder
        self.heads = folder / "heads"

    # ------------------------------------------------------------------------------------------------------- reading
    def current(self) -> str | None:
        pointer = self.folder / "current"
        try:
            name = pointer.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"cannot read {pointer} ({exc})") from exc
        if name is not None and not (VERSION_PATTERN.fullmatch(name) or name == BUNDLE_HEAD):
            raise StateError(f"device state file {pointer} holds {name[:40]!r}, not a head version name (edited or "
                             f"corrupt); write the name of a version in {self.heads} into it")
        return name

    def versions(self) -> list[str]:
        """Complete versions, oldest first (temporary folders of an interrupted write are ignored)."""
        if not self.heads.is_dir():
            return []
        return sorted(p.name for p in self.heads.iterdir() if VERSION_PATTERN.fullmatch(p.name) and p.is_dir())

    def version_dir(self, version: str) -> Path:
        """The folder of head ``version``; a name that is no version name (a path) is a :class:`StateError`."""
        return self.heads / check_version(version)

    def meta(self, version: str) -> dict[str, Any]:
        path = self.version_dir(version) / "meta.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise StateError(f"head version {version} does not exist; see `edgetl device history`") from exc
        except (OSError, ValueError) as exc:
            raise StateError(f"device state file {path} is unreadable ({exc}); roll back to another version") from exc
        if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
            raise StateError(f"device state file {path} holds {type(meta).__name__} data, not a head record; roll back "
                             "to another version")
        return meta

    def head_file(self, version: str) -> Path:
        return self.version_dir(version) / "head.npz"

    def audit(self) -> list[dict[str, Any]]:
        path = self.folder / "audit.jsonl"
        if not path.is_file():
            return []
        entries = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # a torn last line after a power cut is skipped
                entries.append(json.loads(line))
        return entries

    # ------------------------------------------------------------------------------------------------------- writing
    def train_keys(self, version: str) -> np.ndarray | None:
        """Content hashes of the images ``version`` was trained on (None when unknown)."""
        return self._version_array(version, "train_keys.npy")

    def train_labels(self, version: str) -> np.ndarray | None:
        """Class indices of the images ``version`` was trained on, aligned with :meth:`train_keys`."""
        return self._version_array(version, "train_labels.npy")

    def _version_array(self, version: str, name: str) -> np.ndarray | None:
        """The array ``name`` of ``version``; None when it is missing or unreadable (empty, truncated, not .npy,
        pickled objects)."""
        try:
            return np.load(self.version_dir(version) / name, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # an empty file raises EOFError
            return None

    def write_version(self, head: Head, meta: dict[str, Any], train_keys: np.ndarray | None = None,
                      train_labels: np.ndarray | None = None, novelty: Any = None) -> str:
        """Write a new immutable version (not yet current) with the content hashes of its training images; return
        its name."""
        try:
            self.heads.mkdir(parents=True, exist_ok=True)
            existing = [int(v[1:]) for v in self.versions()]
            version = f"v{max(existing, default=0) + 1:04d}"
            tmp = self.heads / f".{version}.{os.getpid()}.tmp"
            tmp.mkdir(parents=True)
            atomic_write(tmp / "head.npz", head.save)
            if train_keys is not None:
                atomic_write(tmp / "train_keys.npy", lambda fh: np.save(fh, np.asarray(train_keys, dtype="U64")))
            if novelty is not None:
                atomic_write(tmp / "novelty.npz", novelty.save)
            if train_labels is not None:
                atomic_write(tmp / "train_labels.npy", lambda fh: np.save(fh, np.asarray(train_labels, dtype=np.int64)))
            atomic_write_json(tmp / "meta.json", meta | {"version": version, "head": head.kind,
                                                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            os.replace(tmp, self.heads / version)
            _fsync_dir(self.heads)
        except OSError as exc:
            raise StateError(_write_error(exc, self.folder)) from exc
        return version

    def set_current(self, version: str) -> None:
        payload = check_version(version, bundle_head=True).encode()
        try:
            atomic_write(self.folder / "current", lambda fh: fh.write(payload))
        except OSError as exc:
            raise StateError(_write_error(exc, self.folder)) from exc

    def log(self, action: str, **fields: Any) -> None:
        """Append one line to the audit log (opened in append mode, flushed and fsynced)."""
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "action": action} | fields) + "\n"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / "audit.jsonl", "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise StateError(_write_error(exc, self.folder)) from exc

    @contextlib.contextmanager
    def writer(self, timeout: float = 0.0) -> Iterator[None]:
        """Hold the exclusive writer lock; wait up to ``timeout`` seconds for another writer, then fail clearly."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0),
                         0o666)
        except OSError as exc:
            raise StateError(_write_error(exc, self.folder)) from exc
        try:
            lock_exclusive(fd, timeout, lambda holder: StateError(
                f"another trainer ({holder}) is changing {self.folder.parent}; wait for it or pass --wait SECONDS"))
            yield
        finally:
            os.close(fd)  # releases the lock


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(exc: OSError, folder: Path) -> str:
    why = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
           errno.EACCES: "permission denied"}.get(exc.errno or 0, str(exc))
    return f"cannot write device state in {folder} ({why}); the previous head stays current — free space or fix " \
           "permissions and retry"
