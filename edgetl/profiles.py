"""Device profiles: ``devices/*.toml`` read into :class:`DeviceProfile` dataclasses; detection of the current machine.

Each profile says which machines it describes in its ``detect`` table (:class:`DetectRule`: a substring of the
device-tree model, the CPU architecture, a minimum number of cores; one profile is the ``fallback``);
:func:`detect_profile` tries the rules against this machine's :class:`MachineFacts`.

A profile also carries the board's memory (``memory_mb``, the smallest common variant), the RSS edgetl may use
(``memory_budget_mb``, absent = unlimited) and published per-image latency figures (``[[latency]]`` tables, each with
its source) that ``edgetl device bench`` compares its measurement with (:func:`expected_latency`).
"""

from __future__ import annotations

import math
import os
import platform
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgetl._resources import registry_dir
from edgetl.errors import RegistryError

PRECISIONS = ("fp32", "fp16", "int8")
#: precisions a published figure may have: a source that does not say is recorded as "unknown"
LATENCY_PRECISIONS = (*PRECISIONS, "unknown")
#: where a published figure ran
LATENCY_UNITS = ("cpu", "gpu")
#: measured / expected inside this factor (either way) counts as "as expected"
LATENCY_TOLERANCE = 1.5


@dataclass(frozen=True)
class LatencyFigure:
    """One published per-image latency on a device (batch 1), with where it comes from and what exactly was measured.

    ``runtime`` is free text on purpose (a figure from ncnn or TensorRT is still a useful yardstick for onnx/tflite);
    ``threads`` 0 means the source does not say.
    """

    model: str
    runtime: str
    unit: str
    precision: str
    input_size: int
    threads: int
    ms: float
    source: str
    measured: str


@dataclass(frozen=True)
class MachineFacts:
    """What :func:`detect_profile` knows about a machine."""

    #: ``/proc/device-tree/model``, lower-cased ("" where there is none, e.g. on x86)
    model: str
    #: :func:`platform.machine` (``x86_64``, ``AMD64``, ``aarch64`` …)
    machine: str
    #: :func:`os.cpu_count`
    cores: int

    @classmethod
    def here(cls) -> MachineFacts:
        """The facts of the machine this runs on."""
        model = ""
        try:
            model = Path("/proc/device-tree/model").read_text(errors="ignore").lower()
        except OSError:
            pass
        return cls(model=model, machine=platform.machine(), cores=os.cpu_count() or 1)


@dataclass(frozen=True)
class DetectRule:
    """When a profile describes a machine (its ``detect`` table). Every fact the rule names must hold: the
    device-tree model contains one of ``model_contains`` (case-insensitive), the architecture is one of ``machine``,
    there are at least ``min_cores`` cores. Rules are tried from the highest ``priority`` down (ties by profile id),
    so a narrower rule that overlaps a broader one needs the higher priority (``orin`` over ``nvidia``). A
    ``fallback`` rule names no facts and is taken when no other rule matches."""

    model_contains: tuple[str, ...] = ()
    machine: tuple[str, ...] = ()
    min_cores: int = 0
    priority: int = 0
    fallback: bool = False

    def matches(self, facts: MachineFacts) -> bool:
        """Whether ``facts`` satisfy every fact this rule names (a fallback matches any machine)."""
        model = facts.model.lower()
        return ((not self.model_contains or any(s.lower() in model for s in self.model_contains))
                and (not self.machine or facts.machine in self.machine)
                and facts.cores >= self.min_cores)


@dataclass(frozen=True)
class DeviceProfile:
    """A target device: what it is, which runtimes it prefers and the limits to respect (0 = unknown / all)."""

    id: str
    description: str
    arch: str
    cores: int
    #: the board's RAM in MB (the smallest common variant where a board comes in several; 0 = unknown)
    memory_mb: int
    backends: tuple[str, ...]
    onnx_providers: tuple[str, ...]
    threads: int
    precision: str
    batch_size: int
    #: the resident memory edgetl may use on this device, MB (None: unlimited); see :mod:`edgetl.budget`
    memory_budget_mb: int | None = None
    constraints: tuple[str, ...] = field(default_factory=tuple)
    #: public key file every bundle must be signed with on this device (None: signatures optional)
    trust: str | None = None
    #: every RAM size the board is sold with, MB (``memory_mb`` is the one this profile assumes)
    memory_variants_mb: tuple[int, ...] = field(default_factory=tuple)
    #: published latency figures (``[[latency]]``); empty where none was found
    latency: tuple[LatencyFigure, ...] = field(default_factory=tuple)
    #: the machines this profile describes (None: :func:`detect_profile` never picks it)
    detect: DetectRule | None = None


