"""Field kit: everything a device with no network needs, in one folder (and optionally one ``.tar``).

    KIT/bundle.tar.gz      the bundle, packed and verified (``edgetl.transport.pack``)
    KIT/wheels/            edgetl's wheel + every wheel of ``edgetl[EXTRA]`` for the profile's platform and Python
                           (``pip download --only-binary=:all: --platform … --python-version …``)
    KIT/install.sh         on the device: check the sums, make a venv, ``pip install --no-index --find-links wheels``,
                           install and verify the bundle
    KIT/kit.json           profile, extra, platform tags, Python, and the sha256 of every file; SHA256SUMS likewise

Built on a machine with access to the package index (the host); nothing is downloaded on the device.
"""

from __future__ import annotations

import json
import os
import platform as _platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgetl import __version__
from edgetl.errors import EdgeTLError
from edgetl.profiles import DeviceProfile, get_profile
from edgetl.registry import sha256_file

#: pip platform tags per profile ``arch`` (newest glibc first); "any" → this machine's own platform
ARCH_PLATFORMS: dict[str, tuple[str, ...]] = {
    "aarch64": ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
                "manylinux2014_aarch64"),
    "x86_64": ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
}
MIN_PYTHON = (3, 11)

Progress = Callable[[str], None]


class KitError(EdgeTLError, RuntimeError):
    """A field kit cannot be built for this profile / platform / Python."""


def _no_progress(message: str) -> None:
    return None


def kit_target(profile: str, extra: str | None = None, python: str | None = None,
               platforms: tuple[str, ...] | None = None, formats: tuple[str, ...] | None = None) -> dict[str, Any]:
    """What a kit for ``profile`` contains: {profile, extra, python, platforms}. Defaults: the first of the
    profile's backends that the bundle has an extractor for (``formats``; None: any), the Python its constraints
    name (else this interpreter's), the platform tags of its arch (``any``: this machine's)."""
    prof: DeviceProfile = get_profile(profile)
    if extra is None:
        usable = [b for b in prof.backends if formats is None or b in formats]
        if not usable:
            raise KitError(f"the bundle has extractors for {', '.join(formats or ())} but profile {prof.id} runs "
                           f"{', '.join(prof.backends)}; export one of those or pass --extra")
        extra = usable[0]
    if extra not in ("onnx", "openvino", "tflite"):
        raise KitError(f"extra {extra!r} is not a device runtime; use onnx, openvino or tflite")
    if python is None:
        named = [m.group(1) for c in prof.constraints for m in [re.search(r"Python (3\.\d+)", c)] if m]
        python = named[0] if named else f"{sys.version_info.major}.{sys.version_info.minor}"
    try:
        version = tuple(int(x) for x in python.split("."))[:2]
    except ValueError as exc:
        raise KitError(f"--python must look like 3.11, found {python!r}") from exc
    if version < MIN_PYTHON:
        raise KitError(f"profile {prof.id} has Python {python} but edgetl needs Python >= "
                       f"{'.'.join(map(str, MIN_PYTHON))}; install a newer Python on the device and pass --python")
    if platforms is None:
        arch = _platform.machine() if prof.arch == "any" else prof.arch
        if arch not in ARCH_PLATFORMS:
            raise KitError(f"no pip platform tags known for arch {arch!r} (profile {prof.id}); pass --platform")
        platforms = ARCH_PLATFORMS[arch]
    return {"profile": prof.id, "extra": extra, "python": python, "platforms": list(platforms),
            "backends": list(prof.backends)}


def lock_file() -> Path | None:
    """The repository's lock of exact versions (requirements/lock.txt), when edgetl runs from a source checkout."""
    path = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"
    return path if path.is_file() else None


def _project_root() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise KitError("edgetl is not installed from a source checkout, so its wheel cannot be built here; pass "
                       "--wheel edgetl-*.whl")
    return root


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, check=False, capture_output=True, text=True,
                            env=os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if result.returncode != 0:
        tail = " | ".join(line for line in result.stderr.strip().splitlines()[-3:])
        raise KitError(f"{what} failed: {tail or 'pip exited with ' + str(result.returncode)}")


