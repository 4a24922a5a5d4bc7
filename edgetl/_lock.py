"""The one exclusive-lock helper: an ``flock`` on an open file, which records who holds it.

Used by the device state's writer lock (:meth:`edgetl.state.DeviceState.writer`: one trainer at a time, waiting up to
``--wait`` seconds) and by the inbox watcher's journal lock (:mod:`edgetl.journal`: one watcher per journal, no wait).
The lock belongs to the open file: closing the descriptor (or the process ending, kill -9 included) releases it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

POLL_S = 0.05  #: how often a waiting process tries again


def lock_exclusive(fd: int, timeout: float, busy: Callable[[str], Exception]) -> None:
    """Take an exclusive ``flock`` on the open file ``fd``, waiting up to ``timeout`` seconds (0: one try) while
    another process holds it, then write ``pid N`` into the file (what a waiting process names in its message).

    When the lock stays held, raises ``busy(holder)``: ``holder`` is what the holder wrote (``"another process"``
    when the file is empty). The caller opens ``fd`` (following links or not) and closes it to release the lock."""
    import fcntl

    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 100, 0).decode("utf-8", "replace").strip() or "another process"
                raise busy(holder) from None
            time.sleep(POLL_S)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)


__all__ = ["lock_exclusive"]