def _field(path: Path, where: str, d: dict[str, Any], key: str, kind: type, *, default: Any = ...) -> Any:
    """``d[key]`` checked to be a ``kind`` (a bool is never an int, an int is a float); one-line error naming file and
    field otherwise."""
    if key not in d:
        if default is not ...:
            return default
        raise RegistryError(f"{path}: {where}{key} is missing")
    value = d[key]
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise RegistryError(f"{path}: {where}{key} must be {kind.__name__}, found {value!r}")
    return value


def _parse_latency(path: Path, i: int, d: Any) -> LatencyFigure:
    where = f"latency[{i}]."
    if not isinstance(d, dict):
        raise RegistryError(f"{path}: latency[{i}] must be a table ([[latency]]), found {d!r}")
    unknown = set(d) - set(LatencyFigure.__dataclass_fields__)
    if unknown:
        raise RegistryError(f"{path}: {where}{min(unknown)} is not a latency field; use "
                            f"{', '.join(LatencyFigure.__dataclass_fields__)}")
    fig = LatencyFigure(
        model=_field(path, where, d, "model", str), runtime=_field(path, where, d, "runtime", str),
        unit=_field(path, where, d, "unit", str, default="cpu"), precision=_field(path, where, d, "precision", str),
        input_size=_field(path, where, d, "input_size", int), threads=_field(path, where, d, "threads", int, default=0),
        ms=_field(path, where, d, "ms", float), source=_field(path, where, d, "source", str),
        measured=_field(path, where, d, "measured", str))
    if not fig.model.strip() or not fig.runtime.strip():
        raise RegistryError(f"{path}: {where}model and runtime must not be empty")
    if fig.unit not in LATENCY_UNITS:
        raise RegistryError(f"{path}: {where}unit {fig.unit!r} is not one of {', '.join(LATENCY_UNITS)}")
    if fig.precision not in LATENCY_PRECISIONS:
        raise RegistryError(f"{path}: {where}precision {fig.precision!r} is not one of {', '.join(LATENCY_PRECISIONS)}")
    if not 16 <= fig.input_size <= 4096:
        raise RegistryError(f"{path}: {where}input_size must be 16..4096 pixels, found {fig.input_size}")
    if fig.threads < 0:
        raise RegistryError(f"{path}: {where}threads must be >= 0 (0 = not stated), found {fig.threads}")
    if not (math.isfinite(fig.ms) and fig.ms > 0):
        raise RegistryError(f"{path}: {where}ms must be a positive number, found {fig.ms!r}")
    if not fig.source.startswith(("https://", "http://")):
        raise RegistryError(f"{path}: {where}source must be the figure's URL, found {fig.source!r}")
    if not fig.measured.strip():
        raise RegistryError(f"{path}: {where}measured must say what was measured (runtime version, clock, runs)")
    return fig


def _strings(path: Path, where: str, d: dict[str, Any], key: str) -> tuple[str, ...]:
    """``d[key]``, a list of non-empty strings (empty when absent)."""
    values = _field(path, where, d, key, list, default=[])
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise RegistryError(f"{path}: {where}{key} must be a list of non-empty strings, found {values!r}")
    return tuple(values)


def _parse_detect(path: Path, d: Any) -> DetectRule:
    where = "detect."
    if not isinstance(d, dict):
        raise RegistryError(f"{path}: detect must be a table, e.g. detect = {{ model_contains = [\"orin\"] }}, found "
                            f"{d!r}")
    known = DetectRule.__dataclass_fields__
    unknown = set(d) - set(known)
    if unknown:
        raise RegistryError(f"{path}: {where}{min(unknown)} is not a detect field; use {', '.join(known)}")
    fallback = d.get("fallback", False)
    if not isinstance(fallback, bool):
        raise RegistryError(f"{path}: {where}fallback must be true or false, found {fallback!r}")
    rule = DetectRule(model_contains=_strings(path, where, d, "model_contains"),
                      machine=_strings(path, where, d, "machine"),
                      min_cores=_field(path, where, d, "min_cores", int, default=0),
                      priority=_field(path, where, d, "priority", int, default=0), fallback=fallback)
    facts = rule.model_contains or rule.machine or rule.min_cores
    if rule.min_cores < 0:
        raise RegistryError(f"{path}: {where}min_cores must be >= 0, found {rule.min_cores}")
    if fallback and facts:
        raise RegistryError(f"{path}: a fallback detect rule matches any machine; leave out model_contains, machine "
                            "and min_cores")
    if not fallback and not facts:
        raise RegistryError(f"{path}: detect must name model_contains, machine or min_cores (or be fallback = true)")
    return rule


