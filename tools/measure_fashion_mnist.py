"""Fashion-MNIST measurement for the README: device-head accuracy on frozen pretrained extractors and after a host
fine-tune, against a linear model on raw pixels. 1,000 images from the official training split (100 per class),
1,000 from the official test split (100 per class); the test images are never used for training or selection.

    python tools/measure_fashion_mnist.py --out docs/results/fashion_mnist.json

Runs the same public API the CLI uses (edgetl.host.finetune / export, edgetl.DeviceRuntime). Needs the host extra and
Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from edgetl.data import scan_image_folder
from edgetl.datasets.fashion_mnist import write_image_folder
from edgetl.device import DeviceRuntime
from edgetl.heads import SoftmaxHead
from edgetl.host.export import export
from edgetl.host.finetune import FinetuneConfig, finetune


def _pixels(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from edgetl.data import load_image

    data = scan_image_folder(folder)
    X = np.stack([np.asarray(load_image(p), dtype=np.float32).reshape(-1) / 255.0 for p in data.paths])
    return X, data.labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/fashion_mnist.json"))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgetl-fmnist-"))
    train_dir, test_dir = work / "train", work / "test"
    write_image_folder(train_dir, "train", args.per_class, args.seed)
    write_image_folder(test_dir, "test", args.per_class, args.seed)
    results: dict[str, object] = {"split": {"train": 10 * args.per_class, "test": 10 * args.per_class,
                                            "source": "official Fashion-MNIST train / test splits", "seed": args.seed},
                                  "machine": {"cpu": platform.processor() or platform.machine()}, "rows": []}
    rows: list[dict[str, object]] = results["rows"]  # type: ignore[assignment]

    Xtr, ytr = _pixels(train_dir)
    Xte, yte = _pixels(test_dir)
    start = time.perf_counter()
    head = SoftmaxHead(seed=args.seed).fit(Xtr, ytr)
    rows.append({"extractor": "none (raw 28x28 pixels)", "head": "softmax", "accuracy":
                 float((head.predict(Xte) == yte).mean()), "fit_seconds": round(time.perf_counter() - start, 3)})

    def device_row(name: str, bundle: Path, extra: dict[str, object]) -> None:
        rt = DeviceRuntime(bundle)
        start = time.perf_counter()
        report = rt.train(train_dir, head="softmax", seed=args.seed)
        train_s = time.perf_counter() - start
        ev = rt.evaluate(test_dir)
        rows.append({"extractor": name, "head": "softmax (device)", "accuracy": ev["accuracy"], "n_test": ev["n"],
                     "val_accuracy": report.val_accuracy, "head_fit_seconds": round(report.fit_seconds, 3),
                     "device_train_seconds_incl_embedding": round(train_s, 1)} | extra)
        print(json.dumps(rows[-1]), flush=True)

    for model in ("mobilenet_v2", "efficientnet_lite0"):
        bundle = export(work / f"{model}.bundle", train_dir, model=model)
        device_row(f"{model} (ImageNet, frozen)", bundle, {})

    for model in ("mobilenet_v2",):
        run = work / f"{model}.run"
        cfg = FinetuneConfig(model=model, epochs=args.finetune_epochs, freeze="partial", seed=args.seed)
        metrics = finetune(train_dir, run, cfg)
        bundle = export(work / f"{model}.ft.bundle", train_dir, run=run)
        # the fine-tuned classifier itself (the bundle's initial head) on the test split
        ft = DeviceRuntime(bundle).evaluate(test_dir)
        rows.append({"extractor": f"{model} fine-tuned ({args.finetune_epochs} epochs, freeze=partial)",
                     "head": "fine-tuned classifier (host)", "accuracy": ft["accuracy"], "n_test": ft["n"],
                     "finetune_seconds": metrics["seconds"]})
        print(json.dumps(rows[-1]), flush=True)
        device_row(f"{model} fine-tuned ({args.finetune_epochs} epochs, freeze=partial)", bundle, {})

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
