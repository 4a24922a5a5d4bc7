"""Reading key and signature files an operator points edgetl at: small regular files only, never blocking on a FIFO or
device and never read whole when oversized. Shared by the Ed25519 (:mod:`edgetl.signing`) and OpenSSF
(:mod:`edgetl.openssf`) signatures and the fleet's head signatures."""

from __future__ import annotations

import os
import stat

from edgetl.errors import BundleError

MAX_KEY_BYTES = 16 << 10  #: a PEM Ed25519 key is about 120 bytes; anything beyond this is not a key


def read_small_file(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. A FIFO, device, folder or oversized file is refused
    without blocking or reading it whole (``/dev/zero`` or a pipe given as a key cannot hang the device)."""
    if str(path).strip() in ("", "."):
        raise BundleError(f"{what} path is empty (is EDGETL_TRUST set to an empty value?); pass the key file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BundleError(f"cannot read {what} {path} ({exc.strerror or exc}); pass an existing key file") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{what} {path} is not a regular file; pass the key file itself")
        if st.st_size > limit:
            raise BundleError(f"{what} {path} has {st.st_size} bytes, more than the {limit} a key file can have; pass "
                              "the right file")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            raise BundleError(f"{what} {path} is larger than {limit} bytes; pass the right file")
        return data
    except OSError as exc:
        raise BundleError(f"cannot read {what} {path} ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