def _parse(path: Path) -> DeviceProfile:
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
        budget = d.get("memory_budget_mb")
        profile = DeviceProfile(
            id=str(d["id"]), description=str(d["description"]), arch=str(d["arch"]), cores=int(d["cores"]),
            memory_mb=int(d["memory_mb"]), backends=tuple(map(str, d["backends"])),
            onnx_providers=tuple(map(str, d["onnx_providers"])), threads=int(d["threads"]),
            precision=str(d["precision"]), batch_size=int(d["batch_size"]),
            memory_budget_mb=None if budget is None else int(budget),
            constraints=tuple(map(str, d.get("constraints", []))), trust=d.get("trust"),
            memory_variants_mb=tuple(int(v) for v in d.get("memory_variants_mb", [])))
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"{path}: malformed device profile ({exc!r})") from exc
    if profile.precision not in PRECISIONS:
        raise RegistryError(f"{path}: precision {profile.precision!r} is not one of {', '.join(PRECISIONS)}")
    if not profile.backends:
        raise RegistryError(f"{path}: a profile needs at least one backend")
    unknown = set(profile.backends) - {"onnx", "openvino", "tflite"}
    if unknown:
        raise RegistryError(f"{path}: unknown backends {sorted(unknown)}; use onnx, openvino, tflite")
    if profile.memory_mb < 0:
        raise RegistryError(f"{path}: memory_mb must be >= 0 (0 = unknown), found {profile.memory_mb}")
    if profile.memory_budget_mb is not None:
        if profile.memory_budget_mb <= 0:
            raise RegistryError(f"{path}: memory_budget_mb must be positive (leave it out for unlimited), found "
                                f"{profile.memory_budget_mb}")
        if profile.memory_mb and profile.memory_budget_mb > profile.memory_mb:
            raise RegistryError(f"{path}: memory_budget_mb {profile.memory_budget_mb} exceeds the board's memory_mb "
                                f"{profile.memory_mb}")
    if profile.memory_variants_mb and (min(profile.memory_variants_mb) <= 0
                                       or profile.memory_mb not in profile.memory_variants_mb):
        raise RegistryError(f"{path}: memory_variants_mb must be positive sizes that include memory_mb "
                            f"({profile.memory_mb}), found {list(profile.memory_variants_mb)}")
    entries = d.get("latency", [])
    if not isinstance(entries, list):
        raise RegistryError(f"{path}: latency must be an array of tables ([[latency]]), found {entries!r}")
    figures = tuple(_parse_latency(path, i, e) for i, e in enumerate(entries))
    detect = _parse_detect(path, d["detect"]) if "detect" in d else None
    return replace(profile, latency=figures, detect=detect)


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


def detect_profile(facts: MachineFacts | None = None) -> DeviceProfile:
    """The profile whose ``detect`` rule matches this machine (or ``facts``): the rules by descending priority,
    then the fallback profile (generic-cpu)."""
    facts = facts if facts is not None else MachineFacts.here()
    profiles = list_profiles()
    ruled = sorted((p for p in profiles if p.detect is not None and not p.detect.fallback),
                   key=lambda p: (-p.detect.priority, p.id))  # type: ignore[union-attr]
    for profile in ruled:
        if profile.detect.matches(facts):  # type: ignore[union-attr]
            return profile
    fallback = [p for p in profiles if p.detect is not None and p.detect.fallback]
    if len(fallback) != 1:
        found = f"{len(fallback)} do ({', '.join(p.id for p in fallback)})" if fallback else "none does"
        raise RegistryError(f"no device profile matches this machine and exactly one must be the fallback "
                            f"(detect = {{ fallback = true }}), but {found}; pass --profile or fix "
                            f"{registry_dir('devices')}")
    return fallback[0]


