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
- **Field learning.** Labelled images in ``INBOX/_label/<class>/`` retrain the head incrementally (old training
  embeddings come from the store) through the promote gate, at most every ``learn_every`` seconds and only when the
  labelled set changed.

The watcher never installs signal handlers: the caller sets ``stop_event`` (the CLI does on SIGTERM/SIGINT); the
current batch is finished and flushed first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self

import numpy as np

from edgetl._atomic import atomic_write_json
from edgetl.data import IMAGE_SUFFIXES, load_image, scan_image_folder
from edgetl.errors import DataError, EdgeTLError, NotFittedError, StateError
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
    power cut in the middle of a write) is cut off on open."""

    def __init__(self, path: Path):
        self.path = path
        #: key -> (status, moved_to or None, error or None) of every recorded file still in the inbox
        self.done: dict[str, tuple[str, str | None, str | None]] = {}
        self.lines = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _lock(path.with_name(path.name + ".lock"))
            self._recover()
            self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the watcher's life
        except OSError as exc:
            raise StateError(f"cannot open the results journal {path} ({exc}); pass a writable --out") from exc

    def _recover(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb+") as fh:
            data = fh.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                log.warning("%s ends with a torn line (%d bytes, an interrupted write); cutting it off — that image "
                            "is processed again", self.path, len(data) - end)
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
        for number, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = file_key(rec["file"], int(rec["size"]), int(rec["mtime_ns"]))
            except (ValueError, KeyError, TypeError):
                log.warning("%s line %d is not a watch record; ignored", self.path, number)
                continue
            status, moved_to = str(rec.get("status")), rec.get("moved_to")
            self.done[key] = _OK if status == "ok" and not moved_to else (status, moved_to, rec.get("error"))
            self.lines += 1

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Write ``records`` as JSON lines and make them durable (flush + fsync) before returning."""
        if not records:
            return
        payload = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
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

    def prune(self, present: set[str]) -> None:
        """Forget done files that left the inbox (moved or deleted): memory stays bounded by the inbox's size."""
        self.done = {k: v for k, v in self.done.items() if k in present}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError):
            self._lock.close()  # releases the lock


