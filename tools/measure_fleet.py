"""Measure head-only federated learning (edgetl fleet, Flower simulation) on real MobileNetV2 embeddings of
Fashion-MNIST: six devices, each knowing six or seven of the ten classes, 6,000 training embeddings in all (600 per
class, each class's images spread over the devices that know it); accuracy on the 10,000 official test images, which
no head trained on.

Each device is a real bundle copy (the cached 96 px MobileNetV2 bundle of tools/fmnist_embeddings.py) whose embedding
store and current head are filled from the cached embeddings (what `edgetl device train` would have stored), so the
Flower clients run exactly the product path (DeviceRuntime → store → fleet client).

    .venv/bin/python tools/measure_fleet.py            # ~2 min on 2 cores; writes docs/results/fleet.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from fmnist_embeddings import balanced, bundle_dir, load

from edgetl.datasets.fashion_mnist import CLASSES

#: which classes each device knows (every class is known by 3-5 devices, no device knows all)
KNOWS = [(0, 1, 2, 3, 4, 5), (3, 4, 5, 6, 7, 8), (0, 1, 2, 7, 8, 9), (4, 5, 6, 7, 8, 9), (0, 2, 4, 6, 8, 9, 1),
         (1, 3, 5, 7, 9, 0)]


def _device(bundle: Path, X: np.ndarray, y: np.ndarray, ids: np.ndarray, names: list[str]) -> None:
    """Fill a device's store and current head from cached embeddings (as `device train` would)."""
    from edgetl.device import DeviceRuntime
    from edgetl.labelled import LabelledEmbeddings
    from edgetl.store import EmbeddingStore

    runtime = DeviceRuntime(bundle)
    store = EmbeddingStore(runtime.bundle.state_dir / "store", runtime.extractor_sha256)
    keys = np.array([hashlib.sha256(f"fmnist-train-{i}".encode()).hexdigest() for i in ids], dtype="U64")
    for k, x in zip(keys, X):
        store.put(str(k), x)
    store.save()
    with runtime.state.writer():
        runtime.training.fit_version(LabelledEmbeddings(X, keys, y, names), "ncm", val_split=0.2, seed=0, tolerance=0.02,
                                      force=True, head_params={}, source="cached embeddings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "fleet.json")
    args = parser.parse_args()

    from edgetl.device import DeviceRuntime
    from edgetl.fleet.app import FleetConfig, local_data, simulate
    from edgetl.heads import NCMHead, SoftmaxHead, load_head

    arrays, meta = load()
    train = balanced(arrays["train_y"], 600, seed=0)
    y_all = arrays["train_y"][train]
    X_test, y_test = arrays["test_X"], arrays["test_y"]
    rng = np.random.default_rng(0)
    owner = np.array([rng.choice([d for d, k in enumerate(KNOWS) if c in k]) for c in y_all])
    union = sorted(CLASSES)
    to_union = np.array([union.index(c) for c in CLASSES])
    record: dict = {"command": f"python tools/measure_fleet.py --rounds {args.rounds}", "data": {
        "embeddings": f"MobileNetV2 (ImageNet weights), {meta.get('size', 96)} px, via the ONNX FP32 bundle",
        "train": len(y_all), "test": len(y_test), "devices": len(KNOWS),
        "classes_per_device": [len(k) for k in KNOWS], "rejected_devices": 1}}
    with tempfile.TemporaryDirectory(prefix="edgetl-fleet-") as tmp:
        devices = []
        for d, knows in enumerate(KNOWS):
            b = Path(shutil.copytree(bundle_dir(), Path(tmp) / f"device{d}", ignore=shutil.ignore_patterns("state")))
            ids = train[owner == d]
            names = sorted(CLASSES[c] for c in knows)
            y_local = np.array([names.index(CLASSES[c]) for c in arrays["train_y"][ids]])
            _device(b, arrays["train_X"][ids], y_local, ids, names)
            devices.append(b)
        # a device on another extractor (the bundle re-exported: other sha256) tries to join
        rogue = Path(shutil.copytree(bundle_dir(), Path(tmp) / "rogue", ignore=shutil.ignore_patterns("state")))
        import onnx

        m = onnx.load(rogue / "extractor.onnx")
        m.doc_string = "re-exported elsewhere"
        onnx.save(m, rogue / "extractor.onnx")
        manifest = json.loads((rogue / "manifest.json").read_text())
        blob = (rogue / "extractor.onnx").read_bytes()
        manifest["files"]["extractor.onnx"] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
        (rogue / "manifest.json").write_text(json.dumps(manifest))
        _device(rogue, arrays["train_X"][:40], (arrays["train_y"][:40] % 2).astype(np.int64), np.arange(40),
                ["a", "b"])

        data = [local_data(DeviceRuntime(b)) for b in devices]
        X = np.concatenate([dd.X for dd in data])
        y = np.concatenate([dd.to_union(union) for dd in data])
        yt = to_union[y_test]
        sha = DeviceRuntime(devices[0]).extractor_sha256

        def acc(head) -> float:  # type: ignore[no-untyped-def]
            return round(float((head.predict(X_test) == yt).mean()), 4)

        local = []
        for dd in data:  # what a device reaches alone (it cannot predict the classes it never saw)
            h = NCMHead().fit(dd.X, dd.y)
            idx = np.array([union.index(c) for c in dd.classes])
            local.append(float((idx[h.predict(X_test)] == yt).mean()))
        record["local_only_ncm_accuracy_mean"] = round(float(np.mean(local)), 4)
        ncm, softmax = NCMHead().fit(X, y), SoftmaxHead().fit(X, y)
        for name, kind, strategy, central in (("ncm", "ncm", "fedavg", ncm), ("softmax_fedavgm", "softmax", "fedavg",
                                              softmax), ("softmax_lbfgs", "softmax", "lbfgs", softmax)):
            start = time.perf_counter()
            res = simulate([*devices, rogue], FleetConfig(extractor_sha256=sha, out=str(Path(tmp) / name), head=kind,
                                                          strategy=strategy, rounds=args.rounds,
                                                          min_clients=len(devices)))
            seconds = time.perf_counter() - start
            fed = load_head(Path(tmp) / name / "head.npz")
            up = [max(r.values()) for r in res.bytes_up]
            entry = {"rounds": res.rounds, "bytes_up_per_device_per_round_max": max(up),
                     "bytes_up_per_device_total": int(sum(up)) + max(res.join_bytes_up.values()),
                     "bytes_join_per_device": max(res.join_bytes_up.values()),
                     "bytes_down_per_device_per_round_max": max(max(r.values()) for r in res.bytes_down),
                     "accepted": len(res.accepted), "rejected": len(res.rejected),
                     "federated_accuracy": acc(fed), "central_accuracy": acc(central),
                     "prediction_agreement": round(float((fed.predict(X_test) == central.predict(X_test)).mean()), 4),
                     "simulation_seconds": round(seconds, 1),
                     "local_embeddings_bytes_per_device_never_sent": int(max(len(dd.y) for dd in data) * X.shape[1] * 4)}
            if kind == "ncm":
                entry["max_abs_diff_sums"] = float(np.abs(fed.sums_ - central.sums_).max())
                entry["scale"] = [float(fed.scale_), float(central.scale_)]
            record[name] = entry
            print(name, json.dumps(entry))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