# ------------------------------------------------------------------------------------------------ expected latency
@dataclass(frozen=True)
class Expectation:
    """What a profile's published figures say one image should take, next to what was measured.

    ``expected_ms`` is the chosen figure scaled to the measured input size by pixel count ((size / figure size)²,
    the cost of a convolutional backbone being proportional to its pixels); ``notes`` says every way the figure
    differs from the measurement (runtime, precision, threads, unit, input size), so a user can judge how far to
    trust the verdict.
    """

    figure: LatencyFigure
    expected_ms: float
    measured_ms: float | None
    scaled: bool
    exact: bool
    notes: tuple[str, ...]

    @property
    def ratio(self) -> float | None:
        """measured / expected (None without a measurement)."""
        return None if self.measured_ms is None else self.measured_ms / self.expected_ms

    @property
    def verdict(self) -> str:
        """``within``, ``slower`` or ``faster`` (by more than :data:`LATENCY_TOLERANCE`), or ``unmeasured``."""
        r = self.ratio
        if r is None:
            return "unmeasured"
        if r > LATENCY_TOLERANCE:
            return "slower"
        if r < 1 / LATENCY_TOLERANCE:
            return "faster"
        return "within"

    def line(self) -> str:
        """One line for a person: the expectation, its source and the verdict."""
        f = self.figure
        threads = f"{f.threads} thread{'s' if f.threads > 1 else ''}" if f.threads else "threads not stated"
        head = (f"expected  ~{self.expected_ms:.1f} ms/image ({f.runtime} {f.precision} {f.unit}, {f.input_size}px, "
                f"{threads}: {f.ms:g} ms; {f.source})")
        r = self.ratio
        if r is None:
            verdict = "no measurement to compare"
        elif self.verdict == "within":
            verdict = f"within expectation ({r:.2f}x of it)"
        elif self.verdict == "slower":
            verdict = f"SLOWER than expected by {r:.1f}x: check the clock (throttling, power supply), threads and runtime"
        else:
            verdict = f"faster than expected by {1 / r:.1f}x"
        scaled = [n for n in self.notes if n.startswith("scaled")]
        if scaled:
            head += f"\n          {scaled[0]}"
        caveat = "" if self.exact else f" [indicative only: {'; '.join(n for n in self.notes if n not in scaled)}]"
        return f"{head}\nverdict   {verdict}{caveat}"

    def as_dict(self) -> dict[str, Any]:
        f = self.figure
        return {"expected_ms": round(self.expected_ms, 3), "ratio": None if self.ratio is None else round(self.ratio, 3),
                "verdict": self.verdict, "exact": self.exact, "scaled": self.scaled, "notes": list(self.notes),
                "figure": {"model": f.model, "runtime": f.runtime, "unit": f.unit, "precision": f.precision,
                           "input_size": f.input_size, "threads": f.threads, "ms": f.ms, "source": f.source,
                           "measured": f.measured}}


def expected_latency(profile: DeviceProfile, model: str, runtime: str, precision: str, input_size: int,
                     unit: str = "cpu", threads: int | None = None,
                     measured_ms: float | None = None) -> Expectation | None:
    """The closest of ``profile``'s published figures for ``model`` (the backbone id, e.g. ``mobilenet_v2``), or None
    where the profile has none for that model.

    Closest means, in this order: same runtime, same compute unit (cpu/gpu), same precision, same thread count,
    nearest input size. A figure for another input size is scaled by (input_size / its size)².
    """
    candidates = [f for f in profile.latency if f.model == model]
    if not candidates:
        return None

    def rank(f: LatencyFigure) -> tuple[int, int, int, int, float]:
        return (f.runtime != runtime, f.unit != unit, f.precision != precision,
                bool(threads) and f.threads != threads, abs(math.log(f.input_size / input_size)))

    best = min(candidates, key=rank)
    scale = (input_size / best.input_size) ** 2
    notes = []
    if best.runtime != runtime:
        notes.append(f"figure is {best.runtime}, this run {runtime}")
    if best.unit != unit:
        notes.append(f"figure ran on the {best.unit}, this run on the {unit}")
    if best.precision != precision:
        notes.append(f"figure is {best.precision}, this run {precision}")
    if threads and best.threads and best.threads != threads:
        notes.append(f"figure used {best.threads} threads, this run {threads}")
    if scale != 1.0:
        notes.append(f"scaled from {best.input_size}px to {input_size}px by pixel count (x{scale:.2f})")
    exact = not any(n for n in notes if not n.startswith("scaled"))
    return Expectation(figure=best, expected_ms=best.ms * scale, measured_ms=measured_ms, scaled=scale != 1.0,
                       exact=exact, notes=tuple(notes))
