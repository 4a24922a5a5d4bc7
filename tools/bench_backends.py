"""Backend × precision comparison on Fashion-MNIST, in one run, for each registry backbone.

For every graph the export produced (ONNX Runtime, OpenVINO, LiteRT; FP32 / FP16 / INT8) and for PyTorch eager FP32:
device-head accuracy (softmax head trained on 1,000 official training images, tested on 1,000 official test images),
file size, batch-1 latency (median of 50) and batch-32 throughput with 1 and 2 threads, and each result's fraction of
this CPU's peak multiply-accumulate rate (the backbone's MACs counted on the PyTorch model).

    python tools/bench_backends.py --out docs/results/backends.json

Needs the host extra (all exporters) and Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.data import load_image, scan_image_folder
from edgetl.datasets.fashion_mnist import write_image_folder
from edgetl.device import DeviceRuntime
from edgetl.heads import SoftmaxHead
from edgetl.host.export import export
from edgetl.preprocess import preprocess_batch


def timing(fn: Any, batch1: np.ndarray, batch32: np.ndarray, runs: int = 50) -> dict[str, float]:
    for _ in range(5):
        fn(batch1)
    lat = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(batch1)
        lat.append(time.perf_counter() - t)
    fn(batch32)
    t = time.perf_counter()
    reps = 5
    for _ in range(reps):
        fn(batch32)
    thr = reps * len(batch32) / (time.perf_counter() - t)
    return {"latency_ms_p50": round(1000 * float(np.median(lat)), 2),
            "latency_ms_p95": round(1000 * float(np.percentile(lat, 95)), 2), "images_per_s_b32": round(thr, 1)}


def count_macs(net: Any, size: int) -> int:
    """Multiply-accumulates of one forward pass at ``size`` px (Conv2d and Linear layers)."""
    import torch

    total = 0

    def conv(m: Any, inp: Any, out: Any) -> None:
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m: Any, inp: Any, out: Any) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
             for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return total


def cpu_peak() -> dict[str, Any]:
    """Peak MAC/s per core from /proc/cpuinfo: 2 FMA pipes × FP32 lanes of the vector datapath × clock; INT8 with
    VNNI is 4× the FP32 rate (4 int8 products per 32-bit lane). AMD Zen 4 executes AVX-512 on a 256-bit datapath."""
    info = Path("/proc/cpuinfo").read_text()
    flags = set(next(line for line in info.splitlines() if line.startswith("flags")).split())
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    mhz = max(float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz"))
    lanes = 16 if "avx512f" in flags and "AMD" not in model else 8 if "avx2" in flags or "avx512f" in flags else 4
    fp32 = 2 * lanes * mhz * 1e6
    int8 = fp32 * (4 if ("avx512_vnni" in flags or "avx_vnni" in flags) else 2)
    return {"cpu": model, "mhz": mhz, "fp32_lanes": lanes, "vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
            "peak_fp32_macs_per_core": fp32, "peak_int8_macs_per_core": int8,
            "assumption": "2 FMA pipes x FP32 lanes x clock; INT8 = 4x FP32 with VNNI (2x without)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/backends.json"))
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    ap.add_argument("--formats", nargs="+", default=["onnx", "openvino", "tflite"])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    import torch

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="edgetl-bench-"))
    train_dir, test_dir = work / "train", work / "test"
    write_image_folder(train_dir, "train", args.per_class, 0)
    write_image_folder(test_dir, "test", args.per_class, 0)
    train, test = scan_image_folder(train_dir), scan_image_folder(test_dir)
    peak = cpu_peak()
    results: dict[str, Any] = {"threads": args.threads, "train": len(train), "test": len(test), "cpu": peak,
                               "models": {}}
    for model in args.models:
        start = time.perf_counter()
        log(f"{model}: exporting {args.formats} x fp32/fp16/int8")
        bundle = export(work / f"{model}.bundle", train_dir, model=model, formats=args.formats,
                        precisions=("fp32", "fp16", "int8"), keep_failed=True,
                        progress=lambda stage, done, total: log(f"  export {done}/{total}"))
        export_s = time.perf_counter() - start
        manifest = json.loads((bundle / "manifest.json").read_text())
        pp = DeviceRuntime(bundle, backend="onnx", precision="fp32").bundle.preprocessing
        sample = preprocess_batch([load_image(p) for p in test.paths[:32]], pp)
        rows: list[dict[str, Any]] = []

        # PyTorch eager FP32, same images, same head
        from edgetl.host.backbone import build_backbone
        from edgetl.registry import get_backbone

        net = build_backbone(get_backbone(model)).features.eval()
        macs = count_macs(net, pp.input_size)

        def timings(fn: Any, precision: str) -> dict[str, Any]:
            out: dict[str, Any] = {}
            rate = peak["peak_int8_macs_per_core"] if precision == "int8" else peak["peak_fp32_macs_per_core"]
            for t in args.threads:
                torch.set_num_threads(t)
                r = timing(fn(t), sample[:1], sample)
                out[f"t{t}"] = r | {"fraction_of_peak_b32": round(r["images_per_s_b32"] * macs / (rate * t), 4)}
            return out

        def torch_embed(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return net(torch.from_numpy(x)).numpy()

        def embed_all(fn: Any, paths: list[Path]) -> np.ndarray:
            out = []
            for i in range(0, len(paths), 32):
                out.append(fn(preprocess_batch([load_image(p) for p in paths[i:i + 32]], pp)))
            return np.concatenate(out)

        Xtr, Xte = embed_all(torch_embed, train.paths), embed_all(torch_embed, test.paths)
        acc = float((SoftmaxHead().fit(Xtr, train.labels).predict(Xte) == test.labels).mean())
        rows.append({"graph": "pytorch eager", "precision": "fp32", "accuracy": acc, "size_mb": None}
                    | timings(lambda t: torch_embed, "fp32"))
        log(json.dumps(rows[-1]))
        for entry in manifest["extractors"]:
            rt = DeviceRuntime(bundle, backend=entry["format"], precision=entry["precision"])
            rt.train(train_dir, val_split=0.0)
            acc = rt.evaluate(test_dir)["accuracy"]

            def runner(t: int, entry: dict[str, Any] = entry) -> Any:
                return DeviceRuntime(bundle, backend=entry["format"], precision=entry["precision"],
                                     threads=t).embed_arrays
            rows.append({"graph": entry["format"], "precision": entry["precision"], "file": entry["file"],
                         "accuracy": acc, "size_mb": round(entry["report"]["size_bytes"] / 1e6, 2),
                         "gate_drop_points": entry["report"]["drop_points"], "gate_passed": entry["report"]["passed"],
                         "gate_mean_cosine": round(entry["report"]["mean_cosine"], 5)}
                        | timings(runner, entry["precision"]))
            log(json.dumps(rows[-1]))
        results["models"][model] = {"export_seconds": round(export_s, 1), "macs": macs, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"CPU {peak['cpu']} at {peak['mhz']:.0f} MHz: peak {peak['peak_fp32_macs_per_core'] / 1e9:.0f} GMAC/s FP32, "
          f"{peak['peak_int8_macs_per_core'] / 1e9:.0f} GMAC/s INT8 per core ({peak['assumption']})")
    for model, data in results["models"].items():
        print(f"\n{model} ({data['macs'] / 1e6:.0f} M MACs per image)")
        head = "".join(f" {'b1 ms t' + str(t):>9} {'b32/s t' + str(t):>9} {'%peak':>6}" for t in args.threads)
        print(f"{'graph':<18} {'acc':>6} {'size MB':>8}{head}")
        for r in data["rows"]:
            size = "" if r["size_mb"] is None else f"{r['size_mb']:.2f}"
            cells = "".join(f" {r[f't{t}']['latency_ms_p50']:>9.2f} {r[f't{t}']['images_per_s_b32']:>9.1f} "
                            f"{100 * r[f't{t}']['fraction_of_peak_b32']:>5.1f}%" for t in args.threads)
            print(f"{r['graph'] + '/' + r['precision']:<18} {r['accuracy']:>6.3f} {size:>8}{cells}")


if __name__ == "__main__":
    main()
