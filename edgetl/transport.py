"""Bundles in transit: pack a bundle into a ``.tar.gz`` and install one safely on a device.

Extraction refuses absolute paths, ``..``, links, device files and FIFOs, more members than ``max_members`` and more
bytes than ``max_bytes`` in total; the archive is unpacked into a staging folder, verified as a bundle (and its
signature, given a trusted key), and only then renamed into place. Device state of an existing bundle is kept.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from edgetl.bundle import MANIFEST, STATE_DIR, Bundle
from edgetl.errors import BundleError

MAX_BYTES = 2 << 30
MAX_MEMBERS = 10_000


def pack(bundle: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the bundle's files (verified first; device ``state/`` left out) to ``out`` (.tar.gz)."""
    b = Bundle.load(bundle)
    out = Path(out)
    names = sorted({*b.manifest["files"], MANIFEST} | ({"manifest.sig"} if (b.path / "manifest.sig").is_file() else set()))
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name in names:
            info = tar.gettarinfo(str(b.path / name), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with open(b.path / name, "rb") as fh:
                tar.addfile(info, fh)
    os.replace(tmp, out)
    return out


def _check_member(member: tarfile.TarInfo, total: int, max_bytes: int) -> int:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"archive member {name!r} has an absolute path; refusing the archive")
    if ".." in parts or "\\" in name:
        raise BundleError(f"archive member {name!r} escapes the target folder; refusing the archive")
    if member.issym() or member.islnk():
        raise BundleError(f"archive member {name!r} is a link; refusing the archive")
    if not (member.isfile() or member.isdir()):
        raise BundleError(f"archive member {name!r} is a device file or FIFO; refusing the archive")
    if parts and parts[0] == STATE_DIR:
        raise BundleError(f"archive member {name!r} would overwrite device state; refusing the archive")
    total += member.size
    if total > max_bytes:
        raise BundleError(f"archive expands beyond {max_bytes} bytes; refusing it (raise --max-bytes if expected)")
    return total


def install(archive: str | os.PathLike[str], dest: str | os.PathLike[str], trust: str | os.PathLike[str] | None = None,
            max_bytes: int = MAX_BYTES, max_members: int = MAX_MEMBERS) -> Path:
    """Unpack ``archive`` into the bundle folder ``dest`` after every check; keep ``dest/state`` if it exists."""
    archive, dest = Path(archive), Path(dest)
    staging = dest.with_name(f".{dest.name}.install")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            tar = tarfile.open(archive, "r:*")
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise BundleError(f"{archive} is not a readable bundle archive ({exc}); copy it again") from exc
        with tar:
            members, total = [], 0
            try:
                for member in tar:
                    if len(members) >= max_members:
                        raise BundleError(f"archive has more than {max_members} members; refusing it")
                    total = _check_member(member, total, max_bytes)
                    members.append(member)
                staging.mkdir(parents=True)
                for member in members:
                    target = staging / member.name
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    if source is None:
                        raise BundleError(f"archive member {member.name!r} cannot be read; refusing the archive")
                    with source, open(target, "wb") as fh:
                        shutil.copyfileobj(source, fh)
            except BundleError:
                raise
            except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
                raise BundleError(f"{archive} is truncated or corrupt ({type(exc).__name__}: {exc}); copy it again") \
                    from exc
        Bundle.load(staging, trust=trust)
        if (dest / STATE_DIR).is_dir():
            shutil.copytree(dest / STATE_DIR, staging / STATE_DIR)
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
