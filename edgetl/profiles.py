"""Device profiles: ``devices/*.toml`` read into :class:`DeviceProfile` dataclasses; detection of the current machine."""

from __future__ import annotations

import os
import platform
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgetl._resources import registry_dir
from edgetl.errors import RegistryError

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class DeviceProfile:
    """A target device: what it is, which runtimes it prefers and the limits to respect (0 = unknown / all)."""

    id: str
    description: str
    arch: str
    cores: int
    memory_mb: int
    backends: tuple[str, ...]
    onnx_providers: tuple[str, ...]
    threads: int
    precision: str
    batch_size: int
    memory_budget_mb: int
    constraints: tuple[str, ...] = field(default_factory=tuple)
    #: public key file every bundle must be signed with on this device (None: signatures optional)
    trust: str | None = None


def _parse(path: Path) -> DeviceProfile:
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
        profile = DeviceProfile(
            id=str(d["id"]), description=str(d["description"]), arch=str(d["arch"]), cores=int(d["cores"]),
            memory_mb=int(d["memory_mb"]), backends=tuple(map(str, d["backends"])),
            onnx_providers=tuple(map(str, d["onnx_providers"])), threads=int(d["threads"]),
            precision=str(d["precision"]), batch_size=int(d["batch_size"]), memory_budget_mb=int(d["memory_budget_mb"]),
            constraints=tuple(map(str, d.get("constraints", []))), trust=d.get("trust"))
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"{path}: malformed device profile ({exc!r})") from exc
    if profile.precision not in PRECISIONS:
        raise RegistryError(f"{path}: precision {profile.precision!r} is not one of {', '.join(PRECISIONS)}")
    if not profile.backends:
        raise RegistryError(f"{path}: a profile needs at least one backend")
    unknown = set(profile.backends) - {"onnx", "openvino", "tflite"}
    if unknown:
        raise RegistryError(f"{path}: unknown backends {sorted(unknown)}; use onnx, openvino, tflite")
    return profile


def list_profiles() -> list[DeviceProfile]:
    folder = registry_dir("devices")
    profiles = [_parse(p) for p in sorted(folder.glob("*.toml"))]
    if not profiles:
        raise RegistryError(f"no device profiles found in {folder}; reinstall edgetl or set EDGETL_DEVICES_DIR")
    return profiles


def get_profile(name: str) -> DeviceProfile:
    profiles = {p.id: p for p in list_profiles()}
    if name not in profiles:
        raise RegistryError(f"unknown device profile {name!r}; known: {', '.join(sorted(profiles))}")
    return profiles[name]


def detect_profile() -> DeviceProfile:
    """The profile matching this machine: a Jetson or Raspberry Pi by its device-tree model, else x86 or generic."""
    model = ""
    try:
        model = Path("/proc/device-tree/model").read_text(errors="ignore").lower()
    except OSError:
        pass
    if "raspberry pi 5" in model:
        return get_profile("raspberry-pi-5")
    if "raspberry pi 4" in model:
        return get_profile("raspberry-pi-4")
    if "orin" in model:
        return get_profile("jetson-orin-nano")
    if "jetson" in model or "nvidia" in model:
        return get_profile("jetson-nano")
    if platform.machine() in ("x86_64", "AMD64") and (os.cpu_count() or 1) >= 4:
        return get_profile("x86-ground-station")
    return get_profile("generic-cpu")
