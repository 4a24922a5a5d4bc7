"""Bundles in transit: pack a bundle into a ``.tar.gz`` and install one safely on a device.

:func:`install` changes nothing on disk until every check passed, in this order:

1. **The destination.** DEST must be absent, an empty folder, or a bundle (a folder with ``manifest.json``) holding only
   the bundle's own files and its ``state/``. A regular file, a link, the current folder or one of its parents is
   refused. A non-empty folder that is not a bundle (or a bundle with other files in it) is refused; with ``force`` it
   is moved aside to ``DEST.before-install-TIME`` (never deleted) and the new bundle installed in its place.
2. **The archive's members.** Absolute paths, ``..``, links, device files, FIFOs and duplicate names are refused, as
   are more members than ``max_members`` and more bytes than ``max_bytes`` in total.
3. **The manifest, read from the archive in memory.** Its signature (given a trusted key), then the replay check (a
   manifest created before the installed bundle's, or before the newest one this device accepted, is refused: an
   older validly signed bundle would otherwise be installed and then refused by every command), then the archive's
   contents: every file must be listed in the manifest (or be ``manifest.json`` / ``manifest.sig``).
4. Only then is the archive unpacked into a staging folder beside DEST, every file's size and sha256 checked, and the
   staging folder renamed into place. The installed bundle's ``state/`` (trained heads, embedding store) moves into the
   new bundle, under the device's writer lock (a running ``device train`` finishes first).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tarfile
import time
from pathlib import Path, PurePosixPath

from edgetl.bundle import MANIFEST, STATE_DIR, Bundle, UnverifiedManifest
from edgetl.errors import BundleError

log = logging.getLogger(__name__)

MAX_BYTES = 2 << 30
MAX_MEMBERS = 10_000
MAX_MANIFEST_BYTES = 64 << 20
SIGNATURE = "manifest.sig"
OPENSSF_SIGNATURE = "model.sig"  #: an OpenSSF model-signing signature (edgetl.openssf), packed when present
ACCEPTED = "accepted.json"  #: in ``state/``: the newest signed manifest this device accepted (see DeviceRuntime)


def pack(bundle: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the bundle's files (verified first; device ``state/`` left out) to ``out`` (.tar.gz)."""
    b = Bundle.load(bundle)
    out = Path(out)
    names = sorted({*b.manifest.files, MANIFEST} | {s for s in (SIGNATURE, OPENSSF_SIGNATURE) if (b.path / s).is_file()})
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


def _member_name(member: tarfile.TarInfo) -> str:
    """The member's normalised relative name (``./a//b`` → ``a/b``)."""
    return str(PurePosixPath(*[p for p in PurePosixPath(member.name).parts if p not in ("", ".")]))


def _check_member(member: tarfile.TarInfo, total: int, max_bytes: int) -> int:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"archive member {name!r} has an absolute path; refusing the archive")
    if ".." in parts or "\\" in name or "\x00" in name:
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


# ------------------------------------------------------------------------------------------------- destination
def _check_dest(dest: Path) -> tuple[str, list[str]]:
    """What DEST is — ``absent``, ``empty``, ``bundle`` or ``other`` — and, for ``bundle`` / ``other``, the entries
    that are not the bundle's own (they would be lost). Raises for a destination that can never be installed into."""
    where = f"install destination {dest}"
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return "absent", []
    except OSError as exc:
        raise BundleError(f"cannot inspect {where} ({exc.strerror or exc}); pass a writable folder") from exc
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"{where} is a link; pass the real folder (installing never follows links)")
    if not stat.S_ISDIR(st.st_mode):
        raise BundleError(f"{where} is a file, not a folder; pass a new folder name for the bundle")
    real, cwd = dest.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == Path(real.anchor):
        raise BundleError(f"{where} is the current folder or one of its parents; pass a new folder name for the "
                          "bundle (e.g. ./bundle)")
    try:
        entries = sorted(os.listdir(dest))
    except OSError as exc:
        raise BundleError(f"cannot list {where} ({exc.strerror or exc}); pass a readable folder") from exc
    if not entries:
        return "empty", []
    if MANIFEST not in entries:
        return "other", entries
    try:
        listed = UnverifiedManifest.of(json.loads((dest / MANIFEST).read_bytes())).listed
    except (OSError, ValueError):
        listed = None
    if listed is None:  # a damaged bundle: its files cannot be told from others
        return "other", entries
    own = {MANIFEST, SIGNATURE, OPENSSF_SIGNATURE, STATE_DIR} | \
        {PurePosixPath(n).parts[0] for n in listed if PurePosixPath(n).parts}
    extra = [e for e in entries if e not in own]
    for name in listed:  # files inside listed sub-folders that the manifest does not list
        top = PurePosixPath(name).parts[0] if PurePosixPath(name).parts else ""
        if top != name and (dest / top).is_dir():
            for root, _, files in os.walk(dest / top):
                for f in files:
                    rel = (Path(root) / f).relative_to(dest).as_posix()
                    if rel not in listed and rel not in extra:
                        extra.append(rel)
    return "bundle", sorted(extra)


