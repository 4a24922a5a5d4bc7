"""Unattended inbox processing: :class:`InboxWatcher` classifies every image that lands in a folder, exactly once.

- **Complete files only.** A file is taken when its size and mtime have not changed for ``settle`` seconds (two polls
  at least that far apart); ``settle=0`` takes files at first sight, for writers that rename complete files into place.
  Dotfiles, partial downloads (``*.part``, ``*.tmp``, ``*.partial``, ``*.crdownload``, ``*.swp``, ``*.filepart``),
  non-image suffixes and folders whose name starts with ``_`` or ``.`` (``_label``, ``_failed``, …) are ignored.
- **One JSON line per image** in the results file (the journal): file, path, size, mtime_ns, status, label, calibrated
  probability, unknown flag, novelty score, rolling drift (median novelty of the last images), head version, time.
  Images are decoded one by one (a bad one is set aside) and embedded in batches; the head is loaded once and again
  only when the current head version changes.
- **Exactly once, across kill -9 and power cuts.** The results file *is* the journal: each batch is appended, flushed
  and fsynced before any file is moved; a restart reads it back (a torn last line is cut off, so that image is
  processed again) and skips every file whose (name, size, mtime) it records — finishing a move a crash interrupted.
- **Unreadable files** get a ``status: "failed"`` line and are moved to ``INBOX/_failed/`` beside a ``.reason`` file.
  Any exception from one file (decode, embed, ``OverflowError``, ``MemoryError``) is that file's failure, never the
  loop's. With ``settle > 0`` a file that fails is first given another settle window: if its size or mtime changes
  meanwhile it was still being written (a new arrival), else it fails on the second try.
- **Never follows links.** Links in the inbox are ignored; an image is opened with ``O_NOFOLLOW`` and checked on the
  open descriptor (regular file, the size and mtime that settled); the watcher's own files (journal, its lock, the
  learning record, ``_watch/``, ``_failed/`` and the ``.reason`` files) are opened without following links, and a
  link or other odd entry found in their place is moved aside (renamed ``NAME.aside-TIME``, never followed, never
  deleted). Unreadable journal lines are skipped with a warning.
- **A file replaced under the same name** is a new arrival when its size or mtime differ (the journal is keyed by
  relative name, size and mtime_ns); a file replaced between being read and being moved is left in place and
  classified again as the new arrival it is.
- **Field learning.** Labelled images in ``INBOX/_label/<class>/`` retrain the head incrementally (old training
  embeddings come from the store) through the promote gate, at most every ``learn_every`` seconds and only when the
  labelled set changed.

The watcher never installs signal handlers: the caller sets ``stop_event`` (the CLI does on SIGTERM/SIGINT); the
current batch is finished and flushed first.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self

import numpy as np

from edgetl.data import IMAGE_SUFFIXES, load_image, scan_image_folder
from edgetl.errors import BundleError, DataError, EdgeTLError, NotFittedError, RuntimeMissingError, StateError
from edgetl.novelty import calibrated_proba
from edgetl.state import BUNDLE_HEAD

if TYPE_CHECKING:
    from edgetl.device import DeviceRuntime, TrainReport

log = logging.getLogger(__name__)

PARTIAL_SUFFIXES = frozenset({".part", ".tmp", ".partial", ".crdownload", ".swp", ".filepart", ".download"})
LABEL_DIR = "_label"
FAILED_DIR = "_failed"
RESULTS_DIR = "_watch"
DRIFT_WINDOW = 100  #: images in the rolling drift median
MAX_JOURNAL_LINE = 1 << 20  #: a longer journal line is not a record (skipped with a warning)
#: failures of the device itself (bundle, runtime, state), never of one image: they stop the loop
_DEVICE_ERRORS = (BundleError, RuntimeMissingError, StateError, NotFittedError)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_PROC_FD = os.path.isdir("/proc/self/fd")

#: event callback: one dict per batch / learning run / recovery (``{"event": "batch", ...}``)
Events = Callable[[dict[str, Any]], None]


def _no_events(event: dict[str, Any]) -> None:
    return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------------------------------- live head
class LiveHead:
    """The current head of a :class:`DeviceRuntime`, loaded once and reloaded only when the current version changes
    (a field-learning run or another process promoted or rolled back). Shared by ``watch`` and ``stream``."""

    def __init__(self, runtime: DeviceRuntime, window: int = DRIFT_WINDOW):
        self.runtime = runtime
        self.version: str | None = None
        self._recent: deque[float] = deque(maxlen=window)

    def refresh(self) -> str:
        """Reload the head when the current version changed; return the version in use."""
        version = self.runtime.current_version()
        if version is None:
            raise NotFittedError(f"bundle {self.runtime.bundle.path} has no head yet; train one: "
                                 f"edgetl device train {self.runtime.bundle.path} --data DIR")
        if version != self.version:
            head, labels, version = self.runtime.load_current_head()
            meta = self.runtime.state.meta(version) if version != BUNDLE_HEAD else {}
            self._head, self._labels, self._novelty = head, list(labels), self.runtime.novelty_model(version)
            self._temperature = meta.get("temperature")
            self.version = version
            self._recent.clear()  # drift is measured against the head in use
            log.info("using head %s (%d classes)", version, len(self._labels))
        return version

    def classify(self, X: np.ndarray) -> list[dict[str, Any]]:
        """Embeddings ``(N, D)`` → one dict per row: label, probability (calibrated when the head has a temperature),
        calibrated, unknown, novelty, drift (median novelty of the last images; None without a novelty model),
        drifted, head_version."""
        self.refresh()
        if not len(X):
            return []
        t = self._temperature
        proba = calibrated_proba(self._head, X, t)
        scores = self._novelty.score(X) if self._novelty is not None else None
        best = proba.argmax(axis=1)
        rows = []
        for i in range(len(X)):
            row: dict[str, Any] = {"label": self._labels[best[i]], "probability": round(float(proba[i, best[i]]), 6),
                                   "calibrated": bool(t)}
            if scores is not None and self._novelty is not None:
                self._recent.append(float(scores[i]))
                drift = float(np.median(self._recent))
                row |= {"unknown": bool(scores[i] > self._novelty.threshold), "novelty": round(float(scores[i]), 6),
                        "drift": round(drift, 6), "drifted": drift > self._novelty.threshold}
            else:
                row |= {"unknown": None, "novelty": None, "drift": None, "drifted": None}
            row["head_version"] = self.version
            rows.append(row)
        return rows


# ------------------------------------------------------------------------------------------------------ journal
_OK: tuple[str, str | None, str | None] = ("ok", None, None)  #: one shared record for the common case


def file_key(rel: str, size: int, mtime_ns: int) -> str:
    """Identity of one arrival: relative name, size and mtime (a new file under an old name is a new arrival)."""
    return f"{rel}\x00{size}\x00{mtime_ns}"


class Journal:
    """The results file read as a journal: append-only JSON lines, fsynced per batch; a torn last line (kill -9 or a
    power cut in the middle of a write) is cut off on open, an unreadable line is skipped with a warning.

    The journal and its lock are opened without following links (relative to their folder's descriptor; ``owned``:
    that folder belongs to the watcher, e.g. ``INBOX/_watch``, and a link in its place is moved aside too)."""

    def __init__(self, path: Path, owned: bool = True):
        self.path = path
        #: key -> (status, moved_to or None, error or None) of every recorded file still in the inbox
        self.done: dict[str, tuple[str, str | None, str | None]] = {}
        self.lines = 0
        self._dir_fd = -1
        try:
            self._dir_fd = _open_dir(path.parent, owned=owned)
            self._lock = _lock(self._dir_fd, path.name + ".lock", path)
            fd = _open_owned(self._dir_fd, path.name, os.O_RDWR | os.O_CREAT | os.O_APPEND, path.parent)
            self._fh = os.fdopen(fd, "a+b")
            self._recover()
        except OSError as exc:
            self._close_fds()
            raise StateError(f"cannot open the results journal {path} ({exc}); pass a writable --out") from exc
        except BaseException:
            self._close_fds()
            raise

    def _recover(self) -> None:
        fh = self._fh
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return
        fh.seek(max(0, size - 1))
        if fh.read(1) != b"\n":  # a torn last line: cut back to the last newline
            end = self._last_newline(size)
            log.warning("%s ends with a torn line (%d bytes, an interrupted write); cutting it off — that image "
                        "is processed again", self.path, size - end)
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
        fh.seek(0)
        number = 0
        while True:
            line = fh.readline(MAX_JOURNAL_LINE)
            if not line:
                break
            number += 1
            if not line.endswith(b"\n"):  # longer than the limit: skip the rest of it
                while (more := fh.readline(MAX_JOURNAL_LINE)) and not more.endswith(b"\n"):
                    pass
                log.warning("%s line %d is longer than %d bytes, not a watch record; ignored", self.path, number,
                            MAX_JOURNAL_LINE)
                continue
            if not line.strip():
                continue
            parsed = _parse_record(line)
            if parsed is None:
                log.warning("%s line %d is not a watch record; ignored", self.path, number)
                continue
            key, record = parsed
            self.done[key] = record
            self.lines += 1
        fh.seek(0, os.SEEK_END)

    def _last_newline(self, size: int) -> int:
        """Offset just after the last newline before ``size`` (0 when there is none); reads backwards in blocks."""
        fh, pos = self._fh, size
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            fh.seek(pos)
            block = fh.read(step)
            i = block.rfind(b"\n")
            if i >= 0:
                return pos + i + 1
        return 0

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Write ``records`` as JSON lines and make them durable (flush + fsync) before returning."""
        if not records:
            return
        payload = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode("utf-8", "replace")
        try:
            self._fh.write(payload)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise StateError(f"cannot append to the results journal {self.path} ({exc}); free space or fix "
                             "permissions — the batch is processed again after a restart") from exc
        for r in records:
            record = _OK if r["status"] == "ok" and not r.get("moved_to") else \
                (r["status"], r.get("moved_to"), r.get("error"))
            self.done[file_key(r["file"], r["size"], r["mtime_ns"])] = record
        self.lines += len(records)

    def forget_move(self, key: str) -> None:
        """The recorded move of ``key`` cannot be finished: keep the record, stop retrying the move."""
        if key in self.done:
            status, _, error = self.done[key]
            self.done[key] = _OK if status == "ok" else (status, None, error)

    def prune(self, present: set[str]) -> None:
        """Forget done files that left the inbox (moved or deleted): memory stays bounded by the inbox's size."""
        self.done = {k: v for k, v in self.done.items() if k in present}

    @property
    def dir_fd(self) -> int:
        return self._dir_fd

    def _close_fds(self) -> None:
        for name in ("_fh", "_lock"):
            obj = self.__dict__.pop(name, None)
            if obj is not None:
                with contextlib.suppress(OSError):
                    obj.close()
        if self._dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._dir_fd)
            self._dir_fd = -1

    def close(self) -> None:
        self._close_fds()  # closing the lock file releases the lock

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._close_fds()


