"""The inbox side of the watcher (:mod:`edgetl.watch`): which files are complete and new, and moving them away.

- :class:`InboxScanner` lists candidate images (links never followed, folders named ``_…``/``.…`` and the
  ``--move-done`` folder left out) and decides which are ready: size and mtime unchanged for ``settle`` seconds, not
  recorded in the journal; a file that failed once waits another settle window before its final try.
- :func:`move` moves one inbox file to its destination without following links on either side, only when it is still
  the file that was read.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edgetl._nofollow import O_CLOEXEC, O_NOFOLLOW, walk, write_new
from edgetl.data import IMAGE_SUFFIXES
from edgetl.journal import Journal, Record, file_key

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One arrival in the inbox: its path, name relative to the inbox, and the size and mtime that settled."""

    path: Path
    rel: str
    size: int
    mtime_ns: int
    confirm: bool = False  #: failed once already: a second failure is final
    ident: tuple[int, int] | None = None  #: (st_dev, st_ino) of the file that was read

    @property
    def key(self) -> str:
        return file_key(self.rel, self.size, self.mtime_ns)


class Changed(Exception):
    """The file is not the one that settled (changed, replaced, gone or not a regular file): not processed now."""


class InboxScanner:
    """Polls ``inbox`` for complete images. ``settle``: seconds a file's size and mtime must stay unchanged (0: take
    files at first sight); ``exclude``: folders inside the inbox that are not scanned (the ``--move-done`` folder)."""

    def __init__(self, inbox: Path, settle: float, exclude: tuple[Path | None, ...] = ()):
        self.inbox = inbox
        self.settle = settle
        self._excluded: list[Path] = []
        for d in exclude:
            if d is not None:
                with contextlib.suppress(OSError):
                    self._excluded.append(d.resolve())
        self._seen: dict[str, tuple[int, int, float]] = {}  # rel -> (size, mtime_ns, first seen, monotonic)
        self._deferred: dict[str, tuple[int, int, float]] = {}  # rel -> (size, mtime_ns, failed at) of a first failure

    def scan(self) -> Iterator[tuple[str, str, int, int]]:
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

    def ready(self, journal: Journal, finish: Callable[[Candidate, Record], None]) -> list[Candidate]:
        """Files whose size and mtime held still for ``settle`` seconds and that the journal does not record; for
        files the journal records but that a crash left in place, ``finish(candidate, record)`` finishes the recorded
        move. A file that failed once waits another ``settle`` seconds unchanged before its second (final) try."""
        now = time.monotonic()
        seen: dict[str, tuple[int, int, float]] = {}
        deferred: dict[str, tuple[int, int, float]] = {}
        hits = 0
        ready: list[Candidate] = []
        done = journal.done
        for path, rel, size, mtime_ns in self.scan():
            key = file_key(rel, size, mtime_ns)
            record = done.get(key)
            if record is not None:
                hits += 1
                if record[1]:
                    finish(Candidate(Path(path), rel, size, mtime_ns), record)
                continue
            failed = self._deferred.get(rel)
            if failed is not None and failed[:2] == (size, mtime_ns):
                deferred[rel] = failed
                if now - failed[2] >= self.settle:
                    ready.append(Candidate(Path(path), rel, size, mtime_ns, confirm=True))
                continue
            before = self._seen.get(rel)
            first = before[2] if before is not None and before[0] == size and before[1] == mtime_ns else now
            seen[rel] = (size, mtime_ns, first)
            if self.settle <= 0 or (before is not None and now - first >= self.settle):
                ready.append(Candidate(Path(path), rel, size, mtime_ns))
        self._seen, self._deferred = seen, deferred
        if hits < len(done):  # some recorded files left the inbox: a second pass finds which to forget
            journal.prune({file_key(rel, size, mtime_ns) for _, rel, size, mtime_ns in self.scan()})
        ready.sort(key=lambda c: (c.mtime_ns, c.rel))
        return ready

    def unsettle(self, c: Candidate) -> None:
        """``c`` changed since it settled: it must settle again."""
        self._seen.pop(c.rel, None)

    def defer(self, c: Candidate) -> None:
        """``c`` failed once: it is tried again when it has stayed unchanged for another settle window."""
        self._deferred[c.rel] = (c.size, c.mtime_ns, time.monotonic())


def move(c: Candidate, dest: Path, root: tuple[Path, bool], reason: str | None = None) -> None:
    """Move the inbox file ``c`` to ``dest`` (below ``root``), writing ``dest.reason`` first when given. No link is
    followed on either side; the file must still be the one that was read (same inode, size and mtime) — one replaced
    meanwhile stays in the inbox as a new arrival. Rename on one file system, else copy + fsync + unlink."""
    base, owned = root
    rel_dest = dest.relative_to(base).parts
    src_parts = c.rel.split("/")
    dst_fd = walk(base, rel_dest[:-1], create=True, aside=owned)
    try:
        src_fd = walk(c.path.parents[len(src_parts) - 1], src_parts[:-1], create=False, aside=False)
        try:
            st = os.lstat(src_parts[-1], dir_fd=src_fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (c.size, c.mtime_ns) or \
                    (c.ident is not None and (st.st_dev, st.st_ino) != c.ident):
                raise OSError(errno.ESTALE, "the file was replaced after it was read; it is a new arrival")
            if reason is not None:
                write_new(dst_fd, rel_dest[-1] + ".reason", (reason + "\n").encode("utf-8", "backslashreplace"),
                          dest.parent)
            try:
                os.rename(src_parts[-1], rel_dest[-1], src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                copy_across(src_fd, src_parts[-1], dst_fd, rel_dest[-1])
            os.fsync(dst_fd)
        finally:
            os.close(src_fd)
    finally:
        os.close(dst_fd)


def copy_across(src_fd: int, name: str, dst_fd: int, dest_name: str) -> None:
    """Move across file systems: copy to a temporary name, fsync, rename into place, unlink the source; mtime kept."""
    tmp = f".{dest_name}.part"
    sfd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC, dir_fd=src_fd)
    try:
        st = os.fstat(sfd)
        dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0o644, dir_fd=dst_fd)
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


__all__ = ["Candidate", "Changed", "InboxScanner", "copy_across", "move"]
