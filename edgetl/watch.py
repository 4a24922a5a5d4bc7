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

The parts: :mod:`edgetl.inbox` (which files are ready; moving them), :mod:`edgetl.journal` (the results journal and
its lock), :mod:`edgetl._nofollow` (files without following links), :class:`edgetl.prediction.Predictor` (the
prediction path shared with ``device predict`` and ``stream``); here the loop, the batch and field learning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from edgetl._nofollow import O_CLOEXEC, O_NOFOLLOW, reason_file, unique, walk, write_new
from edgetl.data import load_image, scan_image_folder
from edgetl.errors import BundleError, DataError, EdgeTLError, NotFittedError, RuntimeMissingError, StateError
from edgetl.inbox import Candidate, Changed, InboxScanner
from edgetl.inbox import move as _move
from edgetl.journal import MAX_JOURNAL_LINE, Journal, Record, file_key
from edgetl.prediction import DRIFT_WINDOW, Prediction

if TYPE_CHECKING:
    from edgetl.device import DeviceRuntime, TrainReport

log = logging.getLogger(__name__)

PARTIAL_SUFFIXES = frozenset({".part", ".tmp", ".partial", ".crdownload", ".swp", ".filepart", ".download"})
LABEL_DIR = "_label"
FAILED_DIR = "_failed"
RESULTS_DIR = "_watch"
#: failures of the device itself (bundle, runtime, state), never of one image: they stop the loop
_DEVICE_ERRORS = (BundleError, RuntimeMissingError, StateError, NotFittedError)
_PROC_FD = os.path.isdir("/proc/self/fd")

#: event callback: one dict per batch / learning run / recovery (``{"event": "batch", ...}``)
Events = Callable[[dict[str, Any]], None]


def _no_events(event: dict[str, Any]) -> None:
    return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


# ------------------------------------------------------------------------------------------------------ watcher
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
        self.events = events
        self.head = runtime.predictor()
        self.head.refresh()  # fail now, not at the first image, when there is no head
        self.stats = WatchStats()
        self.scanner = InboxScanner(self.inbox, self.settle, exclude=(self.move_done,))
        self._last_learn_check: float | None = None
        owned = self.out.parent != self.inbox and self.inbox in self.out.parents
        self.journal = Journal(self.out, owned=owned)
        self.learner = FieldLearner(runtime, self.inbox / LABEL_DIR, self.journal, self.settle, tolerance, lock_wait,
                                    seed)

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
        ready = self.scanner.ready(self.journal, self._finish_move)
        n = 0
        for start in range(0, len(ready), self.batch_size):
            if stop_event is not None and stop_event.is_set():
                break
            n += self._process_batch(ready[start:start + self.batch_size])
        return n

    def _finish_move(self, c: Candidate, record: Record) -> None:
        """The journal says this file was processed but it is still here: a crash came between the journal write and
        the move. Finish the move (never process it again); a move that cannot be done is not retried."""
        status, moved_to, error = record
        dest = Path(str(moved_to))
        try:
            if os.path.lexists(dest) or os.path.lexists(reason_file(dest)):
                dest = unique(dest)
            _move(c, dest, self._dest_root(dest), reason=(error or "unreadable (see the results journal)")
                  if status == "failed" else None)
            self.stats.recovered_moves += 1
            log.info("finished an interrupted move: %s -> %s", c.path, dest)
        except (OSError, StateError, ValueError) as exc:
            log.warning("cannot move %s to %s (%s); left in the inbox (already recorded, not processed again)",
                        c.path, dest, exc)
            self.journal.forget_move(c.key)

    # ------------------------------------------------------------------------------------------------ processing
    def _process_batch(self, batch: Sequence[Candidate]) -> int:
        """Read, classify and record ``batch``: the journal is durable before any file moves."""
        good, images, failures = self._read_batch(batch)
        predictions = self._classify(good, images, failures) if images else []
        del images
        records = self._failure_records(failures) + self._records(good, predictions)
        self.journal.append(records)  # durable before anything moves
        by_rel = {c.rel: c for c in batch}
        for rec in records:
            if rec.get("moved_to"):
                c = by_rel[rec["file"]]
                try:
                    _move(c, Path(rec["moved_to"]), self._dest_root(Path(rec["moved_to"])),
                          reason=rec["error"] if rec["status"] == "failed" else None)
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

    def _read_batch(self, batch: Sequence[Candidate]) -> tuple[list[Candidate], list[Any], list[tuple[Candidate, str]]]:
        """(files read, their images, (file, why) of those that failed); a file that changed since it settled must
        settle again."""
        images: list[Any] = []
        good: list[Candidate] = []
        failures: list[tuple[Candidate, str]] = []
        for c in batch:
            try:
                images.append(self._read(c))
                good.append(c)
            except Changed as why:
                log.info("%s changed since it settled (%s); waiting for it to settle again", c.path, why)
                self.scanner.unsettle(c)
            except _DEVICE_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - anything one file does is that file's failure
                failures.append((c, _reason(exc, c)))
        return good, images, failures

    def _failure_records(self, failures: list[tuple[Candidate, str]]) -> list[dict[str, Any]]:
        """Journal lines of files that failed for good (set aside to ``_failed/``); a first failure with ``settle >
        0`` is deferred instead: another settle window first."""
        records = []
        for c, reason in failures:
            if self.settle > 0 and not c.confirm:
                # it may still be growing (a writer that paused longer than --settle): another settle window first
                self.scanner.defer(c)
                self.stats.retried += 1
                log.info("%s failed (%s); trying again once it has stayed unchanged for %.1f s", c.path, reason,
                         self.settle)
                continue
            log.warning("set aside %s: %s", c.path, reason)
            records.append({"file": c.rel, "path": str(c.path), "size": c.size, "mtime_ns": c.mtime_ns,
                            "status": "failed", "error": reason, "time": _now(),
                            "moved_to": str(self._dest(self.inbox / FAILED_DIR, c.rel))})
        return records

    def _records(self, good: list[Candidate], predictions: Sequence[Prediction | None]) -> list[dict[str, Any]]:
        """Journal lines of classified files (a prediction is converted to its journal fields here)."""
        records = []
        for c, prediction in zip(good, predictions):
            if prediction is None:
                continue
            rec = {"file": c.rel, "path": str(c.path), "size": c.size, "mtime_ns": c.mtime_ns, "status": "ok"}
            rec |= prediction.as_record()
            rec["time"] = _now()
            if self.move_done is not None:
                rec["moved_to"] = str(self._dest(self.move_done, c.rel))
            records.append(rec)
        return records

    def _read(self, c: Candidate) -> Any:
        """Decode ``c`` from a descriptor opened without following links, after checking on that descriptor that it
        is a regular file with the size and mtime that settled (else :class:`Changed`)."""
        parts = c.rel.split("/")
        try:
            dir_fd = walk(self.inbox, parts[:-1], create=False, aside=False)
        except OSError as exc:
            raise Changed(f"its folder is gone or is a link: {exc.strerror or exc}") from None
        try:
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                raise Changed(f"cannot open it without following links: {exc.strerror or exc}") from None
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Changed("not a regular file any more")
            if (st.st_size, st.st_mtime_ns) != (c.size, c.mtime_ns):
                raise Changed(f"size {c.size} -> {st.st_size}")
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

    def _classify(self, good: list[Candidate], images: list[Any], failures: list[tuple[Candidate, str]]
                  ) -> list[Prediction | None]:
        """One prediction per image; when the batch fails, images are tried one by one and each failure is that
        file's."""
        try:
            return list(self.head.classify(self.runtime.embed_images(images)))
        except _DEVICE_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - find the file that caused it
            log.info("a batch of %d failed (%s); classifying its images one by one", len(images), exc)
        predictions: list[Prediction | None] = []
        for c, image in zip(good, images):
            try:
                predictions.append(self.head.classify(self.runtime.embed_images([image]))[0])
            except _DEVICE_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001
                failures.append((c, _reason(exc, c)))
                predictions.append(None)
        return predictions

    def _dest(self, root: Path, rel: str) -> Path:
        dest = root / rel
        return unique(dest) if os.path.lexists(dest) or os.path.lexists(reason_file(dest)) else dest

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
        outcome = self.learner.run(force)
        if outcome is None:
            return None
        report, entry = outcome
        self.stats.learn_runs += 1
        self.events({"event": "learn"} | entry)
        return report


