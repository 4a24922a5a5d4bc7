"""The Jetson path on a CUDA machine: run a bundle's ONNX extractor with the TensorRT and CUDA execution providers (as
the jetson-* profiles ask) and record throughput against the CPU provider. Without a CUDA GPU it says so and exits 0.

    python tools/gpu_check.py BUNDLE [--batch 32] [--precisions fp32 fp16] [--out gpu.json]

Per precision and provider list (CPU; the jetson-orin-nano profile's TensorRT → CUDA → CPU; CUDA → CPU): the providers
ONNX Runtime actually used, the first call (session build, golden-vector check), batch throughput, and the smallest
cosine of the embeddings against CPU FP32.

Needs onnxruntime-gpu (Jetson: NVIDIA's builds for JetPack; x86: `pip install onnxruntime-gpu`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    args = ap.parse_args()
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available or shutil.which("nvidia-smi") is None:
        print(f"no CUDA GPU here (onnxruntime providers: {', '.join(available)}); nothing to measure")
        return 0
    from edgetl.device import DeviceRuntime
    from edgetl.errors import EdgeTLError
    from edgetl.profiles import get_profile

    results: dict[str, dict] = {"environment": {"onnxruntime": ort.__version__, "available": available}}
    batch = np.random.default_rng(0).normal(size=(args.batch, 3, 224, 224)).astype(np.float32)
    reference = None
    for precision in args.precisions:
        for label, providers in (("cpu", ["CPUExecutionProvider"]),
                                 ("jetson-profile", list(get_profile("jetson-orin-nano").onnx_providers)),
                                 ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])):
            key = f"{precision}/{label}"
            rt = DeviceRuntime(args.bundle, backend="onnx", precision=precision)
            rt.providers = providers
            size = rt.bundle.preprocessing.input_size
            x = np.ascontiguousarray(batch[:, :, :size, :size])
            start = time.perf_counter()
            try:
                first = rt.embed_arrays(x)  # builds the session (TensorRT would compile its engine here) + golden check
            except EdgeTLError as exc:  # e.g. the golden vectors not reproduced on this provider
                results[key] = {"error": str(exc)}
                print(key, json.dumps(results[key]), flush=True)
                continue
            build = time.perf_counter() - start
            for _ in range(3):
                rt.embed_arrays(x)
            start = time.perf_counter()
            for _ in range(20):
                rt.embed_arrays(x)
            thr = 20 * len(x) / (time.perf_counter() - start)
            if reference is None:
                reference = first  # CPU FP32 of the first precision
            cos = (first * reference).sum(1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(reference, axis=1))
            results[key] = {"providers_used": rt.extractor.providers,  # type: ignore[attr-defined]
                            "first_call_s": round(build, 2), "images_per_s": round(thr, 1),
                            "golden": rt.verify(), "min_cosine_vs_cpu_fp32": float(cos.min())}
            print(key, json.dumps(results[key]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
