"""Backend × precision comparison on Fashion-MNIST, in one run, for each registry backbone.

For every graph the export produced (ONNX Runtime, OpenVINO, LiteRT; FP32 / FP16 / INT8) and for PyTorch eager FP32:
device-head accuracy (softmax head trained on 1,000 official training images, tested on 1,000 official test images),
file size, batch-1 latency (median of 50) and batch-32 throughput, with 2 threads.

    python tools/bench_backends.py --out docs/results/backends.json

Needs the host extra (all exporters) and Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/backends.json"))
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    ap.add_argument("--formats", nargs="+", default=["onnx", "openvino", "tflite"])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="edgetl-bench-"))
    train_dir, test_dir = work / "train", work / "test"
    write_image_folder(train_dir, "train", args.per_class, 0)
    write_image_folder(test_dir, "test", args.per_class, 0)
    train, test = scan_image_folder(train_dir), scan_image_folder(test_dir)
    results: dict[str, Any] = {"threads": args.threads, "train": len(train), "test": len(test), "models": {}}
    for model in args.models:
        start = time.perf_counter()
        bundle = export(work / f"{model}.bundle", train_dir, model=model, formats=args.formats,
                        precisions=("fp32", "fp16", "int8"), keep_failed=True)
        export_s = time.perf_counter() - start
        manifest = json.loads((bundle / "manifest.json").read_text())
        pp = DeviceRuntime(bundle, backend="onnx", precision="fp32").bundle.preprocessing
        sample = preprocess_batch([load_image(p) for p in test.paths[:32]], pp)
        rows: list[dict[str, Any]] = []

        # PyTorch eager FP32, same images, same head
        from edgetl.host.backbone import build_backbone
        from edgetl.registry import get_backbone

        net = build_backbone(get_backbone(model)).features.eval()

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
                    | timing(torch_embed, sample[:1], sample))
        print(json.dumps(rows[-1]), flush=True)
        for entry in manifest["extractors"]:
            rt = DeviceRuntime(bundle, backend=entry["format"], precision=entry["precision"], threads=args.threads)
            rt.train(train_dir, val_split=0.0)
            acc = rt.evaluate(test_dir)["accuracy"]
            rows.append({"graph": entry["format"], "precision": entry["precision"], "file": entry["file"],
                         "accuracy": acc, "size_mb": round(entry["report"]["size_bytes"] / 1e6, 2),
                         "gate_drop_points": entry["report"]["drop_points"], "gate_passed": entry["report"]["passed"],
                         "gate_mean_cosine": round(entry["report"]["mean_cosine"], 5)}
                        | timing(rt.embed_arrays, sample[:1], sample))
            print(json.dumps(rows[-1]), flush=True)
        results["models"][model] = {"export_seconds": round(export_s, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for model, data in results["models"].items():
        print(f"\n{model}")
        print(f"{'graph':<22} {'acc':>6} {'size MB':>8} {'b1 ms':>7} {'b32 img/s':>10}")
        for r in data["rows"]:
            size = "" if r["size_mb"] is None else f"{r['size_mb']:.2f}"
            print(f"{r['graph'] + '/' + r['precision']:<22} {r['accuracy']:>6.3f} {size:>8} {r['latency_ms_p50']:>7.2f} "
                  f"{r['images_per_s_b32']:>10.1f}")


if __name__ == "__main__":
    main()