def _installed_created(dest: Path) -> tuple[float, str]:
    """(newest created time, its description) among the bundle installed in DEST and the manifests its device
    accepted (``state/accepted.json``)."""
    newest, what = 0.0, ""
    try:
        data = json.loads((dest / MANIFEST).read_bytes())
        if isinstance(data, dict):
            installed = UnverifiedManifest.of(data)
            newest, what = installed.created_unix, f"the installed bundle (created {installed.created})"
    except (OSError, ValueError):
        pass
    try:  # state/accepted.json records the created time of the newest signed manifest accepted (the same fields)
        data = json.loads((dest / STATE_DIR / ACCEPTED).read_bytes())
        accepted = UnverifiedManifest.of(data)
        if isinstance(data, dict) and accepted.created_unix > newest:
            newest, what = accepted.created_unix, f"a bundle this device accepted (created {accepted.created})"
    except (OSError, ValueError):
        pass
    return newest, what


# ------------------------------------------------------------------------------------------------------ install
def install(archive: str | os.PathLike[str], dest: str | os.PathLike[str], trust: str | os.PathLike[str] | None = None,
            max_bytes: int = MAX_BYTES, max_members: int = MAX_MEMBERS, force: bool = False,
            wait: float = 60.0) -> Path:
    """Unpack ``archive`` into the bundle folder ``dest`` after every check (see the module docstring); keep
    ``dest/state``. ``force``: a non-empty DEST that is not a bundle (or holds other files) is moved aside to
    ``DEST.before-install-TIME`` instead of being refused. ``wait``: seconds to wait for a running trainer."""
    archive, dest = Path(archive), Path(dest)
    kind, extra = _check_dest(dest)
    if kind == "other" or extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        what = "is a folder that is not a bundle" if kind == "other" else "is a bundle that also holds other files"
        if not force:
            raise BundleError(f"install destination {dest} {what} ({shown}); refusing to replace it — pass an empty "
                              "or new folder, or --force to move it aside (nothing is deleted)")
    try:
        tar = tarfile.open(archive, "r:*")
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise BundleError(f"{archive} is not a readable bundle archive ({exc}); copy it again") from exc
    staging = dest.with_name(f".{dest.name}.install-{os.getpid()}")
    try:
        with tar:
            try:
                files = _read_members(tar, max_bytes, max_members)
                manifest_bytes, signature = _small_member(tar, files, MANIFEST), _small_member(tar, files, SIGNATURE)
                if manifest_bytes is None:
                    raise BundleError(f"{archive} holds no {MANIFEST}; it is not a bundle archive (edgetl bundle pack)")
                if trust is not None:
                    from edgetl import openssf
                    from edgetl.signing import verify_manifest

                    if openssf.is_ec_key(trust):  # an OpenSSF signature, model.sig
                        openssf.verify_manifest(_small_member(tar, files, OPENSSF_SIGNATURE), manifest_bytes, trust,
                                                str(archive))
                    else:
                        verify_manifest(signature, manifest_bytes, trust, str(archive))
                manifest = _parse_manifest(manifest_bytes, archive)
                _check_coverage(files, manifest, archive)
                if kind == "bundle":
                    newest, what = _installed_created(dest)
                    if manifest.created_unix < newest:
                        raise BundleError(
                            f"{archive} was created {manifest.created}, before {what} in {dest}; refusing a "
                            "replayed or older bundle — to go back, export a new bundle, or install into a new folder")
                # every check passed: only now does anything on disk change
                dest.parent.mkdir(parents=True, exist_ok=True)
                _extract(tar, files, staging)
            except BundleError:
                raise
            except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
                raise BundleError(f"{archive} is truncated or corrupt ({type(exc).__name__}: {exc}); copy it again") \
                    from exc
        Bundle.load(staging, trust=trust)  # sizes and sha256 of every file, signature again on the written bytes
        _swap(staging, dest, kind, extra, wait)
        if trust is not None:
            _record_accepted(dest, manifest, manifest_bytes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _read_members(tar: tarfile.TarFile, max_bytes: int, max_members: int) -> dict[str, tarfile.TarInfo]:
    files: dict[str, tarfile.TarInfo] = {}
    seen: set[str] = set()
    total, n = 0, 0
    for member in tar:
        n += 1
        if n > max_members:
            raise BundleError(f"archive has more than {max_members} members; refusing it")
        total = _check_member(member, total, max_bytes)
        name = _member_name(member)
        if name in seen:
            raise BundleError(f"archive member {name!r} appears twice; refusing the archive")
        seen.add(name)
        if member.isfile():
            files[name] = member
    return files


def _small_member(tar: tarfile.TarFile, files: dict[str, tarfile.TarInfo], name: str) -> bytes | None:
    member = files.get(name)
    if member is None:
        return None
    if member.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"archive member {name} has {member.size} bytes; refusing it")
    source = tar.extractfile(member)
    if source is None:
        raise BundleError(f"archive member {name!r} cannot be read; refusing the archive")
    with source:
        return source.read()