def _parse_record(line: bytes) -> tuple[str, tuple[str, str | None, str | None]] | None:
    """(key, record) of one journal line; None for anything that is not a watch record (never raises)."""
    try:
        rec = json.loads(line)
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
            return None
        size, mtime_ns = rec["size"], rec["mtime_ns"]
        if not (isinstance(size, int) and isinstance(mtime_ns, int)) or isinstance(size, bool):
            return None
        status, moved_to, error = str(rec.get("status")), rec.get("moved_to"), rec.get("error")
        if moved_to is not None and not isinstance(moved_to, str):
            return None
        record = _OK if status == "ok" and not moved_to else (status, moved_to, None if error is None else str(error))
        return file_key(rec["file"], size, mtime_ns), record
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return None


class _LockFile:
    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close  # like a file object: a forgotten lock is released when collected


def _lock(dir_fd: int, name: str, journal: Path) -> _LockFile:
    """An exclusive ``flock`` on ``name`` in ``dir_fd``: one watcher per journal (two would classify the same files
    twice). Opened without following links."""
    import fcntl

    fd = _open_owned(dir_fd, name, os.O_RDWR | os.O_CREAT, journal.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 100, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise StateError(f"another watcher ({holder}) is writing {journal}; stop it first or pass another --out") \
            from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    return _LockFile(fd)


# ----------------------------------------------------------------------------------- files without following links
def _aside(dir_fd: int, name: str, where: Path, why: str) -> None:
    """Rename the entry ``name`` (a link or something else that is not what the watcher expects) out of the way."""
    new = f"{name}.aside-{time.time_ns()}"
    os.rename(name, new, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    log.warning("%s/%s is %s; moved it aside to %s (never followed, never deleted)", where, name, why, new)


def _kind(mode: int) -> str:
    return "a link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"


def _open_owned(dir_fd: int, name: str, flags: int, where: Path, mode: int = 0o644) -> int:
    """Open the watcher's own file ``name`` in ``dir_fd`` without following a link; a link or non-regular file in
    its place is moved aside and a new file created."""
    flags |= _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK
    for attempt in range(2):
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            _aside(dir_fd, name, where, _kind(st.st_mode))
        try:
            fd = os.open(name, flags, mode, dir_fd=dir_fd)
        except OSError as exc:
            if attempt == 0 and exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK):
                continue  # swapped for a link between the check and the open: check again
            raise
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
    raise OSError(errno.ELOOP, f"{where}/{name} keeps being replaced by something that is not a regular file")


def _open_dir(path: Path, owned: bool) -> int:
    """A descriptor of the folder ``path`` (created when absent). ``owned`` (a folder of the watcher's, e.g.
    ``INBOX/_watch``): its last component is never followed as a link — one found there is moved aside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not owned:
        path.mkdir(exist_ok=True)
        return os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    parent = os.open(path.parent, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        return _subdir(parent, path.name, path.parent, create=True, aside=True)
    finally:
        os.close(parent)


def _subdir(dir_fd: int, name: str, where: Path, create: bool, aside: bool) -> int:
    """Descriptor of the folder ``name`` in ``dir_fd``, never following a link (``aside``: a link or file in its
    place is moved aside and a folder created; else OSError)."""
    for attempt in range(2):
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=dir_fd)
        try:
            return os.open(name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            if not (aside and attempt == 0 and exc.errno in (errno.ELOOP, errno.ENOTDIR)):
                raise
            st = os.lstat(name, dir_fd=dir_fd)
            _aside(dir_fd, name, where, _kind(st.st_mode))
    raise OSError(errno.ELOOP, f"{where}/{name} is not a folder")


def _walk(root: Path, parts: Sequence[str], create: bool, aside: bool, follow_root: bool = True) -> int:
    """Descriptor of ``root/parts...``: the root is opened as given (the user's folder), every part below it without
    following links."""
    if create:
        root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC | (0 if follow_root else _O_NOFOLLOW))
    where = root
    try:
        for part in parts:
            nfd = _subdir(fd, part, where, create, aside)
            os.close(fd)
            fd = nfd
            where = where / part
    except BaseException:
        os.close(fd)
        raise
    return fd


# ------------------------------------------------------------------------------------------------------ watcher
@dataclass
class WatchStats:
    processed: int = 0
    failed: int = 0
    skipped_done: int = 0
    recovered_moves: int = 0
    batches: int = 0
    learn_runs: int = 0
    retried: int = 0  #: files that failed once and were given another settle window
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        return {"processed": self.processed, "failed": self.failed, "skipped_done": self.skipped_done,
                "recovered_moves": self.recovered_moves, "batches": self.batches, "learn_runs": self.learn_runs,
                "retried": self.retried, "elapsed_s": round(elapsed, 3),
                "images_per_s": round(self.processed / elapsed, 2) if elapsed > 0 else None}


@dataclass
class _Candidate:
    path: Path
    rel: str
    size: int
    mtime_ns: int
    confirm: bool = False  #: failed once already: a second failure is final
    ident: tuple[int, int] | None = None  #: (st_dev, st_ino) of the file that was read

    @property
    def key(self) -> str:
        return file_key(self.rel, self.size, self.mtime_ns)


class _Changed(Exception):
    """The file is not the one that settled (changed, replaced, gone or not a regular file): not processed now."""


class InboxWatcher:
    """Classify every complete image in ``inbox`` exactly once; see the module docstring.

    ``out``: results journal (default ``INBOX/_watch/results.jsonl``). ``move_done``: move each processed image there
    (keeping its sub-path; a folder inside the inbox is left out of the scan). ``settle``: seconds a file's size and
    mtime must stay unchanged (default: ``interval``); a file that fails to decode is retried once after another
    ``settle`` seconds unless ``settle`` is 0. ``learn_every``: seconds between field-learning checks of
    ``INBOX/_label`` (None: off). ``batch_size``: images embedded together (default: the runtime's)."""

    def __init__(self, runtime: DeviceRuntime, inbox: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 move_done: str | os.PathLike[str] | None = None, interval: float = 2.0, settle: float | None = None,
                 batch_size: int | None = None, learn_every: float | None = None, tolerance: float = 0.02,
                 lock_wait: float = 60.0, seed: int = 0, events: Events = _no_events):
        self.runtime = runtime
        self.inbox = Path(inbox).absolute()
        if not self.inbox.is_dir():
            raise DataError(f"inbox {self.inbox} is not a folder; create it or pass the folder images arrive in")
        self.out = Path(out).absolute() if out is not None else self.inbox / RESULTS_DIR / "results.jsonl"
        self.move_done = Path(move_done).absolute() if move_done is not None else None
        self.interval = float(interval)
        self.settle = self.interval if settle is None else float(settle)
        self.batch_size = batch_size or runtime.batch_size
        self.learn_every = learn_every
        self.tolerance, self.lock_wait, self.seed = tolerance, lock_wait, seed
        self.events = events
        self.head = LiveHead(runtime)
        self.head.refresh()  # fail now, not at the first image, when there is no head
        self.stats = WatchStats()
        self._seen: dict[str, tuple[int, int, float]] = {}  # rel -> (size, mtime_ns, first seen, monotonic)
        self._deferred: dict[str, tuple[int, int, float]] = {}  # rel -> (size, mtime_ns, failed at) of a first failure
        self._excluded = self._excluded_dirs()
        self._learn_state_name = self.out.name + ".learn.json"
        self._learn_state_file = self.out.with_name(self._learn_state_name)
        self._last_learn_check: float | None = None
        owned = self.out.parent != self.inbox and self.inbox in self.out.parents
        self.journal = Journal(self.out, owned=owned)

    # --------------------------------------------------------------------------------------------- context / loop
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.journal.close()

    def run(self, stop_event: threading.Event | None = None) -> WatchStats:
        """Poll until ``stop_event`` is set; the batch in progress is finished and flushed first."""
        stop_event = stop_event or threading.Event()
        while not stop_event.is_set():
            done = self.process_once(stop_event)
            if self.learn_every is not None and not stop_event.is_set():
                now = time.monotonic()
                if self._last_learn_check is None or now - self._last_learn_check >= self.learn_every:
                    self._last_learn_check = now
                    self.learn_once()
            if not done:
                stop_event.wait(self.interval)
        return self.stats

    def process_once(self, stop_event: threading.Event | None = None) -> int:
        """One scan: process every ready file (in batches; stops between batches when ``stop_event`` is set).
        Returns the number of files processed (classified or set aside)."""
        ready = self._ready()
        n = 0
        for start in range(0, len(ready), self.batch_size):
            if stop_event is not None and stop_event.is_set():
                break
            n += self._process_batch(ready[start:start + self.batch_size])
        return n

    # -------------------------------------------------------------------------------------------------- scanning
    def _excluded_dirs(self) -> list[Path]:
        out = []
        for d in (self.move_done,):
            if d is not None:
                with contextlib.suppress(OSError):
                    out.append(d.resolve())
        return out

    def _scan(self) -> Iterator[tuple[str, str, int, int]]:
        """(path, relative name, size, mtime_ns) of every candidate image; plain strings, no objects per file, so
        that polling a large inbox stays cheap in time and memory. Links (to files or folders) are never followed."""
        stack = [(str(self.inbox), "")]
        while stack:
            folder, prefix = stack.pop()
            try:
                it = os.scandir(folder)
            except OSError as exc:
                log.warning("cannot list %s (%s); skipped this poll", folder, exc)
                continue
            with it:
                yield from self._scan_folder(it, prefix, stack)

    def _scan_folder(self, it: Iterator[os.DirEntry[str]], prefix: str, stack: list[tuple[str, str]]
                     ) -> Iterator[tuple[str, str, int, int]]:
        # entries are consumed one by one (no list of the whole folder: a 10,000-file inbox costs no transient MBs)
        while True:
            try:
                entry = next(it)
            except StopIteration:
                return
            except OSError:
                return  # the folder went away while listing
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not name.startswith("_") and Path(entry.path).resolve() not in self._excluded:
                        stack.append((entry.path, f"{prefix}{name}/"))
                    continue
                suffix = os.path.splitext(name)[1].lower()
                if suffix not in IMAGE_SUFFIXES or not entry.is_file(follow_symlinks=False):
                    continue  # partial downloads (*.part, *.tmp, ...) have no image suffix; links are not files
                st = entry.stat(follow_symlinks=False)
            except (OSError, ValueError):
                continue  # vanished between listing and stat
            yield entry.path, prefix + name, st.st_size, st.st_mtime_ns

    def _ready(self) -> list[_Candidate]:
        """Files whose size and mtime held still for ``settle`` seconds and that the journal does not record; files
        the journal records but that a crash left in place get their recorded move finished. A file that failed
        once waits another ``settle`` seconds unchanged before its second (final) try."""
        now = time.monotonic()
        seen: dict[str, tuple[int, int, float]] = {}
        deferred: dict[str, tuple[int, int, float]] = {}
        hits = 0
        ready: list[_Candidate] = []
        done = self.journal.done
        for path, rel, size, mtime_ns in self._scan():
            key = file_key(rel, size, mtime_ns)
            record = done.get(key)
            if record is not None:
                hits += 1
                if record[1]:
                    self._finish_move(_Candidate(Path(path), rel, size, mtime_ns), record)
                continue
            failed = self._deferred.get(rel)
            if failed is not None and failed[:2] == (size, mtime_ns):
                deferred[rel] = failed
                if now - failed[2] >= self.settle:
                    ready.append(_Candidate(Path(path), rel, size, mtime_ns, confirm=True))
                continue
            before = self._seen.get(rel)
            first = before[2] if before is not None and before[0] == size and before[1] == mtime_ns else now
            seen[rel] = (size, mtime_ns, first)
            if self.settle <= 0 or (before is not None and now - first >= self.settle):
                ready.append(_Candidate(Path(path), rel, size, mtime_ns))
        self._seen, self._deferred = seen, deferred
        if hits < len(done):  # some recorded files left the inbox: a second pass finds which to forget
            self.journal.prune({file_key(rel, size, mtime_ns) for _, rel, size, mtime_ns in self._scan()})
        ready.sort(key=lambda c: (c.mtime_ns, c.rel))
        return ready

    def _finish_move(self, c: _Candidate, record: tuple[str, str | None, str | None]) -> None:
        """The journal says this file was processed but it is still here: a crash came between the journal write and
        the move. Finish the move (never process it again); a move that cannot be done is not retried."""
        status, moved_to, error = record
        dest = Path(str(moved_to))
        try:
            if os.path.lexists(dest) or os.path.lexists(_reason_file(dest)):
                dest = _unique(dest)
            _move(c, dest, self._dest_root(dest), reason=(error or "unreadable (see the results journal)")
                  if status == "failed" else None)
            self.stats.recovered_moves += 1
            log.info("finished an interrupted move: %s -> %s", c.path, dest)
        except (OSError, StateError, ValueError) as exc:
            log.warning("cannot move %s to %s (%s); left in the inbox (already recorded, not processed again)",
                        c.path, dest, exc)
            self.journal.forget_move(c.key)

    # ------------------------------------------------------------------------------------------------ processing
    def _process_batch(self, batch: Sequence[_Candidate]) -> int:
        images: list[Any] = []
        good: list[_Candidate] = []
        failures: list[tuple[_Candidate, str]] = []
        for c in batch:
            try:
                images.append(self._read(c))
                good.append(c)
            except _Changed as why:
                log.info("%s changed since it settled (%s); waiting for it to settle again", c.path, why)
                self._seen.pop(c.rel, None)
            except _DEVICE_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - anything one file does is that file's failure
                failures.append((c, _reason(exc, c)))
        rows: list[dict[str, Any] | None] = []
        if images:
            rows = self._classify(good, images, failures)
        del images
        records = []
        for c, reason in failures:
            if self.settle > 0 and not c.confirm:
                # it may still be growing (a writer that paused longer than --settle): another settle window first
                self._deferred[c.rel] = (c.size, c.mtime_ns, time.monotonic())
                self.stats.retried += 1
                log.info("%s failed (%s); trying again once it has stayed unchanged for %.1f s", c.path, reason,
                         self.settle)
                continue
            log.warning("set aside %s: %s", c.path, reason)
            records.append({"file": c.rel, "path": str(c.path), "size": c.size, "mtime_ns": c.mtime_ns,
                            "status": "failed", "error": reason, "time": _now(),
                            "moved_to": str(self._dest(self.inbox / FAILED_DIR, c.rel))})
        for c, row in zip(good, rows):
            if row is None:
                continue
            rec = {"file": c.rel, "path": str(c.path), "size": c.size, "mtime_ns": c.mtime_ns, "status": "ok"}
            rec |= row
            rec["time"] = _now()
            if self.move_done is not None:
                rec["moved_to"] = str(self._dest(self.move_done, c.rel))
            records.append(rec)
        self.journal.append(records)  # durable before anything moves
        by_rel = {c.rel: c for c in batch}
        for rec in records:
            if rec.get("moved_to"):
                c = by_rel[rec["file"]]
                dest = Path(rec["moved_to"])
                try:
                    _move(c, dest, self._dest_root(dest), reason=rec["error"] if rec["status"] == "failed" else None)
                except (OSError, StateError, ValueError) as exc:
                    log.warning("cannot move %s to %s (%s); left in place (recorded, not processed again)",
                                c.path, rec["moved_to"], exc)
                    self.journal.forget_move(c.key)
        failed = sum(r["status"] == "failed" for r in records)
        self.stats.processed += len(records) - failed
        self.stats.failed += failed
        self.stats.batches += 1
        self.events({"event": "batch", "n": len(records), "failed": failed, "head_version": self.head.version}
                    | self.stats.as_dict())
        return len(records)

    def _read(self, c: _Candidate) -> Any:
        """Decode ``c`` from a descriptor opened without following links, after checking on that descriptor that it
        is a regular file with the size and mtime that settled (else :class:`_Changed`)."""
        parts = c.rel.split("/")
        try:
            dir_fd = _walk(self.inbox, parts[:-1], create=False, aside=False)
        except OSError as exc:
            raise _Changed(f"its folder is gone or is a link: {exc.strerror or exc}") from None
        try:
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                raise _Changed(f"cannot open it without following links: {exc.strerror or exc}") from None
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Changed("not a regular file any more")
            if (st.st_size, st.st_mtime_ns) != (c.size, c.mtime_ns):
                raise _Changed(f"size {c.size} -> {st.st_size}")
            c.ident = (st.st_dev, st.st_ino)
            if not _PROC_FD:
                return load_image(c.path)
            proc = f"/proc/self/fd/{fd}"
            try:
                return load_image(proc)
            except DataError as exc:  # name the file, not the descriptor
                raise DataError(str(exc).replace(proc, str(c.path))) from exc
        finally:
            os.close(fd)

    def _classify(self, good: list[_Candidate], images: list[Any], failures: list[tuple[_Candidate, str]]
                  ) -> list[dict[str, Any] | None]:
        """One row per image; when the batch fails, images are tried one by one and each failure is that file's."""
        try:
            return list(self.head.classify(self.runtime.embed_images(images)))
        except _DEVICE_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - find the file that caused it
            log.info("a batch of %d failed (%s); classifying its images one by one", len(images), exc)
        rows: list[dict[str, Any] | None] = []
        for c, image in zip(good, images):
            try:
                rows.append(self.head.classify(self.runtime.embed_images([image]))[0])
            except _DEVICE_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001
                failures.append((c, _reason(exc, c)))
                rows.append(None)
        return rows

    def _dest(self, root: Path, rel: str) -> Path:
        dest = root / rel
        return _unique(dest) if os.path.lexists(dest) or os.path.lexists(_reason_file(dest)) else dest

    def _dest_root(self, dest: Path) -> tuple[Path, bool]:
        """(root opened as given, whether folders below it are the watcher's own) for a recorded destination."""
        failed = self.inbox / FAILED_DIR
        if dest.is_relative_to(failed):
            return self.inbox, True  # INBOX/_failed/... : every folder from _failed down is the watcher's
        if self.move_done is not None and dest.is_relative_to(self.move_done):
            return self.move_done, False
        raise ValueError(f"{dest} is neither under {failed} nor under the --move-done folder")

    # -------------------------------------------------------------------------------------------------- learning
    def learn_once(self, force: bool = False) -> TrainReport | None:
        """Retrain the head from ``INBOX/_label/<class>/`` (incremental, through the promote gate) when its settled
        images differ from the last run's; returns the report, or None when nothing changed or learning failed
        (logged: the watcher keeps classifying with the current head). Links are never followed."""
        label_dir = self.inbox / LABEL_DIR
        if label_dir.is_symlink() or not label_dir.is_dir():
            if label_dir.is_symlink():
                log.warning("%s is a link; field learning never follows links — make it a folder", label_dir)
            return None
        try:
            folder = scan_image_folder(label_dir, min_classes=1)
        except DataError:
            return None
        cutoff = time.time() - self.settle
        keep, parts = [], []
        for i, p in enumerate(folder.paths):
            try:
                if _through_link(label_dir, p):
                    continue
                st = p.lstat()
            except (OSError, ValueError):
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mtime <= cutoff and p.suffix.lower() not in PARTIAL_SUFFIXES:
                keep.append(i)
                parts.append(f"{p.relative_to(label_dir).as_posix()}\x00{st.st_size}\x00{st.st_mtime_ns}")
        if not keep:
            return None
        fingerprint = hashlib.sha256("\n".join(sorted(parts)).encode("utf-8", "replace")).hexdigest()
        last = self._learn_state()
        if not force and last.get("fingerprint") == fingerprint:
            return None
        folder = folder.subset(keep)
        entry: dict[str, Any] = {"fingerprint": fingerprint, "time": _now(), "n": len(folder),
                                 "classes": list(folder.classes)}
        report = None
        try:
            report = self.runtime.train(folder, incremental=True, tolerance=self.tolerance, wait=self.lock_wait,
                                        seed=self.seed)
            entry |= {"version": report.version, "promoted": report.promoted, "reason": report.reason,
                      "val_accuracy": report.val_accuracy}
        except (BundleError, RuntimeMissingError):
            raise
        except Exception as exc:  # noqa: BLE001 - a bad labelled image never stops classifying
            log.warning("field learning from %s failed: %s", label_dir, exc)
            entry["error"] = str(exc) if isinstance(exc, EdgeTLError) else f"{type(exc).__name__}: {exc}"
        try:
            payload = (json.dumps(entry, indent=2) + "\n").encode("utf-8", "replace")
            _write_new(self.journal.dir_fd, self._learn_state_name, payload, self.out.parent, replace=True)
        except OSError as exc:
            log.warning("cannot record the field-learning run in %s (%s)", self._learn_state_file, exc)
        self.stats.learn_runs += 1
        self.events({"event": "learn"} | entry)
        return report

    def _learn_state(self) -> dict[str, Any]:
        try:
            fd = os.open(self._learn_state_name, os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC,
                         dir_fd=self.journal.dir_fd)
        except OSError:
            return {}
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return {}
            data = json.loads(os.read(fd, 1 << 20))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError, RecursionError):
            return {}
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------------------ helpers
def _reason(exc: BaseException, c: _Candidate) -> str:
    """One line saying why ``c`` failed."""
    text = str(exc) if isinstance(exc, EdgeTLError) else f"cannot process image {c.path} ({type(exc).__name__}: {exc})"
    text = " ".join(text.split())
    return text if len(text) <= 1000 else text[:997] + "..."


def _through_link(root: Path, path: Path) -> bool:
    """Whether any component of ``path`` below ``root`` is a link."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            return True
    return False


def _reason_file(dest: Path) -> Path:
    return dest.with_name(dest.name + ".reason")


def _unique(dest: Path) -> Path:
    for n in range(1, 1_000_000):
        candidate = dest.with_name(f"{dest.stem}.{n}{dest.suffix}")
        if not os.path.lexists(candidate) and not os.path.lexists(_reason_file(candidate)):
            return candidate
    raise StateError(f"no free name for {dest}; empty {dest.parent}")


def _write_new(dir_fd: int, name: str, payload: bytes, where: Path, replace: bool = False) -> None:
    """Write ``payload`` to a new file ``name`` in ``dir_fd``, never through a link: created with O_EXCL (a temporary
    name renamed into place when ``replace``), flushed and fsynced."""
    target = f".{name}.{os.getpid()}.tmp" if replace else name
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        try:
            os.replace(target, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a link, never follows it
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(target, dir_fd=dir_fd)
            raise


def _move(c: _Candidate, dest: Path, root: tuple[Path, bool], reason: str | None = None) -> None:
    """Move the inbox file ``c`` to ``dest`` (below ``root``), writing ``dest.reason`` first when given. No link is
    followed on either side; the file must still be the one that was read (same inode, size and mtime) — one replaced
    meanwhile stays in the inbox as a new arrival. Rename on one file system, else copy + fsync + unlink."""
    base, owned = root
    rel_dest = dest.relative_to(base).parts
    src_parts = c.rel.split("/")
    dst_fd = _walk(base, rel_dest[:-1], create=True, aside=owned)
    try:
        src_fd = _walk(c.path.parents[len(src_parts) - 1], src_parts[:-1], create=False, aside=False)
        try:
            st = os.lstat(src_parts[-1], dir_fd=src_fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (c.size, c.mtime_ns) or \
                    (c.ident is not None and (st.st_dev, st.st_ino) != c.ident):
                raise OSError(errno.ESTALE, "the file was replaced after it was read; it is a new arrival")
            if reason is not None:
                _write_new(dst_fd, rel_dest[-1] + ".reason", (reason + "\n").encode("utf-8", "backslashreplace"),
                           dest.parent)
            try:
                os.rename(src_parts[-1], rel_dest[-1], src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                _copy_across(src_fd, src_parts[-1], dst_fd, rel_dest[-1])
            os.fsync(dst_fd)
        finally:
            os.close(src_fd)
    finally:
        os.close(dst_fd)


def _copy_across(src_fd: int, name: str, dst_fd: int, dest_name: str) -> None:
    """Move across file systems: copy to a temporary name, fsync, rename into place, unlink the source; mtime kept."""
    tmp = f".{dest_name}.part"
    sfd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=src_fd)
    try:
        st = os.fstat(sfd)
        dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW | _O_CLOEXEC, 0o644, dir_fd=dst_fd)
        try:
            while block := os.read(sfd, 1 << 20):
                os.write(dfd, block)
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    os.rename(tmp, dest_name, src_dir_fd=dst_fd, dst_dir_fd=dst_fd)
    os.unlink(name, dir_fd=src_fd)


__all__ = ["InboxWatcher", "Journal", "LiveHead", "WatchStats", "file_key"]
