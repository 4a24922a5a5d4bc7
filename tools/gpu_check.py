"""The Jetson path on a CUDA machine: run a bundle's ONNX extractor with the TensorRT and CUDA execution providers (as
the jetson-* profiles ask) and record throughput against the CPU provider. Without a CUDA GPU it says so and exits 0.

    python tools/gpu_check.py BUNDLE [--batch 32] [--out gpu.json]

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
    args = ap.parse_args()
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available or shutil.which("nvidia-smi") is None:
        print(f"no CUDA GPU here (onnxruntime providers: {', '.join(available)}); nothing to measure")
        return 0
    from edgetl.device import DeviceRuntime
    from edgetl.profiles import get_profile

    results = {}
    batch = np.random.default_rng(0).normal(size=(args.batch, 3, 224, 224)).astype(np.float32)
    for label, providers in (("tensorrt", list(get_profile("jetson-orin-nano").onnx_providers)),
                             ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
                             ("cpu", ["CPUExecutionProvider"])):
        rt = DeviceRuntime(args.bundle, backend="onnx", precision="fp32")
        rt.providers = providers
        size = rt.bundle.preprocessing.input_size
        x = np.ascontiguousarray(batch[:, :, :size, :size])
        start = time.perf_counter()
        rt.embed_arrays(x[:1])  # builds the session (TensorRT compiles its engine here)
        build = time.perf_counter() - start
        for _ in range(3):
            rt.embed_arrays(x)
        start = time.perf_counter()
        for _ in range(10):
            rt.embed_arrays(x)
        thr = 10 * len(x) / (time.perf_counter() - start)
        used = rt.extractor.providers  # type: ignore[attr-defined]
        results[label] = {"providers_used": used, "first_call_s": round(build, 2), "images_per_s": round(thr, 1)}
        print(label, json.dumps(results[label]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
