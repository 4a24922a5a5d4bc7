"""Real MobileNetV2 (ImageNet weights) embeddings of Fashion-MNIST, computed through the product path and cached.

The extractor is exported with :func:`edgetl.host.export.export` to an ONNX FP32 bundle at ``--size`` px, then every
image of the official train (60,000) and test (10,000) splits is embedded with ``DeviceRuntime.embed_images`` (the
device's own preprocessing: grey → RGB, resize, centre crop, ImageNet normalisation). Result, under ``.cache/fmnist/``
(gitignored): ``mnv2_<size>.npz`` with ``train_X`` (60000, 1280) float32, ``train_y``, ``test_X`` (10000, 1280),
``test_y`` and a JSON ``meta`` string; the bundle itself stays next to it (``mnv2_<size>.bundle``) for the tools that
use the DeviceRuntime API on image folders.

    .venv/bin/python tools/fmnist_embeddings.py            # ~2-4 min at 96 px on 2 cores

Why 96 px: Fashion-MNIST images are 28×28, so a larger input adds no detail; 96 px costs ~5.4× fewer FLOPs than 224 px
(70k images embed in minutes, not a quarter of an hour, on 2 cores) and is the size the issue's reference figures use.

Other tools import :func:`load` and :func:`balanced` from here.
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

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "fmnist"
DEFAULT_SIZE = 96


def cache_file(size: int = DEFAULT_SIZE) -> Path:
    return CACHE / f"mnv2_{size}.npz"


def bundle_dir(size: int = DEFAULT_SIZE) -> Path:
    return CACHE / f"mnv2_{size}.bundle"


def make_bundle(size: int = DEFAULT_SIZE, seed: int = 0) -> Path:
    """Export MobileNetV2 (registry id ``mobilenet_v2``) to an ONNX FP32 bundle at ``size`` px (once)."""
    out = bundle_dir(size)
    if (out / "manifest.json").is_file():
        return out
    from edgetl.datasets.fashion_mnist import write_image_folder
    from edgetl.host.export import export

    with tempfile.TemporaryDirectory(prefix="edgetl-fmnist-calib-") as tmp:
        write_image_folder(Path(tmp) / "calib", "train", 20, seed)  # 200 training images: parity check only
        export(out, Path(tmp) / "calib", model="mobilenet_v2", image_size=size, calib_size=20, eval_size=100,
               force=True, seed=seed)
    return out


def compute(size: int = DEFAULT_SIZE, threads: int = 2, batch_size: int = 128, seed: int = 0) -> Path:
    from edgetl.datasets.fashion_mnist import load_split
    from edgetl.device import DeviceRuntime

    bundle = make_bundle(size, seed)
    rt = DeviceRuntime(bundle, backend="onnx", precision="fp32", threads=threads, batch_size=batch_size)
    arrays: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for split in ("train", "test"):
        images, labels = load_split(split)
        start = time.perf_counter()
        out = np.empty((len(images), rt.bundle.feature_dim), dtype=np.float32)
        step = 2048
        for i in range(0, len(images), step):
            out[i:i + step] = rt.embed_images(list(images[i:i + step]))
            print(f"{split}: {min(i + step, len(images))}/{len(images)}", file=sys.stderr, flush=True)
        seconds[split] = round(time.perf_counter() - start, 1)
        arrays[f"{split}_X"], arrays[f"{split}_y"] = out, labels.astype(np.int64)
    meta = {"model": "mobilenet_v2 (ImageNet weights, frozen)", "input_size": size, "backend": rt.backend,
            "precision": rt.precision, "threads": rt.threads, "extractor_sha256": rt.extractor_sha256,
            "feature_dim": int(rt.bundle.feature_dim), "embed_seconds": seconds,
            "source": "official Fashion-MNIST train/test splits (edgetl.datasets.fashion_mnist)"}
    CACHE.mkdir(parents=True, exist_ok=True)
    path = cache_file(size)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)
    return path


def load(size: int = DEFAULT_SIZE) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The cached arrays (computing them first when absent) and their metadata."""
    path = cache_file(size)
    if not path.is_file():
        compute(size)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(str(arrays.pop("meta")))


def balanced(y: np.ndarray, per_class: int, seed: int, classes: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of ``per_class`` samples of each class (of ``classes``, default all), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y) if classes is None else classes
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in classes]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help="extractor input size in px (default 96)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="recompute even when the cache exists")
    args = ap.parse_args()
    if args.force or not cache_file(args.size).is_file():
        compute(args.size, args.threads)
    _, meta = load(args.size)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
