"""Head benchmark on real embeddings: every edgetl head vs scikit-learn, PyTorch and ONNX Runtime training, few-shot
and scaling, in one run.

    .venv/bin/python tools/fmnist_embeddings.py     # once: MobileNetV2 (ImageNet) 96-px embeddings, cached
    .venv/bin/python tools/bench_heads.py --out docs/results/heads.json

Data: cached MobileNetV2 embeddings of Fashion-MNIST (tools/fmnist_embeddings.py). Main comparison: 6,000 training
embeddings (600 per class, seeded draw from the official training split) and 2,000 test embeddings (200 per class from
the official test split). Every method fits on the same training embeddings and is scored on the same test embeddings;
peers get them standardised with the training mean/std (the edgetl softmax head standardises internally).

Each method of the main comparison runs in a fresh subprocess (five fits, median time reported; one for
scikit-learn): time is the wall clock of ``fit`` alone (predicting the test set is not timed); memory is the largest
peak resident-set growth during a fit (``/proc/self/clear_refs`` = 5 resets the high-water mark before each fit, then
``VmHWM − VmRSS before``); numpy heads also report tracemalloc's peak.
ONNX Runtime training (``onnxruntime-training-cpu==1.19.2``, which conflicts with ``onnxruntime``) runs in its own venv,
``.cache/ort-training-venv``, created on first use (``--ort-python`` names another interpreter); this file is its
worker too (the worker part imports only numpy and onnxruntime).

Before the timed part, the tool waits (up to ``--max-wait`` s) for the 1-minute load average to fall below 1.0 and
records the load in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ORT_VENV = ROOT / ".cache" / "ort-training-venv"
EPOCHS, BATCH, LR, WEIGHT_DECAY = 20, 64, 1e-3, 1e-2
EDGETL_HEADS = ("softmax", "ncm", "knn", "imprint")
PEERS = ("sklearn_logreg", "torch_adamw", "ort_training")
# the two timings the targets compare (softmax, ORT training) run back to back, under the same load
MAIN_METHODS = ("softmax", "ort_training", "ncm", "knn", "imprint", "torch_adamw", "sklearn_logreg")


# ------------------------------------------------------------------------------------------------ measurement helpers
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    """Reset the resident-set high-water mark; return the current RSS in kB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss_kb("VmRSS")


# ------------------------------------------------------------------------------------------------------ fit functions
# each returns a predict function: the timer stops before it is called
Predict = Any


def fit_edgetl(kind: str, Xtr: np.ndarray, ytr: np.ndarray, seed: int) -> Predict:
    from edgetl.heads import make_head

    return make_head(kind, seed=seed).fit(Xtr, ytr).predict


def _standardiser(Xtr: np.ndarray) -> tuple[np.ndarray, Any]:
    mean, std = Xtr.mean(axis=0), Xtr.std(axis=0) + 1e-6
    return ((Xtr - mean) / std).astype(np.float32), lambda X: ((X - mean) / std).astype(np.float32)


def fit_sklearn(Xtr: np.ndarray, ytr: np.ndarray, seed: int) -> Predict:
    from sklearn.linear_model import LogisticRegression

    Ztr, std = _standardiser(Xtr)
    model = LogisticRegression(solver="lbfgs", max_iter=1000, random_state=seed).fit(Ztr, ytr)
    return lambda X: model.predict(std(X))


def fit_torch(Xtr: np.ndarray, ytr: np.ndarray, seed: int) -> Predict:
    import torch

    torch.manual_seed(seed)
    Ztr, std = _standardiser(Xtr)
    xt, yt = torch.from_numpy(Ztr), torch.from_numpy(ytr)
    model = torch.nn.Linear(Ztr.shape[1], int(ytr.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), BATCH):
            idx = order[i:i + BATCH]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()

    def predict(X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(std(X))).argmax(1).numpy()

    return predict


def _ort_training_package() -> None:
    """Make ``onnxruntime.training`` importable without torch: its ``__init__`` imports the FP16/AMP helpers, which
    need torch; the on-device API and the artifact generator do not. Register the package without running it."""
    import types

    import onnxruntime

    if "onnxruntime.training" not in sys.modules:
        pkg = types.ModuleType("onnxruntime.training")
        pkg.__path__ = [str(Path(onnxruntime.__file__).parent / "training")]
        sys.modules["onnxruntime.training"] = pkg


