"""``edgetl device bench``: one JSON object of speed and memory figures, measured the same way every time.

Cold start is a new Python process from its start to its first embedding (wall time, measured outside it); warm
latency is batch 1 after warm-up; throughput at the given batch; peak RSS is that of a separate process that loads
the bundle and runs the warm measurements (so this process's own memory never counts); head training is the time to fit
the current head's kind on the embeddings in the store.

Emulation gives no speed, so the result also carries what the device profile's published figures say one image should
take (``expected``: the closest ``[[latency]]`` entry of the profile for the bundle's backbone, scaled to its input
size; see :func:`edgetl.profiles.expected_latency` and devices/latency.md) and a verdict on the measured batch-1 p50:
on a real board a "slower" verdict points at throttling, a weak power supply, the wrong thread count or runtime build.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: the module a measurement process runs: ``python -m edgetl.bench ARGS-JSON`` (see :func:`main`)
CHILD_MODULE = "edgetl.bench"


def _runtime(args: dict[str, Any]) -> Any:
    from edgetl.device import DeviceRuntime

    return DeviceRuntime(args["bundle"], backend=args["backend"], precision=args["precision"], threads=args["threads"],
                         profile=args["profile"])


def _random_batch(rt: Any, n: int) -> Any:
    """``n`` random uint8 images of the bundle's input size, preprocessed as the device does: ``(n, 3, S, S)``."""
    import numpy as np

    from edgetl.preprocess import preprocess_batch

    pp = rt.bundle.preprocessing
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (pp.input_size, pp.input_size, 3), dtype=np.uint8) for _ in range(n)]
    return preprocess_batch(images, pp)


def _warm_figures(rt: Any, batch: Any, runs: int) -> dict[str, Any]:
    """Batch-1 latency over ``runs`` calls after 5 warm-up calls, throughput at ``batch``, and this process's peak
    RSS."""
    import resource

    import numpy as np

    one = batch[:1]
    for _ in range(5):
        rt.embed_arrays(one)
    lat = []
    for _ in range(runs):
        t = time.perf_counter()
        rt.embed_arrays(one)
        lat.append(time.perf_counter() - t)
    rt.embed_arrays(batch)
    reps = max(1, runs // 10)
    t = time.perf_counter()
    for _ in range(reps):
        rt.embed_arrays(batch)
    thr = reps * len(batch) / (time.perf_counter() - t)
    return {"latency_ms_p50": 1000 * float(np.median(lat)), "latency_ms_p95": 1000 * float(np.percentile(lat, 95)),
            "images_per_s": thr, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "backend": rt.backend, "precision": rt.precision, "file": rt.entry.file, "threads": rt.threads,
            "providers": list(getattr(rt.extractor, "providers", None) or [])}


def measure(args: dict[str, Any]) -> dict[str, Any]:
    """What one measurement process reports: ``mode`` "cold" stops at the first embedding (``{"dim": D}``), "warm"
    goes on to :func:`_warm_figures`. ``args``: bundle, backend, precision, threads, profile, batch, runs, mode."""
    rt = _runtime(args)
    batch = _random_batch(rt, args["batch"])
    first = rt.embed_arrays(batch[:1])
    if args["mode"] == "cold":
        return {"dim": int(first.shape[1])}
    return _warm_figures(rt, batch, args["runs"])


def main(argv: list[str] | None = None) -> None:
    """``python -m edgetl.bench ARGS-JSON``: :func:`measure`, printed as one JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m edgetl.bench ARGS-JSON (run by edgetl device bench: see edgetl.bench.measure)")
    print(json.dumps(measure(json.loads(argv[0]))))


def _child(args: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Run :func:`measure` in a new Python process; its output and its wall time from start to exit."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", CHILD_MODULE, json.dumps(args)], capture_output=True, text=True,
                         check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        from edgetl.errors import StateError

        raise StateError(f"benchmark process failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def bench(bundle: str | Path, backend: str | None = None, precision: str | None = None, threads: int | None = None,
          batch: int = 32, runs: int = 100, profile: str | None = None, cold_runs: int = 3) -> dict[str, Any]:
    """Measure the bundle's chosen extractor; see the module docstring for what each figure means."""
    import numpy as np

    from edgetl.device import DeviceRuntime

    rt = DeviceRuntime(bundle, backend=backend, precision=precision, threads=threads, profile=profile)
    args = {"bundle": str(bundle), "backend": rt.backend, "precision": rt.precision, "threads": threads,
            "profile": profile, "batch": batch, "runs": runs, "mode": "cold"}
    cold = [_child(args)[1] for _ in range(cold_runs)]
    warm, _ = _child(args | {"mode": "warm"})
    result: dict[str, Any] = warm | {"cold_start_s": float(np.median(cold)), "batch": batch, "runs": runs}
    result |= _head_figures(rt)
    result = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}
    result["profile"] = rt.profile.id
    result["expected"] = _expected(rt, result)
    return result


#: execution providers that run the graph on a GPU (anything else counts as the CPU)
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider")


def _expected(rt: Any, result: dict[str, Any]) -> dict[str, Any] | None:
    """The profile's expectation for this run as JSON (None where the profile has no figure for the backbone)."""
    from edgetl.profiles import expected_latency

    providers = result.get("providers") or []
    unit = "gpu" if providers and providers[0] in GPU_PROVIDERS else "cpu"
    exp = expected_latency(rt.profile, rt.bundle.manifest.backbone.id, rt.backend, rt.precision,
                           int(rt.bundle.preprocessing.input_size), unit=unit, threads=result.get("threads"),
                           measured_ms=result.get("latency_ms_p50"))
    return None if exp is None else exp.as_dict() | {"line": exp.line()}


def _head_figures(rt: Any) -> dict[str, Any]:
    """The current head: seconds to refit its kind (same parameters) on its stored training embeddings, batch-1
    predict latency on an embedding, and its file size (all None without a head trained on the device)."""
    import numpy as np

    from edgetl.errors import EdgeTLError
    from edgetl.heads import load_head, make_head

    none = {"head_fit_s": None, "head_fit_n": 0, "head_predict_ms": None, "head_bytes": None}
    version = rt.state.current()
    if version is None:
        return none
    try:
        X, _, labels, _ = rt.training_set()
    except EdgeTLError:
        return none
    kind, params = rt.versions.head_spec()
    start = time.perf_counter()
    make_head(kind, **params).fit(X, labels)
    fit_s = time.perf_counter() - start
    head = load_head(rt.state.head_file(version))
    one = X[:1]
    for _ in range(10):
        head.predict_proba(one)
    start = time.perf_counter()
    for _ in range(200):
        head.predict_proba(one)
    predict_ms = (time.perf_counter() - start) / 200 * 1e3
    return {"head_fit_s": fit_s, "head_fit_n": len(X), "head_predict_ms": predict_ms,
            "head_bytes": rt.state.head_file(version).stat().st_size, "head_kind": kind,
            "head_features": int(np.asarray(getattr(head, "columns_", np.empty(X.shape[1]))).size)}


if __name__ == "__main__":
    main()
