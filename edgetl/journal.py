"""The inbox watcher's results file read as a journal (exactly once across kill -9 and power cuts).

Append-only JSON lines, one per image, flushed and fsynced per batch before any file moves; a torn last line is cut
off on open (that image is processed again), an unreadable line is skipped with a warning. The journal is keyed by
:func:`file_key` (relative name, size, mtime_ns). One watcher per journal: an exclusive lock file beside it
(``NAME.lock``, :func:`edgetl._lock.lock_exclusive`). Both are opened without following links.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgetl._lock import lock_exclusive
from edgetl._nofollow import open_dir, open_owned
from edgetl.errors import StateError

log = logging.getLogger(__name__)

MAX_JOURNAL_LINE = 1 << 20  #: a longer journal line is not a record (skipped with a warning)
#: what the journal keeps of one recorded file: (status, moved_to or None, error or None)
Record = tuple[str, str | None, str | None]
_OK: Record = ("ok", None, None)  #: one shared record for the common case


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
        self.done: dict[str, Record] = {}
        self.lines = 0
        self._dir_fd = -1
        try:
            self._dir_fd = open_dir(path.parent, owned=owned)
            self._lock = _lock(self._dir_fd, path.name + ".lock", path)
            fd = open_owned(self._dir_fd, path.name, os.O_RDWR | os.O_CREAT | os.O_APPEND, path.parent)
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


def _parse_record(line: bytes) -> tuple[str, Record] | None:
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
    fd = open_owned(dir_fd, name, os.O_RDWR | os.O_CREAT, journal.parent)
    try:
        lock_exclusive(fd, 0.0, lambda holder: StateError(
            f"another watcher ({holder}) is writing {journal}; stop it first or pass another --out"))
    except BaseException:
        os.close(fd)
        raise
    return _LockFile(fd)


__all__ = ["MAX_JOURNAL_LINE", "Journal", "Record", "file_key"]