def _lock(path: Path) -> IO[str]:
    """An exclusive ``flock`` on ``path``: one watcher per journal (two would classify the same files twice)."""
    import fcntl

    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the watcher's life
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise StateError(f"another watcher ({holder}) is writing {path.with_suffix('')}; stop it first or pass "
                         "another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    return fh


# ------------------------------------------------------------------------------------------------------ watcher
@dataclass
class WatchStats:
    processed: int = 0
    failed: int = 0
    skipped_done: int = 0
    recovered_moves: int = 0
    batches: int = 0
    learn_runs: int = 0
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        return {"processed": self.processed, "failed": self.failed, "skipped_done": self.skipped_done,
                "recovered_moves": self.recovered_moves, "batches": self.batches, "learn_runs": self.learn_runs,
                "elapsed_s": round(elapsed, 3),
                "images_per_s": round(self.processed / elapsed, 2) if elapsed > 0 else None}


@dataclass(frozen=True)
class _Candidate:
    path: Path
    rel: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        return file_key(self.rel, self.size, self.mtime_ns)


class InboxWatcher:
    """Classify every complete image in ``inbox`` exactly once; see the module docstring.

    ``out``: results journal (default ``INBOX/_watch/results.jsonl``). ``move_done``: move each processed image there
    (keeping its sub-path; a folder inside the inbox is left out of the scan). ``settle``: seconds a file's size and
    mtime must stay unchanged (default: ``interval``). ``learn_every``: seconds between field-learning checks of
    ``INBOX/_label`` (None: off). ``batch_size``: images embedded together (default: the runtime's)."""

    def __init__(self, runtime: DeviceRuntime, inbox: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 move_done: str | os.PathLike[str] | None = None, interval: float = 2.0, settle: float | None = None,
                 batch_size: int | None = None, learn_every: float | None = None, tolerance: float = 0.02,
                 lock_wait: float = 60.0, seed: int = 0, events: Events = _no_events):
        self.runtime = runtime
        self.inbox = Path(inbox).absolute()
        if not self.inbox.is_dir():
            raise DataError(f"inbox {self.inbox} is not a folder; create it or pass the folder images arrive in")
        self.out = Path(out) if out is not None else self.inbox / RESULTS_DIR / "results.jsonl"
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
        self._excluded = self._excluded_dirs()
        self._learn_state_file = self.out.with_name(self.out.name + ".learn.json")
        self._last_learn_check: float | None = None
        self.journal = Journal(self.out)

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
        that polling a large inbox stays cheap in time and memory."""
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
                    continue  # partial downloads (*.part, *.tmp, ...) have no image suffix
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished between listing and stat
            yield entry.path, prefix + name, st.st_size, st.st_mtime_ns

    def _ready(self) -> list[_Candidate]:
        """Files whose size and mtime held still for ``settle`` seconds and that the journal does not record; files
        the journal records but that a crash left in place get their recorded move finished."""
        now = time.monotonic()
        seen: dict[str, tuple[int, int, float]] = {}
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
            before = self._seen.get(rel)
            first = before[2] if before is not None and before[0] == size and before[1] == mtime_ns else now
            seen[rel] = (size, mtime_ns, first)
            if self.settle <= 0 or (before is not None and now - first >= self.settle):
                ready.append(_Candidate(Path(path), rel, size, mtime_ns))
        self._seen = seen
        if hits < len(done):  # some recorded files left the inbox: a second pass finds which to forget
            self.journal.prune({file_key(rel, size, mtime_ns) for _, rel, size, mtime_ns in self._scan()})
        ready.sort(key=lambda c: (c.mtime_ns, c.rel))
        return ready

    def _finish_move(self, c: _Candidate, record: tuple[str, str | None, str | None]) -> None:
        """The journal says this file was processed but it is still here: a crash came between the journal write and
        the move. Finish the move (never process it again)."""
        status, moved_to, error = record
        dest = Path(str(moved_to))
        if dest.exists():
            dest = _unique(dest)
        try:
            if status == "failed":
                _write_reason(dest, error or "unreadable (see the results journal)")
            _move(c.path, dest)
            self.stats.recovered_moves += 1
            log.info("finished an interrupted move: %s -> %s", c.path, dest)
        except OSError as exc:
            log.warning("cannot move %s to %s (%s); left in the inbox (already recorded, not processed again)",
                        c.path, dest, exc)

    # ------------------------------------------------------------------------------------------------ processing
    def _process_batch(self, batch: Sequence[_Candidate]) -> int:
        images, good, records = [], [], []
        for c in batch:
            try:
                images.append(load_image(c.path))
                good.append(c)
            except DataError as exc:
                if not c.path.exists():
                    continue  # vanished (deleted by someone else): nothing to record
                reason = str(exc)
                log.warning("set aside %s: %s", c.path, reason)
                records.append({"file": c.rel, "path": str(c.path), "size": c.size, "mtime_ns": c.mtime_ns,
                                "status": "failed", "error": reason, "time": _now(),
                                "moved_to": str(self._dest(self.inbox / FAILED_DIR, c.rel))})
        if images:
            rows = self.head.classify(self.runtime.embed_images(images))
            for c, row in zip(good, rows):
                rec = {"file": c.rel, "path": str(c.path), "size": c.size, "mtime_ns": c.mtime_ns, "status": "ok"}
                rec |= row
                rec["time"] = _now()
                if self.move_done is not None:
                    rec["moved_to"] = str(self._dest(self.move_done, c.rel))
                records.append(rec)
        del images
        self.journal.append(records)  # durable before anything moves
        by_rel = {c.rel: c for c in batch}
        for rec in records:
            if rec.get("moved_to"):
                c = by_rel[rec["file"]]
                try:
                    if rec["status"] == "failed":
                        _write_reason(Path(rec["moved_to"]), rec["error"])
                    _move(c.path, Path(rec["moved_to"]))
                except OSError as exc:
                    log.warning("cannot move %s to %s (%s); left in place (recorded, not processed again)",
                                c.path, rec["moved_to"], exc)
        failed = sum(r["status"] == "failed" for r in records)
        self.stats.processed += len(records) - failed
        self.stats.failed += failed
        self.stats.batches += 1
        self.events({"event": "batch", "n": len(records), "failed": failed, "head_version": self.head.version}
                    | self.stats.as_dict())
        return len(records)

    def _dest(self, root: Path, rel: str) -> Path:
        dest = root / rel
        return _unique(dest) if dest.exists() or _reason_file(dest).exists() else dest

    # -------------------------------------------------------------------------------------------------- learning
    def learn_once(self, force: bool = False) -> TrainReport | None:
        """Retrain the head from ``INBOX/_label/<class>/`` (incremental, through the promote gate) when its settled
        images differ from the last run's; returns the report, or None when nothing changed or learning failed
        (logged: the watcher keeps classifying with the current head)."""
        label_dir = self.inbox / LABEL_DIR
        if not label_dir.is_dir():
            return None
        try:
            folder = scan_image_folder(label_dir, min_classes=1)
        except DataError:
            return None
        cutoff = time.time() - self.settle
        keep, parts = [], []
        for i, p in enumerate(folder.paths):
            try:
                st = p.stat()
            except OSError:
                continue
            if st.st_mtime <= cutoff and p.suffix.lower() not in PARTIAL_SUFFIXES:
                keep.append(i)
                parts.append(f"{p.relative_to(label_dir).as_posix()}\x00{st.st_size}\x00{st.st_mtime_ns}")
        if not keep:
            return None
        fingerprint = hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()
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
        except EdgeTLError as exc:
            log.warning("field learning from %s failed: %s", label_dir, exc)
            entry["error"] = str(exc)
        try:
            atomic_write_json(self._learn_state_file, entry)
        except OSError as exc:
            log.warning("cannot record the field-learning run in %s (%s)", self._learn_state_file, exc)
        self.stats.learn_runs += 1
        self.events({"event": "learn"} | entry)
        return report

    def _learn_state(self) -> dict[str, Any]:
        try:
            return json.loads(self._learn_state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}


# ------------------------------------------------------------------------------------------------------ helpers
def _reason_file(dest: Path) -> Path:
    return dest.with_name(dest.name + ".reason")


def _unique(dest: Path) -> Path:
    for n in range(1, 1_000_000):
        candidate = dest.with_name(f"{dest.stem}.{n}{dest.suffix}")
        if not candidate.exists() and not _reason_file(candidate).exists():
            return candidate
    raise StateError(f"no free name for {dest}; empty {dest.parent}")


def _write_reason(dest: Path, reason: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    _reason_file(dest).write_text(reason + "\n", encoding="utf-8")


def _move(src: Path, dest: Path) -> None:
    """Rename (atomic on one file system), else copy + fsync + unlink; mtime kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)
    except OSError as exc:
        import errno

        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.part")
        shutil.copy2(src, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        os.unlink(src)


__all__ = ["InboxWatcher", "Journal", "LiveHead", "WatchStats", "file_key"]