def _ort_artifacts(dim: int, n_classes: int, folder: Path, seed: int) -> None:
    """A linear model (Gemm) as ONNX, and ORT's training artifacts (CE loss, AdamW) for it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    _ort_training_package()
    from onnxruntime.training import artifacts

    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(dim)  # PyTorch's nn.Linear initialisation
    W = rng.uniform(-bound, bound, (n_classes, dim)).astype(np.float32)
    b = rng.uniform(-bound, bound, n_classes).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["logits"], transB=1)], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    artifacts.generate_artifacts(model, requires_grad=["W", "b"], loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.AdamW, artifact_directory=str(folder))
    opt_path = folder / "optimizer_model.onnx"
    opt = onnx.load(str(opt_path))
    if opt.ir_version > 10:  # onnx ≥ 1.17 writes IR 11, which onnxruntime 1.19 cannot read
        opt.ir_version = 10
        onnx.save(opt, str(opt_path))


def fit_ort(Xtr: np.ndarray, ytr: np.ndarray, seed: int, folder: Path | None = None) -> Predict:
    """ONNX Runtime on-device training: artifacts are generated once per process (not timed: a device would ship
    them), the fit is the training loop."""
    _ort_training_package()
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    assert folder is not None
    Ztr, std = _standardiser(Xtr)
    state = CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    module = Module(str(folder / "training_model.onnx"), state, str(folder / "eval_model.onnx"))
    opt = Optimizer(str(folder / "optimizer_model.onnx"), module)
    opt.set_learning_rate(LR)
    rng = np.random.default_rng(seed)
    module.train()
    for _ in range(EPOCHS):
        order = rng.permutation(len(Ztr))
        for i in range(0, len(Ztr), BATCH):
            idx = order[i:i + BATCH]
            module(Ztr[idx], ytr[idx])
            opt.step()
            module.lazy_reset_grad()
    W = state.parameters["W"].data
    b = state.parameters["b"].data
    return lambda X: np.argmax(std(X) @ W.T + b, axis=1)


# ------------------------------------------------------------------------------------------------------------ worker
def worker(method: str, data: Path, repeats: int, seed: int) -> dict[str, Any]:
    """Fit ``method`` ``repeats`` times on the cached split; time, accuracy and peak memory (runs in a subprocess)."""
    with np.load(data, allow_pickle=False) as d:
        Xtr, ytr, Xte, yte = (np.ascontiguousarray(d[k]) for k in ("Xtr", "ytr", "Xte", "yte"))
    extra: dict[str, Any] = {}
    folder = None
    if method == "ort_training":
        import onnxruntime

        folder = Path(tempfile.mkdtemp(prefix="ort-artifacts-"))
        start = time.perf_counter()
        _ort_artifacts(Xtr.shape[1], int(ytr.max()) + 1, folder, seed)
        extra = {"artifact_seconds": round(time.perf_counter() - start, 3), "onnxruntime": onnxruntime.__version__}
    elif method == "torch_adamw":
        import torch

        extra = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        fit_torch(Xtr[:BATCH], ytr[:BATCH], seed)  # warm-up: first-call dispatch and allocator set-up
    elif method == "sklearn_logreg":
        import sklearn

        extra = {"sklearn": sklearn.__version__}

    def fit() -> Predict:
        if method in EDGETL_HEADS:
            return fit_edgetl(method, Xtr, ytr, seed)
        if method == "sklearn_logreg":
            return fit_sklearn(Xtr, ytr, seed)
        if method == "torch_adamw":
            return fit_torch(Xtr, ytr, seed)
        return fit_ort(Xtr, ytr, seed, folder)

    times, accs, peaks = [], [], []
    for _ in range(repeats):
        before = _reset_peak()
        start = time.perf_counter()
        predict = fit()  # the fit only; predicting the test set is not timed
        times.append(time.perf_counter() - start)
        peaks.append((_rss_kb("VmHWM") - before) / 1024)
        accs.append(float((predict(Xte) == yte).mean()))
        del predict
    peak_mb = max(peaks)
    row: dict[str, Any] = {"method": method, "fit_seconds": round(statistics.median(times), 4),
                           "fit_seconds_all": [round(t, 4) for t in times], "accuracy": round(statistics.mean(accs), 4),
                           "peak_rss_growth_mb": round(max(peak_mb, 0.0), 1)} | extra
    if method in EDGETL_HEADS:
        import tracemalloc

        tracemalloc.start()
        fit_edgetl(method, Xtr, ytr, seed)
        row["tracemalloc_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    return row


# ------------------------------------------------------------------------------------------------------- orchestrator
def ort_python(explicit: str | None) -> str:
    if explicit:
        return explicit
    py = ORT_VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {ORT_VENV} (onnxruntime-training-cpu 1.19.2, onnx, numpy<2)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(ORT_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "onnxruntime-training-cpu==1.19.2", "onnx",
                        "numpy<2"], check=True)
    return str(py)


def run_worker(python: str, method: str, data: Path, repeats: int, seed: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", method, "--data", str(data),
                           "--repeats", str(repeats), "--seed", str(seed)], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wait_for_quiet(max_wait: float, limit: float = 1.0) -> dict[str, Any]:
    start = time.time()
    load = os.getloadavg()
    while load[0] >= limit and time.time() - start < max_wait:
        time.sleep(15)
        load = os.getloadavg()
    return {"loadavg_1_5_15": [round(v, 2) for v in load], "waited_seconds": round(time.time() - start),
            "quiet": load[0] < limit}


def few_shot(arrays: dict[str, np.ndarray], test_idx: np.ndarray, shots: int, draws: int) -> dict[str, Any]:
    from fmnist_embeddings import balanced

    Xte, yte = arrays["test_X"][test_idx], arrays["test_y"][test_idx]
    accs: dict[str, list[float]] = {m: [] for m in (*EDGETL_HEADS, "sklearn_logreg")}
    for draw in range(draws):
        idx = balanced(arrays["train_y"], shots, seed=1000 + draw)
        Xtr, ytr = arrays["train_X"][idx], arrays["train_y"][idx]
        for kind in EDGETL_HEADS:
            accs[kind].append(float((fit_edgetl(kind, Xtr, ytr, draw)(Xte) == yte).mean()))
        accs["sklearn_logreg"].append(float((fit_sklearn(Xtr, ytr, draw)(Xte) == yte).mean()))
    return {m: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4), "draws": [round(a, 4) for a in v]}
            for m, v in accs.items()}


def scaling(arrays: dict[str, np.ndarray], test_idx: np.ndarray, sizes: list[int], repeats: int,
            seed: int) -> list[dict[str, Any]]:
    from fmnist_embeddings import balanced

    Xte, yte = arrays["test_X"][test_idx], arrays["test_y"][test_idx]
    rows = []
    for n in sizes:
        idx = balanced(arrays["train_y"], n // 10, seed) if n < len(arrays["train_y"]) else np.arange(n)
        Xtr, ytr = arrays["train_X"][idx], arrays["train_y"][idx]
        for kind in ("softmax", "ncm"):
            times, acc, iters = [], 0.0, None
            for _ in range(repeats):
                start = time.perf_counter()
                predict = fit_edgetl(kind, Xtr, ytr, seed)
                times.append(time.perf_counter() - start)
                acc = float((predict(Xte) == yte).mean())
                iters = getattr(predict.__self__, "n_iter_", None)
            rows.append({"head": kind, "n_train": n, "fit_seconds": round(statistics.median(times), 4),
                         "accuracy": round(acc, 4)} | ({"lbfgs_iterations": int(iters)} if iters else {}))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for kind in ("softmax", "ncm"):
        by_n = {r["n_train"]: r["fit_seconds"] for r in rows if r["head"] == kind}
        for r in rows:
            if r["head"] == kind:
                r["seconds_per_1k"] = round(1000 * by_n[r["n_train"]] / r["n_train"], 4)
    return rows


def scaling_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth no faster than linear: the cost per embedding at 60k is at most 10 % above that at 1k and at 6k (the
    step ratios are recorded too: a 1k set fits in the CPU cache, a 6k one does not)."""
    out: dict[str, Any] = {}
    for kind in ("softmax", "ncm"):
        t = {r["n_train"]: r["fit_seconds"] for r in rows if r["head"] == kind}
        out[f"scaling_{kind}_time_ratio_6k_over_1k"] = round(t[6000] / t[1000], 2)
        out[f"scaling_{kind}_time_ratio_60k_over_6k"] = round(t[60000] / t[6000], 2)
        out[f"scaling_{kind}_at_most_linear"] = t[60000] / t[1000] <= 66 and t[60000] / t[6000] <= 11
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "heads.json")
    ap.add_argument("--size", type=int, default=96, help="extractor input size of the cached embeddings")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=5, help="few-shot random draws")
    ap.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a quiet machine")
    ap.add_argument("--ort-python", help="interpreter with onnxruntime-training-cpu (default: .cache venv)")
    ap.add_argument("--skip", nargs="*", default=[], help="parts to skip: main few_shot scaling")
    ap.add_argument("--methods", nargs="*", default=list(MAIN_METHODS),
                    help="methods of the main comparison (default: all; e.g. only the edgetl heads for a before/after "
                         "run of a change to edgetl)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.repeats, args.seed)))
        return

    sys.path.insert(0, str(ROOT / "tools"))
    from fmnist_embeddings import balanced, load

    arrays, meta = load(args.size)
    train_idx = balanced(arrays["train_y"], 600, args.seed)
    test_idx = balanced(arrays["test_y"], 200, args.seed)
    results: dict[str, Any] = {
        "embeddings": meta, "split": {"train": len(train_idx), "test": len(test_idx), "seed": args.seed,
                                      "train_from": "official training split, 600 per class",
                                      "test_from": "official test split, 200 per class"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "protocol": {"repeats": args.repeats, "peers": f"standardised features; torch/ORT: AdamW lr {LR}, weight decay "
                     f"{WEIGHT_DECAY}, {EPOCHS} epochs, batch {BATCH}; sklearn LogisticRegression(lbfgs, C=1, "
                     "max_iter=1000)", "memory": "peak RSS growth during fit in a fresh subprocess (clear_refs=5); "
                     "tracemalloc peak for numpy heads"}}
    results["load_before"] = wait_for_quiet(args.max_wait)
    print(f"load: {results['load_before']}", file=sys.stderr)
    if "main" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="edgetl-bench-") as tmp:
            data = Path(tmp) / "split.npz"
            np.savez(data, Xtr=arrays["train_X"][train_idx], ytr=arrays["train_y"][train_idx],
                     Xte=arrays["test_X"][test_idx], yte=arrays["test_y"][test_idx])
            ort_py = ort_python(args.ort_python) if "ort_training" in args.methods else sys.executable
            rows = []
            for method in [m for m in MAIN_METHODS if m in args.methods]:
                python = ort_py if method == "ort_training" else sys.executable
                reps = 1 if method == "sklearn_logreg" else args.repeats
                load_1min = os.getloadavg()[0]
                rows.append(run_worker(python, method, data, reps, args.seed) | {"load_1min_before": round(load_1min, 2)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        results["main"] = rows
        by = {r["method"]: r for r in rows}
        if all(m in by for m in MAIN_METHODS):
            results["targets"] = results.get("targets", {}) | _main_targets(by)
    targets = results.setdefault("targets", {})
    if "few_shot" not in args.skip:
        results["few_shot"] = {str(k): few_shot(arrays, test_idx, k, args.draws) for k in (5, 20)}
        print(json.dumps(results["few_shot"]), file=sys.stderr)
        for k, rows in results["few_shot"].items():
            best = max(EDGETL_HEADS, key=lambda h: rows[h]["mean"])
            targets[f"few_shot_{k}_best_edgetl_head"] = best
            targets[f"few_shot_{k}_best_edgetl_ge_logreg"] = rows[best]["mean"] >= rows["sklearn_logreg"]["mean"]
    if "scaling" not in args.skip:
        results["scaling"] = scaling(arrays, test_idx, [1000, 6000, 60000], args.repeats, args.seed)
        targets |= scaling_targets(results["scaling"])
    results["load_after"] = {"loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


def _main_targets(by: dict[str, dict[str, Any]]) -> dict[str, Any]:
    best_peer = max(by[p]["accuracy"] for p in PEERS)
    return {"softmax_fit_le_0.3s": by["softmax"]["fit_seconds"] <= 0.3,
            "softmax_2x_faster_than_ort": by["softmax"]["fit_seconds"] * 2 <= by["ort_training"]["fit_seconds"],
            "softmax_within_0.5pt_of_best_peer": by["softmax"]["accuracy"] >= best_peer - 0.005,
            "best_peer_accuracy": best_peer, "ncm_fit_le_50ms": by["ncm"]["fit_seconds"] <= 0.05}


if __name__ == "__main__":
    main()
