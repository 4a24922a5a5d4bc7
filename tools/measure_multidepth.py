"""Head-to-toe features on the device (issue 10): last-layer head vs multi-depth head (both on the frozen extractor)
vs host full fine-tuning followed by a last-layer head, for MobileNetV2 and EfficientNet-Lite0 on two real data sets.

    python tools/measure_multidepth.py --out docs/results/multidepth.json

Data sets (the test images are never used for training, selection or calibration):
- Fashion-MNIST: 1,000 images of the official training split (100 per class) / 1,000 of the official test split;
- scikit-learn's handwritten digits (8x8, shipped in the package): a seeded stratified 1,000 / 797 split.
Device heads: softmax on the pooled final features (``--features last``) and on features of every depth, normalised
per group with feature selection (``--features multi``), on the FP32 and INT8 ONNX extractors of one multi-depth
bundle; ``auto``'s choice is recorded too. Host: ``finetune --freeze none`` (every layer), then export and a last-layer
device head. Timings: the device's train call on cached embeddings (what a retrain costs), bench of predict.
Needs the host extra, Debian's dataset-fashion-mnist and scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.bench import bench
from edgetl.datasets.fashion_mnist import write_image_folder
from edgetl.device import DeviceRuntime
from edgetl.host.export import export
from edgetl.host.finetune import FinetuneConfig, finetune


def _digits(out: Path, seed: int) -> tuple[Path, Path]:
    """scikit-learn's digits as PNG ImageFolders: 1,000 train / 797 test, stratified and seeded."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from edgetl.data import stratified_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    train_idx, test_idx = stratified_split(digits.target, 797 / len(images), seed)
    for name, idx in (("train", train_idx), ("test", test_idx)):
        for i in idx:
            folder = out / name / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    return out / "train", out / "test"


def _fashion(out: Path, seed: int) -> tuple[Path, Path]:
    write_image_folder(out / "train", "train", 100, seed)
    write_image_folder(out / "test", "test", 100, seed)
    return out / "train", out / "test"


def _device(bundle: Path, train: Path, test: Path, precision: str, features: str, seed: int) -> dict[str, Any]:
    rt = DeviceRuntime(bundle, precision=precision)
    rt.embed_paths(sorted(train.rglob("*.png")))  # fill the store: the timed train call measures the head only
    start = time.perf_counter()
    report = rt.train(train, features=features, seed=seed, force=True)
    seconds = time.perf_counter() - start
    return {"accuracy": rt.evaluate(test)["accuracy"], "features": report.features["features"],
            "reason": report.features["reason"], "train_seconds_cached": round(seconds, 3),
            "val_accuracy": report.val_accuracy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/multidepth.json"))
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    ap.add_argument("--datasets", nargs="+", default=["fashion_mnist", "digits"])
    ap.add_argument("--parts", nargs="+", choices=["frozen", "finetune"], default=["frozen", "finetune"],
                    help="frozen: device heads on the multi-depth bundle; finetune: host fine-tune + last-layer head")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgetl-multidepth-"))
    makers = {"fashion_mnist": _fashion, "digits": _digits}
    results: dict[str, Any] = {"image_size": args.image_size, "finetune_epochs": args.epochs, "seed": args.seed,
                               "machine": {"cpu": platform.processor() or platform.machine()}, "rows": []}
    for ds in args.datasets:
        train, test = makers[ds](work / ds, args.seed)
        for model in args.models:
            row: dict[str, Any] = {"dataset": ds, "model": model}
            if "frozen" in args.parts:
                _frozen(row, work, ds, model, train, test, args)
            if "finetune" in args.parts:
                _finetuned(row, work, ds, model, train, test, args)
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def _frozen(row: dict[str, Any], work: Path, ds: str, model: str, train: Path, test: Path,
            args: argparse.Namespace) -> None:
    """Device heads (last / multi / auto) on the FP32 and INT8 graphs of one multi-depth bundle, and predict cost."""
    start = time.perf_counter()
    multi = export(work / f"{ds}-{model}-multi", train, model=model, image_size=args.image_size,
                   features="multi", precisions=("fp32", "int8"), keep_failed=True, seed=args.seed)
    row["export_seconds"] = round(time.perf_counter() - start, 1)
    manifest = json.loads((multi / "manifest.json").read_text())
    row["int8_gate"] = [{"passed": e["report"]["passed"], "reason": e["report"]["reason"]}
                        for e in manifest["extractors"] if e["precision"] == "int8"]
    for precision in ("fp32", "int8"):
        for features in ("last", "multi", "auto"):
            row[f"{precision}_{features}"] = _device(multi, train, test, precision, features, args.seed)
            print(ds, model, precision, features, row[f"{precision}_{features}"], flush=True)
    # predict cost: the multi-depth graph with each head (the last-layer graph is the same network)
    for features in ("last", "multi"):
        DeviceRuntime(multi, precision="fp32").train(train, features=features, seed=args.seed, force=True)
        b = bench(multi, precision="fp32", runs=50, cold_runs=1)
        row[f"bench_{features}"] = {k: b[k] for k in ("latency_ms_p50", "images_per_s", "head_fit_s",
                                                      "head_predict_ms", "head_bytes", "head_features")}
    last_only = export(work / f"{ds}-{model}-last", train, model=model, image_size=args.image_size,
                       seed=args.seed)
    b = bench(last_only, precision="fp32", runs=50, cold_runs=1)
    row["bench_last_only_graph"] = {k: b[k] for k in ("latency_ms_p50", "images_per_s")}


def _finetuned(row: dict[str, Any], work: Path, ds: str, model: str, train: Path, test: Path,
               args: argparse.Namespace) -> None:
    """Host: full fine-tuning (every layer), export, then a last-layer head on the device."""
    run = work / f"{ds}-{model}.run"
    cfg = FinetuneConfig(model=model, epochs=args.epochs, freeze="none", image_size=args.image_size,
                         seed=args.seed)
    metrics = finetune(train, run, cfg)
    tuned = export(work / f"{ds}-{model}-ft", train, run=run, seed=args.seed)
    row["finetuned_last"] = _device(tuned, train, test, "fp32", "last", args.seed) | {
        "finetune_seconds": metrics["seconds"], "finetune_best_val_accuracy": metrics["best_val_accuracy"]}


if __name__ == "__main__":
    main()
