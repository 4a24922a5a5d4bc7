"""What this machine is and which of a bundle's extractors can run on it (and why not)."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edgetl.profiles import detect_profile
from edgetl.runtime import BACKENDS

#: backend → distribution names that provide it (first installed wins)
_DISTRIBUTIONS = {"onnx": ("onnxruntime", "onnxruntime-gpu"), "openvino": ("openvino",),
                  "tflite": ("ai-edge-litert", "tflite-runtime")}


def _memory_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def runtimes() -> dict[str, dict[str, Any]]:
    """Installed inference runtimes with versions (and ONNX Runtime's execution providers)."""
    found: dict[str, dict[str, Any]] = {}
    for backend, dists in _DISTRIBUTIONS.items():
        for dist in dists:
            try:
                found[backend] = {"package": dist, "version": version(dist)}
                break
            except PackageNotFoundError:
                continue
    if "onnx" in found and importlib.util.find_spec("onnxruntime"):
        import onnxruntime

        found["onnx"]["providers"] = onnxruntime.get_available_providers()
    return found


def machine() -> dict[str, Any]:
    libc, libc_version = platform.libc_ver()
    return {"arch": platform.machine(), "cores": os.cpu_count(), "memory_mb": _memory_mb(),
            "python": platform.python_version(), "libc": f"{libc} {libc_version}".strip(),
            "os": platform.platform(), "runtimes": runtimes(), "suggested_profile": detect_profile().id}


def _glibc_at_least(major: int, minor: int) -> bool:
    libc, ver = platform.libc_ver()
    if libc != "glibc" or not ver:
        return True  # unknown: do not claim a problem
    parts = [int(p) for p in ver.split(".")[:2] if p.isdigit()]
    return tuple(parts) >= (major, minor)


def bundle_report(bundle: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """For each extractor of the bundle: can it run here, and if not, why (and what to install)."""
    from edgetl.bundle import Bundle

    b = Bundle.load(bundle)
    have = runtimes()
    rows = []
    for e in b.extractors():
        reasons = []
        if e.failed:
            reasons.append(f"failed the export accuracy gate ({e.reason or ''})")
        if e.format not in have:
            extra = BACKENDS[e.format][3] if e.format in BACKENDS else e.format
            hint = f"pip install 'edgetl[{extra}]'"
            if e.format == "openvino" and platform.machine() in ("aarch64", "arm64") and not _glibc_at_least(2, 35):
                hint = "OpenVINO aarch64 wheels need glibc ≥ 2.35; use the onnx or tflite graph"
            elif e.format == "tflite" and sys.version_info < (3, 10):
                hint = "pip install tflite-runtime (ai-edge-litert needs Python ≥ 3.10)"
            reasons.append(f"{e.format} runtime not installed ({hint})")
        rows.append({"file": e.file, "format": e.format, "precision": e.precision, "runnable": not reasons,
                     "why_not": "; ".join(reasons)})
    return rows