# ------------------------------------------------------------------------------------------------ field learning
class FieldLearner:
    """Incremental training from the labelled images in ``label_dir`` (``INBOX/_label/<class>/``), at most once per
    change of its settled images; each run is recorded beside the journal (``NAME.learn.json``)."""

    def __init__(self, runtime: DeviceRuntime, label_dir: Path, journal: Journal, settle: float, tolerance: float,
                 lock_wait: float, seed: int):
        self.runtime, self.label_dir, self.journal = runtime, label_dir, journal
        self.settle, self.tolerance, self.lock_wait, self.seed = settle, tolerance, lock_wait, seed
        self.state_name = journal.path.name + ".learn.json"

    def run(self, force: bool = False) -> tuple[TrainReport | None, dict[str, Any]] | None:
        """(report or None when training failed, the recorded entry); None when there is nothing (new) to learn."""
        settled = self._settled()
        if settled is None:
            return None
        folder, fingerprint = settled
        if not force and self._last().get("fingerprint") == fingerprint:
            return None
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
            log.warning("field learning from %s failed: %s", self.label_dir, exc)
            entry["error"] = str(exc) if isinstance(exc, EdgeTLError) else f"{type(exc).__name__}: {exc}"
        try:
            payload = (json.dumps(entry, indent=2) + "\n").encode("utf-8", "replace")
            write_new(self.journal.dir_fd, self.state_name, payload, self.journal.path.parent, replace=True)
        except OSError as exc:
            log.warning("cannot record the field-learning run in %s (%s)",
                        self.journal.path.with_name(self.state_name), exc)
        return report, entry

    def _settled(self) -> tuple[Any, str] | None:
        """(the labelled images that held still for ``settle`` seconds, their fingerprint); None when there are
        none. Links are never followed."""
        label_dir = self.label_dir
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
        return folder.subset(keep), fingerprint

    def _last(self) -> dict[str, Any]:
        """The record of the last run (``{}`` when there is none or it is unreadable)."""
        try:
            fd = os.open(self.state_name, os.O_RDONLY | os.O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC,
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
def _reason(exc: BaseException, c: Candidate) -> str:
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


__all__ = ["DRIFT_WINDOW", "MAX_JOURNAL_LINE", "FieldLearner", "InboxWatcher", "Journal", "WatchStats", "file_key"]