INSTALL_SH = """#!/bin/sh
# edgetl field kit: install edgetl and the bundle on this device with no network.
#   sh install.sh [VENV_DIR] [BUNDLE_DIR]     (defaults: ./venv and ./bundle; PYTHON=python3.11 to choose Python)
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
VENV=${{1:-$KIT/venv}}
DEST=${{2:-$KIT/bundle}}
PY=${{PYTHON:-python3}}
cd "$KIT"
echo "checking the kit's files (SHA256SUMS)"
sha256sum -c --quiet SHA256SUMS
have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$have" != "{python}" ]; then
  echo "error: this kit holds wheels for Python {python}, but $PY is Python $have; run with PYTHON=python{python}" >&2
  exit 1
fi
"$PY" -m venv "$VENV"
pins=""; [ -f "$KIT/constraints.txt" ] && pins="-c $KIT/constraints.txt"
"$VENV/bin/python" -m pip install --no-index --find-links "$KIT/wheels" $pins "edgetl[{extra}]=={version}"
"$VENV/bin/edgetl" device install "$KIT/bundle.tar.gz" "$DEST"
"$VENV/bin/edgetl" device verify "$DEST" --profile {profile}
echo "installed: $VENV/bin/edgetl, bundle in $DEST"
"""


def build_kit(bundle: str | os.PathLike[str], out: str | os.PathLike[str], profile: str, extra: str | None = None,
              python: str | None = None, platforms: tuple[str, ...] | None = None,
              wheel: str | os.PathLike[str] | None = None, archive: str | os.PathLike[str] | None = None,
              progress: Progress = _no_progress) -> dict[str, Any]:
    """Write a field kit for ``profile`` into the new folder ``out`` (see the module docstring); return kit.json's
    content. ``wheel``: a prebuilt edgetl wheel (default: built from this checkout). ``archive``: also write the kit
    as one ``.tar``."""
    from edgetl.bundle import Bundle
    from edgetl.transport import pack

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise KitError(f"{out} exists and is not empty; pass a new folder for the kit")
    formats = tuple(sorted({e.format for e in Bundle.load(bundle, verify=False).manifest.extractors}))
    target = kit_target(profile, extra, python, platforms, formats)
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    progress("pack the bundle")
    pack(bundle, out / "bundle.tar.gz")
    if wheel is None:
        progress("build the edgetl wheel")
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, str(_project_root())],
                 "building the edgetl wheel")
            built = next(Path(tmp).glob("edgetl-*.whl"))
            wheel_path = Path(shutil.copy(built, wheels / built.name))
    else:
        wheel_path = Path(shutil.copy(wheel, wheels / Path(wheel).name))
    progress(f"download edgetl[{target['extra']}] wheels for {', '.join(target['platforms']) or 'this platform'} / "
             f"CPython {target['python']}")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest", str(wheels),
           "--python-version", target["python"], "--implementation", "cp"]
    for tag in target["platforms"]:
        cmd += ["--platform", tag]
    lock = lock_file()
    if lock is not None:  # the device gets the versions the tests and the recorded figures used
        shutil.copy(lock, out / "constraints.txt")
        cmd += ["-c", str(lock)]
    _run(cmd + [f"{wheel_path}[{target['extra']}]"],
         f"pip download of edgetl[{target['extra']}] for {target['profile']}")
    install = out / "install.sh"
    install.write_text(INSTALL_SH.format(python=target["python"], extra=target["extra"], version=__version__,
                                         profile=target["profile"]), encoding="utf-8")
    install.chmod(0o755)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    sums = {p.relative_to(out).as_posix(): sha256_file(p) for p in files}
    (out / "SHA256SUMS").write_text("".join(f"{h}  {name}\n" for name, h in sums.items()), encoding="utf-8")
    meta = target | {"edgetl_version": __version__, "bundle": str(bundle),
                     "wheels": sorted(p.name for p in wheels.glob("*.whl")), "files": sums,
                     "bytes": sum(p.stat().st_size for p in files)}
    (out / "kit.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if archive is not None:
        progress(f"write {archive}")
        with tarfile.open(archive, "w") as tar:
            tar.add(out, arcname=out.name)
    return meta


__all__ = ["ARCH_PLATFORMS", "KitError", "build_kit", "kit_target"]