def _parse_manifest(data: bytes, archive: Path) -> UnverifiedManifest:
    """What the archive's manifest claims (checked in full once unpacked: :meth:`Bundle.load`)."""
    try:
        manifest = UnverifiedManifest.of(json.loads(data.decode("utf-8")))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"the manifest in {archive} is corrupt ({type(exc).__name__}); copy it again") from exc
    if manifest.listed is None:
        raise BundleError(f"the manifest in {archive} lists no files; it was not written by edgetl export")
    return manifest


def _check_coverage(files: dict[str, tarfile.TarInfo], manifest: UnverifiedManifest, archive: Path) -> None:
    """Every file in the archive is listed (and so covered by a sha256, and by the signature when signed)."""
    listed = {str(PurePosixPath(*PurePosixPath(n).parts)) for n in manifest.listed or () if n}
    extra = sorted(set(files) - listed - {MANIFEST, SIGNATURE, OPENSSF_SIGNATURE})
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise BundleError(f"{archive} holds files its manifest does not list ({shown}); refusing the archive — pack "
                          "bundles with `edgetl bundle pack`")


def _extract(tar: tarfile.TarFile, files: dict[str, tarfile.TarInfo], staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, member in files.items():
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        if source is None:
            raise BundleError(f"archive member {name!r} cannot be read; refusing the archive")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with source, os.fdopen(fd, "wb") as fh:
            shutil.copyfileobj(source, fh)
            fh.flush()
            os.fsync(fh.fileno())


def _swap(staging: Path, dest: Path, kind: str, extra: list[str], wait: float) -> None:
    """Put the verified staging folder in DEST's place, moving DEST's ``state/`` into it under the device's writer
    lock (a running trainer finishes first; one that starts later finds the state in the new bundle). A forced
    install keeps the old folder aside, whole; otherwise the old bundle's own files are removed."""
    from edgetl.state import DeviceState

    if kind in ("absent", "empty"):
        os.replace(staging, dest)  # an empty folder is replaced atomically
        return
    forced = kind == "other" or bool(extra)
    old = dest.with_name(f"{dest.name}.before-install-{time.strftime('%Y%m%d-%H%M%S')}") if forced else \
        dest.with_name(f".{dest.name}.old-{os.getpid()}")
    state = dest / STATE_DIR
    keep_state = kind == "bundle" and state.is_dir() and not state.is_symlink()
    with DeviceState(state).writer(wait) if keep_state else contextlib.nullcontext():
        if keep_state:
            os.replace(state, staging / STATE_DIR)
        try:
            os.replace(dest, old)
        except OSError:
            if keep_state:
                os.replace(staging / STATE_DIR, state)  # nothing changed
            raise
        try:
            os.replace(staging, dest)
        except OSError:
            os.replace(old, dest)
            if keep_state:
                os.replace(staging / STATE_DIR, state)
            raise
    if forced:
        log.warning("moved the previous content of %s to %s (--force); nothing was deleted", dest, old)
    else:
        shutil.rmtree(old, ignore_errors=True)  # the old bundle's own files only: anything else was refused


def _record_accepted(dest: Path, manifest: UnverifiedManifest, manifest_bytes: bytes) -> None:
    """Remember the newest signed manifest installed, so that an older one is refused later (never lowered)."""
    import hashlib

    from edgetl._atomic import atomic_write_json

    path = dest / STATE_DIR / ACCEPTED
    try:
        accepted = json.loads(path.read_bytes())
    except (OSError, ValueError):
        accepted = {}
    if not isinstance(accepted, dict) or manifest.created_unix > UnverifiedManifest.of(accepted).created_unix:
        atomic_write_json(path, {"created_unix": manifest.created_unix, "created": manifest.created,
                                 "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()})
