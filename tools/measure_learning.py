"""Unknown detection, class addition without forgetting and drift, measured on real MobileNetV2 embeddings of
Fashion-MNIST through the device API (``DeviceRuntime.train / add_class / predict / evaluate / drift``).

    .venv/bin/python tools/fmnist_embeddings.py     # once: bundle + cached embeddings (.cache/fmnist/)
    .venv/bin/python tools/measure_learning.py --out docs/results/learning.json

Data: the same split as tools/bench_heads.py — 6,000 training images (600 per class, official training split) and
2,000 test images (200 per class, official test split), written as PNG image folders; every figure is measured on
the test images, which no head, threshold or temperature ever sees.

1. Unknown: a head trained (``device train``) on classes 0–4 only; ``predict`` on the test images of classes 0–4
   (known) and 5–9 (unknown). AUROC of the ``novelty`` score ``predict`` returns, and the rates flagged ``unknown``.
   Candidate scores are also compared in numpy on the cached embeddings, fitted on exactly the training part
   ``device train`` uses (80 % of the training images; the other 20 % set the thresholds).
2. Class addition: heads (softmax, ncm) trained on classes 0–4, then given classes 5–9 one by one with ``add_class``,
   against the same head trained on all ten at once; accuracy on the same 2,000 test images. ``add_class`` refits on
   the stored embeddings of the old classes; the stricter store-free path (``partial_fit`` of NCM / imprint with the
   new classes' embeddings only) is measured too.
3. Drift: scikit-image's sample photos and the held-out Fashion-MNIST test folder against the all-class softmax head.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from fmnist_embeddings import balanced, bundle_dir, load

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "immunohistochemistry", "moon",
          "clock", "page", "cat", "coins", "horse", "retina", "text")


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` (ties counted half), by ranks."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    s = np.asarray(scores)[order]
    # average ranks over ties
    _, start, counts = np.unique(s, return_index=True, return_counts=True)
    for st, c in zip(start, counts):
        if c > 1:
            ranks[order[st:st + c]] = ranks[order[st:st + c]].mean()
    n1 = int(positive.sum())
    n0 = len(positive) - n1
    return float((ranks[positive.astype(bool)].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# ------------------------------------------------------------------------------------------- candidate novelty scores
def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _mahalanobis(Xt: np.ndarray, yt: np.ndarray, Xq: np.ndarray, shrink: float, relative: bool = False) -> np.ndarray:
    """Smallest Mahalanobis distance to a class mean, shared covariance shrunk towards mean-variance × I (full rank);
    ``relative``: minus the distance under one Gaussian of all training data (Ren et al. 2021)."""
    def precision(R: np.ndarray) -> np.ndarray:
        S = R.T.astype(np.float64) @ R / len(R)
        S = (1 - shrink) * S + shrink * np.trace(S) / len(S) * np.eye(len(S))
        return np.linalg.inv(S)

    classes = np.unique(yt)
    means = np.stack([Xt[yt == c].mean(axis=0) for c in classes])
    P = precision(Xt - means[np.searchsorted(classes, yt)])
    d = np.stack([(((Xq - m) @ P) * (Xq - m)).sum(axis=1) for m in means], axis=1)
    if relative:
        m0 = Xt.mean(axis=0)
        d = d - ((((Xq - m0) @ precision(Xt - m0)) * (Xq - m0)).sum(axis=1))[:, None]
    return d.min(axis=1)


def candidate_scores(Xt: np.ndarray, yt: np.ndarray, Xh: np.ndarray, Xq: np.ndarray, seed: int
                     ) -> dict[str, np.ndarray]:
    """Each candidate's novelty score of the query embeddings (larger = less familiar)."""
    from edgetl.heads import make_head
    from edgetl.heads.base import softmax
    from edgetl.novelty import Novelty

    classes = np.unique(yt)
    out: dict[str, np.ndarray] = {}
    centre = Xt.mean(axis=0)
    protos = _unit(np.stack([_unit(Xt - centre)[yt == c].mean(axis=0) for c in classes]))
    out["cosine to centred class means (edgetl before)"] = 1 - (_unit(Xq - centre) @ protos.T).max(axis=1)
    protos = _unit(np.stack([_unit(Xt)[yt == c].mean(axis=0) for c in classes]))
    out["cosine to class means (uncentred)"] = 1 - (_unit(Xq) @ protos.T).max(axis=1)
    for shrink in (0.01, 0.1):
        out[f"Mahalanobis, raw features, shrink {shrink}"] = _mahalanobis(Xt, yt, Xq, shrink)
        out[f"relative Mahalanobis, raw features, shrink {shrink}"] = _mahalanobis(Xt, yt, Xq, shrink, True)
    out["Mahalanobis, L2-normalised, shrink 0.1, full rank"] = _mahalanobis(_unit(Xt), yt, _unit(Xq), 0.1)
    out["Mahalanobis, L2-normalised, shrink 0.1, rank 128 (edgetl Novelty)"] = Novelty.fit(Xt, yt, Xh).score(Xq)
    sims = _unit(Xq) @ _unit(Xt).T
    for k in (1, 10):
        out[f"kNN cosine distance, k={k}"] = -np.sort(sims, axis=1)[:, -k]
    head = make_head("softmax", seed=seed).fit(Xt, yt)
    logits = head.decision_function(Xq).astype(np.float64)
    m = logits.max(axis=1, keepdims=True)
    out["energy (−logsumexp of softmax-head logits)"] = -(m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
    out["max softmax probability (negated)"] = -softmax(logits).max(axis=1)
    out["max logit (negated)"] = -logits.max(axis=1)
    return out


# ------------------------------------------------------------------------------------------------------- image folders
def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, index: np.ndarray, split: str) -> None:
    from PIL import Image

    from edgetl.datasets.fashion_mnist import CLASSES

    for i in index:
        folder = root / CLASSES[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(folder / f"{split}_{i:05d}.png")


def fresh_runtime(base: Path, work: Path, name: str, store_from: Path | None = None) -> Any:
    """A private copy of the bundle (no device state), optionally seeded with an embedding store."""
    from edgetl.device import DeviceRuntime

    dest = work / name
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("state"))
    if store_from is not None and (store_from / "state" / "store").is_dir():
        shutil.copytree(store_from / "state" / "store", dest / "state" / "store")
    return DeviceRuntime(dest, backend="onnx", precision="fp32", threads=2, batch_size=128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "learning.json")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from edgetl.data import stratified_split
    from edgetl.datasets.fashion_mnist import CLASSES, load_split

    arrays, meta = load(args.size)
    train_idx = balanced(arrays["train_y"], 600, args.seed)
    test_idx = balanced(arrays["test_y"], 200, args.seed)
    results: dict[str, Any] = {"embeddings": meta, "split": {"train": len(train_idx), "test": len(test_idx),
                                                             "seed": args.seed}}

    # 1a. candidate scores on the cached embeddings: the train/held-out split device train makes
    X, y = arrays["train_X"][train_idx], arrays["train_y"][train_idx]
    known = y < 5
    X, y = X[known], y[known]
    tr, held = stratified_split(y, 0.2, args.seed)
    Xq, yq = arrays["test_X"][test_idx], arrays["test_y"][test_idx]
    unknown = (yq >= 5).astype(np.int64)
    cands = candidate_scores(X[tr], y[tr], X[held], Xq, args.seed)
    results["unknown_candidates"] = {name: round(auroc(s, unknown), 4) for name, s in cands.items()}
    print(json.dumps(results["unknown_candidates"], indent=1), file=sys.stderr)

    # 2b. the stricter, store-free variant: partial_fit with classes 5-9 only (old samples never revisited; the
    # centring mean stays that of classes 0-4)
    from edgetl.heads import make_head

    Xall, yall = arrays["train_X"][train_idx], arrays["train_y"][train_idx]
    results["partial_fit"] = {}
    for kind in ("ncm", "imprint"):
        inc = make_head(kind, seed=args.seed).fit(Xall[yall < 5], yall[yall < 5])
        for c in range(5, 10):
            inc.partial_fit(Xall[yall == c], yall[yall == c])
        whole = make_head(kind, seed=args.seed).fit(Xall, yall)
        acc_inc, acc_whole = float((inc.predict(Xq) == yq).mean()), float((whole.predict(Xq) == yq).mean())
        results["partial_fit"][kind] = {"classes_0_4_then_partial_fit_5_to_9": round(acc_inc, 4),
                                        "all_10_at_once": round(acc_whole, 4)}
    print(json.dumps(results["partial_fit"]), file=sys.stderr)

    base = bundle_dir(args.size)
    with tempfile.TemporaryDirectory(prefix="edgetl-learning-") as tmp:
        work = Path(tmp)
        tr_images, tr_labels = load_split("train")
        te_images, te_labels = load_split("test")
        write_folder(work / "train", tr_images, tr_labels, train_idx, "train")
        write_folder(work / "test", te_images, te_labels, test_idx, "test")
        five = work / "five"
        for c in CLASSES[:5]:
            shutil.copytree(work / "train" / c, five / c, copy_function=os.link)

        # 1b + 2. softmax and ncm: classes 0-4, predict (unknown), then add 5-9 one by one
        addition: dict[str, Any] = {}
        first: Path | None = None
        for head in ("softmax", "ncm"):
            rt = fresh_runtime(base, work, f"{head}-add", first)
            rt.train(five, head=head, seed=args.seed)
            if head == "softmax":
                paths = [work / "test" / CLASSES[c] / f"test_{i:05d}.png"
                         for i, c in zip(test_idx, te_labels[test_idx])]
                res = rt.predict(paths)
                scores = np.array([r["novelty"] for r in res])
                flags = np.array([r["unknown"] for r in res])
                lab = (te_labels[test_idx] >= 5).astype(np.int64)
                results["unknown"] = {"head": "softmax (device train on classes 0-4, default settings)",
                                      "score": "Novelty (what DeviceRuntime.predict returns as `novelty`)",
                                      "auroc": round(auroc(scores, lab), 4),
                                      "threshold": float(rt.novelty_model(rt.current_version()).threshold),
                                      "known_flagged_unknown": round(float(flags[lab == 0].mean()), 4),
                                      "unknown_flagged_unknown": round(float(flags[lab == 1].mean()), 4),
                                      "n_known": int((lab == 0).sum()), "n_unknown": int(lab.sum())}
                print(json.dumps(results["unknown"]), file=sys.stderr)
            start = time.perf_counter()
            for c in CLASSES[5:]:
                rt.add_class(c, work / "train" / c)
            add_s = time.perf_counter() - start
            added = rt.evaluate(work / "test")
            rt_all = fresh_runtime(base, work, f"{head}-all", rt.bundle.path)
            rt_all.train(work / "train", head=head, seed=args.seed)
            together = rt_all.evaluate(work / "test")
            addition[head] = {"classes_0_4_then_add_class_5_to_9": round(added["accuracy"], 4),
                              "all_10_at_once": round(together["accuracy"], 4),
                              "difference_points": round(100 * (together["accuracy"] - added["accuracy"]), 2),
                              "add_class_seconds_total": round(add_s, 2), "n_test": added["n"]}
            print(json.dumps({head: addition[head]}), file=sys.stderr)
            first = rt.bundle.path
            if head == "softmax":
                # 3. drift against the all-class softmax head
                from PIL import Image
                from skimage import data as skdata

                photos = work / "photos"
                photos.mkdir()
                for name in PHOTOS:
                    if hasattr(skdata, name):
                        Image.fromarray(getattr(skdata, name)()).save(photos / f"{name}.png")
                results["drift"] = {
                    "head": "softmax on all 10 classes (6,000 images)",
                    "skimage_photos": rt_all.drift(photos), "fashion_mnist_test": rt_all.drift(work / "test")}
                print(json.dumps(results["drift"]), file=sys.stderr)
        results["class_addition"] = addition

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
