"""Which extractor of a bundle runs here: one decision point for backend, precision, threads and providers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edgetl.bundle import Bundle, ExtractorEntry
from edgetl.errors import BundleError, RuntimeMissingError
from edgetl.profiles import DeviceProfile, detect_profile, get_profile
from edgetl.runtime import BACKENDS, installed_backends
from edgetl.runtime.base import cap_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    entry: ExtractorEntry
    profile: DeviceProfile
    threads: int | None
    providers: list[str] | None
    reason: str


def choose(bundle: Bundle, backend: str | None = None, precision: str | None = None,
           profile: str | DeviceProfile | None = None, threads: int | None = None) -> Choice:
    """Pick the extractor: explicit ``backend``/``precision`` win; otherwise the profile's preferred backends and
    precision among the runtimes installed here and the graphs in the bundle (failed graphs never, unless named).
    A choice other than the profile's first preference is logged as a warning."""
    prof = profile if isinstance(profile, DeviceProfile) else (get_profile(profile) if profile else detect_profile())
    installed = installed_backends()
    entries = bundle.extractors()
    if backend is not None and backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend is not None and backend not in installed:
        raise RuntimeMissingError(f"the {backend} runtime is not installed here; install it: "
                                  f"pip install 'edgetl[{BACKENDS[backend][3]}]'")
    backends = [backend] if backend else [b for b in (*prof.backends, *BACKENDS) if b in installed]
    backends = list(dict.fromkeys(backends))
    precisions = [precision] if precision else list(dict.fromkeys((prof.precision, "fp32", "fp16", "int8")))
    for b in backends:
        for p in precisions:
            match = [e for e in entries if e.format == b and e.precision == p]
            if not match:
                continue
            entry = match[0]
            if entry.failed and not (backend and precision):
                continue
            first = (prof.backends[0], prof.precision)
            reason = f"profile {prof.id} prefers {first[0]}/{first[1]}"
            if (b, p) != first and not (backend or precision):
                log.warning("using %s/%s: %s, which %s", b, p, reason,
                            "is not installed here" if first[0] not in installed else "this bundle lacks")
            providers = list(prof.onnx_providers) if b == "onnx" else None
            return Choice(entry, prof, cap_threads(threads) or (prof.threads or None), providers, reason)
    have = ", ".join(f"{e.format}/{e.precision}" + (" (failed)" if e.failed else "") for e in entries)
    wanted = f"{backend or 'any backend'}/{precision or 'any precision'}"
    if backend is None and not installed:
        raise RuntimeMissingError("no inference runtime is installed; install one: pip install 'edgetl[onnx]'")
    extras = sorted({BACKENDS[e.format][3] for e in entries if e.format in BACKENDS} - set(installed))
    hint = f"; or install a runtime for them: pip install 'edgetl[{','.join(extras)}]'" if extras else ""
    failed = [e for e in entries if e.failed and e.format in installed and
              (backend in (None, e.format)) and (precision in (None, e.precision))]
    if failed:  # a failed graph is used only when named exactly: say how, and what that means
        e = failed[0]
        why = e.reason or "see `edgetl device info`"
        hint += (f"; {e.format}/{e.precision} failed the export gate ({why}): to use it anyway, name it with "
                 f"--backend {e.format} --precision {e.precision}")
    raise BundleError(f"bundle {bundle.path} has no usable {wanted} extractor for the runtimes installed here "
                      f"({', '.join(installed) or 'none'}); it has {have}{hint}")
