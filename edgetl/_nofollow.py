"""Files and folders opened without following links, relative to folder descriptors (``openat``): what the inbox
watcher uses for everything it writes (its journal, lock, learning record, ``_watch/``, ``_failed/``, ``.reason``
files) and for the images it reads and moves. A link or other odd entry found where the watcher expects its own file
or folder is moved aside (renamed ``NAME.aside-TIME``), never followed and never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from edgetl.errors import StateError

log = logging.getLogger(__name__)

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def move_aside(dir_fd: int, name: str, where: Path, why: str) -> None:
    """Rename the entry ``name`` (a link or something else that is not what the watcher expects) out of the way."""
    new = f"{name}.aside-{time.time_ns()}"
    os.rename(name, new, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    log.warning("%s/%s is %s; moved it aside to %s (never followed, never deleted)", where, name, why, new)


def describe(mode: int) -> str:
    return "a link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"


def open_owned(dir_fd: int, name: str, flags: int, where: Path, mode: int = 0o644) -> int:
    """Open the watcher's own file ``name`` in ``dir_fd`` without following a link; a link or non-regular file in
    its place is moved aside and a new file created."""
    flags |= O_NOFOLLOW | O_CLOEXEC | os.O_NONBLOCK
    for attempt in range(2):
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            move_aside(dir_fd, name, where, describe(st.st_mode))
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


def open_dir(path: Path, owned: bool) -> int:
    """A descriptor of the folder ``path`` (created when absent). ``owned`` (a folder of the watcher's, e.g.
    ``INBOX/_watch``): its last component is never followed as a link — one found there is moved aside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not owned:
        path.mkdir(exist_ok=True)
        return os.open(path, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    parent = os.open(path.parent, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    try:
        return subdir(parent, path.name, path.parent, create=True, aside=True)
    finally:
        os.close(parent)


def subdir(dir_fd: int, name: str, where: Path, create: bool, aside: bool) -> int:
    """Descriptor of the folder ``name`` in ``dir_fd``, never following a link (``aside``: a link or file in its
    place is moved aside and a folder created; else OSError)."""
    for attempt in range(2):
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=dir_fd)
        try:
            return os.open(name, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            if not (aside and attempt == 0 and exc.errno in (errno.ELOOP, errno.ENOTDIR)):
                raise
            st = os.lstat(name, dir_fd=dir_fd)
            move_aside(dir_fd, name, where, describe(st.st_mode))
    raise OSError(errno.ELOOP, f"{where}/{name} is not a folder")


def walk(root: Path, parts: Sequence[str], create: bool, aside: bool, follow_root: bool = True) -> int:
    """Descriptor of ``root/parts...``: the root is opened as given (the user's folder), every part below it without
    following links."""
    if create:
        root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC | (0 if follow_root else O_NOFOLLOW))
    where = root
    try:
        for part in parts:
            nfd = subdir(fd, part, where, create, aside)
            os.close(fd)
            fd = nfd
            where = where / part
    except BaseException:
        os.close(fd)
        raise
    return fd



def reason_file(dest: Path) -> Path:
    return dest.with_name(dest.name + ".reason")


def unique(dest: Path) -> Path:
    for n in range(1, 1_000_000):
        candidate = dest.with_name(f"{dest.stem}.{n}{dest.suffix}")
        if not os.path.lexists(candidate) and not os.path.lexists(reason_file(candidate)):
            return candidate
    raise StateError(f"no free name for {dest}; empty {dest.parent}")


def write_new(dir_fd: int, name: str, payload: bytes, where: Path, replace: bool = False) -> None:
    """Write ``payload`` to a new file ``name`` in ``dir_fd``, never through a link: created with O_EXCL (a temporary
    name renamed into place when ``replace``), flushed and fsynced."""
    target = f".{name}.{os.getpid()}.tmp" if replace else name
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644, dir_fd=dir_fd)
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



__all__ = ["O_CLOEXEC", "O_DIRECTORY", "O_NOFOLLOW", "describe", "move_aside", "open_dir", "open_owned", "reason_file",
           "subdir", "unique", "walk", "write_new"]
