"""What the console knows of the inbox: the watcher's journal read as it grows, the images it names (ids handed out
here, never client paths), the drift series, thumbnails.

Nothing a client sends becomes a file-system path: images are named by the ids :class:`InboxLog` hands out, and the
files read are the ones the watcher's journal records (regular files under the inbox or the move-done folder, never
through a link).
"""

from __future__ import annotations

import io
import json
import os
import stat
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import DataError

MAX_JOURNAL_LINE = 1 << 20
#: drift points kept (the series ``GET /api/drift`` draws)
DRIFT_POINTS = 1000
#: thumbnails kept in memory
THUMBNAILS = 512


@dataclass
class Item:
    """One image the watcher classified (a journal line), as the console knows it."""

    id: int
    file: str  #: name relative to the inbox (display only)
    path: Path  #: where the image is now (its journal path, or where the watcher moved it)
    time: str
    label: str | None
    probability: float | None
    unknown: bool | None
    novelty: float | None
    drift: float | None
    head_version: str | None
    status: str
    error: str | None = None
    key: str | None = None  #: content hash (the embedding store's key), once read

    @classmethod
    def from_journal(cls, item_id: int, rec: dict[str, Any]) -> Item:
        """The item of one journal line (a JSON object with a string ``file``; other fields checked for type)."""
        return cls(item_id, rec["file"], Path(str(rec.get("moved_to") or rec.get("path") or "")),
                   str(rec.get("time", "")), _str(rec.get("label")), _num(rec.get("probability")),
                   _bool(rec.get("unknown")), _num(rec.get("novelty")), _num(rec.get("drift")),
                   _str(rec.get("head_version")), str(rec.get("status", "ok")),
                   str(rec["error"])[:300] if rec.get("error") else None)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "file": self.file, "time": self.time, "label": self.label,
                "probability": self.probability, "unknown": self.unknown, "novelty": self.novelty,
                "drift": self.drift, "head_version": self.head_version, "status": self.status, "error": self.error}


@dataclass(frozen=True)
class DriftPoint:
    """The watcher's rolling drift after one image."""

    time: str
    drift: float
    head_version: str | None


class JournalTail:
    """Reads the watcher's journal (JSON lines) from where it left off; a torn last line waits for its end, a
    replaced or truncated file is read again from the start, a link is never followed."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.ident: tuple[int, int] | None = None
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        data = self._read_new()
        if not data:
            return []
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > MAX_JOURNAL_LINE:
            self._partial = b""
        return [rec for rec in map(_record, lines) if rec is not None]

    def _read_new(self) -> bytes:
        """The bytes appended since the last read (all of them when the file was replaced or truncated)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return b""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return b""
            ident = (st.st_dev, st.st_ino)
            if ident != self.ident or st.st_size < self.offset:
                self.ident, self.offset, self._partial = ident, 0, b""
            if st.st_size == self.offset:
                return b""
            os.lseek(fd, self.offset, os.SEEK_SET)
            chunks = []
            left = st.st_size - self.offset
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            self.offset += sum(len(c) for c in chunks)
            return b"".join(chunks)
        finally:
            os.close(fd)


def _record(line: bytes) -> dict[str, Any] | None:
    """One journal line as a JSON object naming a ``file``; None for a blank, oversized or malformed line."""
    if not line.strip() or len(line) > MAX_JOURNAL_LINE:
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("file"), str) else None


class InboxLog:
    """The images of the watcher's journal (``results``; None: none), the ``keep`` most recent, by id; reading their
    files only under ``roots`` (the inbox and the move-done folder). ``observe(item)`` is called for each new item."""

    def __init__(self, results: Path | None, roots: Iterable[Path], keep: int,
                 observe: Callable[[Item], None] | None = None):
        self.roots = [Path(r) for r in roots]
        self.keep = keep
        self.lock = threading.RLock()
        self._observe = observe
        self._tail = JournalTail(results) if results is not None else None
        self._items: OrderedDict[int, Item] = OrderedDict()
        self._by_file: dict[str, int] = {}
        self._next_id = 1
        self._drift: deque[DriftPoint] = deque(maxlen=DRIFT_POINTS)
        self._thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def refresh(self) -> None:
        """Read new journal lines (a file seen again replaces its older item)."""
        if self._tail is None:
            return
        records = self._tail.poll()
        if not records:
            return
        with self.lock:
            for rec in records:
                old = self._by_file.pop(rec["file"], None)
                if old is not None:
                    self._items.pop(old, None)
                item = Item.from_journal(self._next_id, rec)
                self._next_id += 1
                self._items[item.id] = item
                self._by_file[item.file] = item.id
                if item.drift is not None:
                    self._drift.append(DriftPoint(item.time, item.drift, item.head_version))
                if self._observe is not None:
                    self._observe(item)
            while len(self._items) > self.keep:  # forget the oldest
                _, gone = self._items.popitem(last=False)
                self._by_file.pop(gone.file, None)

    def item(self, item_id: int) -> Item:
        self.refresh()
        with self.lock:
            item = self._items.get(item_id)
        if item is None:
            raise LookupError(f"no image with id {item_id}; ask GET /api/queue or /api/results for current ids")
        return item

    def items(self) -> list[Item]:
        """Every item known, oldest first."""
        with self.lock:
            return list(self._items.values())

    def drift_series(self) -> list[DriftPoint]:
        with self.lock:
            return list(self._drift)

    def safe_file(self, path: Path) -> Path:
        """``path`` if it is a regular file (not a link) under the inbox or the move-done folder; else DataError."""
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise DataError(f"image {path.name} is gone ({exc.strerror}); it was moved or deleted") from None
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"image {path.name} is not a regular file any more; refusing to read it")
        real = path.resolve()
        if not any(real.is_relative_to(root.resolve()) for root in self.roots):
            raise DataError(f"image {path.name} is outside the inbox; refusing to read it")
        return path

    def thumbnail(self, item_id: int, size: int = 128) -> bytes:
        """A PNG thumbnail of an image the watcher classified (decoded within the CLI's decode budget)."""
        from edgetl.data import load_image

        item = self.item(item_id)
        path = self.safe_file(item.path)
        key = (item_id, os.stat(path).st_mtime_ns)
        with self.lock:
            if key in self._thumbs:
                return self._thumbs[key]
        image = load_image(path)
        image.thumbnail((size, size))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        with self.lock:
            self._thumbs[key] = data
            while len(self._thumbs) > THUMBNAILS:
                self._thumbs.popitem(last=False)
        return data


def _str(v: object) -> str | None:
    return str(v)[:200] if v is not None else None


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) else None


def _bool(v: object) -> bool | None:
    return bool(v) if isinstance(v, bool) else None


__all__ = ["DriftPoint", "InboxLog", "Item", "JournalTail"]
