"""Active learning vs random order on Fashion-MNIST: test accuracy against labels spent, in one run.

A simulated operator answers the console's label queue (:func:`edgetl.serve.queue.rank_head`, the exact function
``edgetl device serve`` orders its queue with) with the true label (an oracle). Setting:

- embeddings: real MobileNetV2 (ImageNet weights) through the device runtime, the committed 64 px FP32 ONNX bundle
  ``tests/data/device-bundle/mnv2-64`` (torch-free; ``DeviceRuntime.embed_images``, the device's preprocessing);
- pool: ``--pool`` unlabelled images drawn from the official *training* split; test: ``--test`` images of the official
  *test* split, which no head ever trains on — every figure comes from them;
- validation (``--validation N``): N pool images are held out as the evaluation set instead and the test split is not
  used — the split the queue's settings were chosen on, so that the test figures stay an honest check;
- start: ``--seed-per-class`` labelled images per class (the same for every strategy), then rounds of ``--batch``
  labels: **active** takes the top of the queue ranked by the current head (softmax, the device default, with its
  temperature fitted on a held-out fifth of the labels like ``device train``, and the novelty model the device fits),
  **no-spread** the same without the spread of a page over the embedding space (the queue before it), **margin**
  uncertainty order alone (no novelty places, no spread), **no-balance** the spread without the cap per predicted
  class, **all-novel** novelty places for any image beyond the threshold (not only at twice it), **no-cold-start**
  the first pages by uncertainty too (no typical images while the head has few labels), **random** takes the
  pool in a random order; the head is
  refitted after every round; ``--trials`` draws of the seed labels and the random order, curves averaged;
- reference: the accuracy of **100 random labels per class** (stratified, mean of ``--ref-seeds`` draws); target:
  active reaches it with at most half as many labels.

Writes ``docs/results/active_learning.json`` and ``docs/active_learning.png``.

    .venv/bin/python tools/measure_active_learning.py          # ~10 min on 2 shared cores (embedding cached)
    .venv/bin/python tools/measure_active_learning.py --validation 2000 --strategies active no-spread \\
        --json /tmp/val.json --png /tmp/val.png               # choosing settings: the test split is not used
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetl.heads import make_head
from edgetl.novelty import Novelty, fit_temperature
from edgetl.serve.queue import BATCH, COLD_START_PER_CLASS, NOVEL_EVERY, NOVEL_FACTOR, WINDOW, rank_head

BUNDLE = ROOT / "tests" / "data" / "device-bundle" / "mnv2-64"
#: the queue's settings per strategy: "active" is the console's queue as shipped; the others switch parts off
ABLATIONS: dict[str, dict[str, object]] = {
    "active": {},
    "no-spread": {"window": 1},  # no spread of a page: uncertainty order with novelty places
    "margin": {"window": 1, "novel_every": 0},  # uncertainty order alone
    "no-balance": {"balance": False},  # the page spread over the embedding space alone (no class cap)
    "all-novel": {"novel_factor": 1.0},  # a novelty place for any image beyond the threshold
    "no-cold-start": {"cold_start_per_class": 0},  # the first pages by uncertainty too, not by typicality
}
STRATEGIES = [*ABLATIONS, "random"]
CACHE = ROOT / ".cache" / "active_learning"


def embeddings(pool: int, test: int, seed: int, threads: int, bundle: Path = BUNDLE) -> dict[str, np.ndarray]:
    """Pool (training split) and test (test split) embeddings with labels; cached under .cache/."""
    CACHE.mkdir(parents=True, exist_ok=True)
    # the committed bundle keeps its cache name; another is named by its manifest's digest
    name = "mnv2-64" if bundle.resolve() == BUNDLE.resolve() else \
        f"{bundle.name}-{hashlib.sha256((bundle / 'manifest.json').read_bytes()).hexdigest()[:12]}"
    cache = CACHE / f"{name}_pool{pool}_test{test}_seed{seed}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    from edgetl.datasets.fashion_mnist import load_split
    from edgetl.device import DeviceRuntime

    rng = np.random.default_rng(seed)
    rt = DeviceRuntime(bundle, backend="onnx", precision="fp32", threads=threads)
    out: dict[str, np.ndarray] = {}
    for split, n, name in (("train", pool, "pool"), ("test", test, "test")):
        images, labels = load_split(split)
        idx = np.sort(rng.choice(len(labels), n, replace=False))
        start = time.perf_counter()
        out[f"{name}_X"] = rt.embed_images([images[i] for i in idx])
        out[f"{name}_y"] = labels[idx].astype(np.int64)
        print(f"embedded {n} {split} images in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    np.savez(cache, **out)
    return out


def fit(X: np.ndarray, y: np.ndarray, seed: int) -> tuple[object, float | None, Novelty | None]:
    """The device's softmax head with a temperature from a held-out fifth (as ``device train``), refitted on all."""
    from edgetl.data import stratified_split

    head = make_head("softmax", seed=seed)
    tr, va = stratified_split(y, 0.2, seed)
    temperature = None
    if len(va) and len(np.unique(y[tr])) >= 2:
        part = make_head("softmax", seed=seed).fit(X[tr], y[tr])
        temperature = fit_temperature(part.decision_function(X[va]), y[va])
    head.fit(X, y)
    novelty = Novelty.fit(X[tr], y[tr], X[va]) if len(va) and len(np.unique(y[tr])) >= 2 else None
    return head, temperature, novelty


def accuracy(head: object, X: np.ndarray, y: np.ndarray) -> float:
    return float((head.predict(X) == y).mean())  # type: ignore[attr-defined]


def run_strategy(name: str, data: dict[str, np.ndarray], seed_idx: np.ndarray, budget: int, batch: int,
                 seed: int) -> list[dict[str, float]]:
    X, y, Xt, yt = data["pool_X"], data["pool_y"], data["test_X"], data["test_y"]
    rng = np.random.default_rng(seed + 1)
    labelled = list(seed_idx)
    rest = np.setdiff1d(np.arange(len(y)), seed_idx)
    random_order = list(rng.permutation(rest))
    curve = []
    while True:
        idx = np.array(labelled)
        if name == "random":  # accuracy only: no temperature or novelty model needed
            head, temperature, novelty = make_head("softmax", seed=seed).fit(X[idx], y[idx]), None, None
        else:
            head, temperature, novelty = fit(X[idx], y[idx], seed)
        curve.append({"labels": len(labelled), "accuracy": accuracy(head, Xt, yt)})
        if len(labelled) >= budget:
            break
        take = min(batch, budget - len(labelled))
        if name == "random":
            chosen = random_order[:take]
            random_order = random_order[take:]
        else:
            mask = np.ones(len(y), dtype=bool)
            mask[idx] = False
            candidates = np.flatnonzero(mask)
            ranking = rank_head(head, X[candidates], temperature, novelty, labelled=X[idx], **ABLATIONS[name]).ranking
            chosen = list(candidates[ranking.order[:take]])
        labelled.extend(int(i) for i in chosen)
    return curve


def first_reaching(curve: list[dict[str, float]], target: float) -> int | None:
    return next((int(p["labels"]) for p in curve if p["accuracy"] >= target), None)


def plot(result: dict, out: Path) -> None:
    """The curves as a PNG drawn with Pillow (matplotlib is not a dependency of edgetl)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, left, right, top, bottom = 880, 540, 70, 20, 56, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13) if hasattr(ImageFont, "load_default") else None
    curves, ref = result["curves"], result["reference"]
    budget = result["settings"]["budget"]
    xmax = max(budget.values()) if isinstance(budget, dict) else budget
    accs = [p["accuracy"] for c in curves.values() for p in c] + [ref["accuracy"]]
    ylo = max(0.0, np.floor(min(accs) * 20) / 20)
    yhi = min(1.0, np.ceil(max(accs) * 20) / 20)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (W - left - right) * x / xmax, top + (H - top - bottom) * (1 - (y - ylo) / (yhi - ylo)))

    for k in range(11):  # grid and axes labels
        x = xmax * k / 10
        d.line([px(x, ylo), px(x, yhi)], fill="#eeeeee")
        d.text((px(x, ylo)[0], H - bottom + 6), f"{int(x)}", fill="black", font=font, anchor="ma")
    y = ylo
    while y <= yhi + 1e-9:
        d.line([px(0, y), px(xmax, y)], fill="#eeeeee")
        d.text((left - 6, px(0, y)[1]), f"{100 * y:.0f}%", fill="black", font=font, anchor="rm")
        y += 0.05
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.line([px(0, ref["accuracy"]), px(xmax, ref["accuracy"])], fill="#7f8c8d", width=1)
    d.text((px(xmax, ref["accuracy"])[0] - 4, px(xmax, ref["accuracy"])[1] - 4),
           f"reference: 100 random labels per class (1,000): {100 * ref['accuracy']:.1f}%", fill="#555555", font=font,
           anchor="rd")
    colours = {"active": "#c0392b", "no-spread": "#8e44ad", "margin": "#e67e22", "no-cold-start": "#16a085",
               "random": "#2c3e50"}
    for name, c in curves.items():
        d.line([px(p["labels"], p["accuracy"]) for p in c], fill=colours.get(name, "#16a085"), width=3)
    reached = result["active_labels_to_reference"]
    if reached:
        d.line([px(reached, ylo), px(reached, yhi)], fill="#c0392b", width=1)
        d.text((px(reached, ylo)[0] + 6, px(reached, ylo)[1] - 20), f"active reaches it at {reached} labels",
               fill="#c0392b", font=font)
    legend = {"active": "active: the console's queue (cold start, uncertainty, pages spread, 1 in 10 novelty)",
              "no-spread": "no spread: the same without the spread of a page",
              "no-cold-start": "no cold start: the same without the typical first pages",
              "margin": "margin only: uncertainty order alone", "random": "random: random order"}
    for k, name in enumerate(n for n in legend if n in curves):
        d.text((px(xmax * 0.3, 0)[0], px(0, ylo)[1] - 90 + 18 * k), legend[name], fill=colours[name], font=font)
    s = result["settings"]
    evaluated = s.get("evaluated_on", f"{s['test']} images of the test split")
    d.text((W / 2, 8), f"Fashion-MNIST, MobileNetV2 64 px: pool {s['pool'] - s.get('validation', 0)} (train split), "
           f"evaluated on {evaluated}; mean of {s.get('trials', 1)} trials", fill="black", font=font, anchor="ma")
    half = ref["labels"] // 2
    if half < xmax:  # the target: the reference with half its labels
        d.line([px(half, ylo), px(half, yhi)], fill="#95a5a6", width=1)
        d.text((px(half, ylo)[0] - 4, px(half, ylo)[1] - 36), f"target: {half} labels", fill="#7f8c8d", font=font,
               anchor="ra")
    d.text((W / 2, H - 22), "labels spent", fill="black", font=font, anchor="ma")
    d.text((8, top - 20), "test accuracy", fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def paired(result: dict) -> dict[str, dict[int, str]]:
    """Active minus each other strategy, in points, at every 100 labels both reached: "mean ± standard error" over the
    trials (paired: a trial's strategies start from the same seed labels)."""
    runs = result["trials"]
    active = np.array([[p["accuracy"] for p in t] for t in runs["active"]])
    labels = [p["labels"] for p in runs["active"][0]]
    out: dict[str, dict[int, str]] = {}
    for name, trials in runs.items():
        if name == "active" or len(trials) < 2:
            continue
        n = min(len(trials[0]), active.shape[1])
        diff = 100 * (active[:, :n] - np.array([[p["accuracy"] for p in t[:n]] for t in trials]))
        se = diff.std(axis=0, ddof=1) / np.sqrt(len(diff))
        out[name] = {labels[j]: f"{diff[:, j].mean():+.2f} ± {se[j]:.2f}" for j in range(n) if labels[j] % 100 == 0}
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=BUNDLE,
                    help="Device bundle whose FP32 ONNX extractor embeds the images (default: the committed 64 px "
                         "MobileNetV2 bundle)")
    ap.add_argument("--pool", type=int, default=10000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--validation", type=int, default=0,
                    help="Hold out this many pool images as the evaluation set in place of the test split (which is "
                         "then not used): the split on which the queue's settings are chosen.")
    ap.add_argument("--seed-per-class", type=int, default=2)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--budget", type=int, default=1000, help="Labels the random order spends.")
    ap.add_argument("--active-budget", type=int, default=600, help="Labels the active queue spends.")
    ap.add_argument("--trials", type=int, default=3, help="Seed labels and random orders drawn; curves averaged.")
    ap.add_argument("--first-trial", type=int, default=0, help="Number of the first trial (its seed offset).")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["active", "random"],
                    help="active: the console's queue; no-spread: the same without the spread of a page; margin: "
                         "uncertainty order alone; no-balance: no cap per predicted class on a page; "
                         "all-novel: novelty places beyond the threshold at any factor; no-cold-start: the first "
                         "pages by uncertainty too (no typical images while the head has few labels per class); "
                         "random: random order")
    ap.add_argument("--ref-seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "active_learning.json")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "active_learning.png")
    ap.add_argument("--plot-only", action="store_true", help="Redraw the PNG from the JSON.")
    ap.add_argument("--paired", action="store_true",
                    help="Print, from the JSON, active minus each other strategy at every 100 labels: mean and standard "
                         "error of the per-trial difference (the trials share their seed labels).")
    return ap.parse_args()


def evaluation_split(data: dict[str, np.ndarray], validation: int, seed: int) -> dict[str, np.ndarray]:
    """With ``validation`` > 0: that many pool images (drawn with ``seed``) become the evaluation set and leave the
    pool; the test split is dropped, so choices made on this split never see it."""
    if validation <= 0:
        return data
    perm = np.random.default_rng(seed + 12345).permutation(len(data["pool_y"]))
    held, pool = perm[:validation], perm[validation:]
    return {"pool_X": data["pool_X"][pool], "pool_y": data["pool_y"][pool], "test_X": data["pool_X"][held],
            "test_y": data["pool_y"][held]}


def reference(data: dict[str, np.ndarray], seeds: int, seed: int) -> dict[str, object]:
    """Accuracy of 100 random labels per class (stratified), mean of ``seeds`` draws."""
    y = data["pool_y"]
    classes = np.unique(y)
    acc = []
    for s in range(seeds):
        r = np.random.default_rng(1000 + s)
        idx = np.concatenate([r.choice(np.flatnonzero(y == c), 100, replace=False) for c in classes])
        head = make_head("softmax", seed=seed).fit(data["pool_X"][idx], y[idx])
        acc.append(accuracy(head, data["test_X"], data["test_y"]))
    return {"labels": 100 * len(classes), "accuracy": float(np.mean(acc)), "per_draw": acc}


def run_trials(args: argparse.Namespace, data: dict[str, np.ndarray], budgets: dict[str, int],
               target: float) -> dict[str, list[list[dict[str, float]]]]:
    y = data["pool_y"]
    classes = np.unique(y)
    trials: dict[str, list[list[dict[str, float]]]] = {name: [] for name in args.strategies}
    for trial in range(args.first_trial, args.first_trial + args.trials):
        rng = np.random.default_rng(args.seed + trial)  # each trial: its own seed labels and random order
        seed_idx = np.concatenate([rng.choice(np.flatnonzero(y == c), args.seed_per_class, replace=False)
                                   for c in classes])
        for name in args.strategies:
            t = time.perf_counter()
            curve = run_strategy(name, data, seed_idx, budgets[name], args.batch, args.seed + trial)
            trials[name].append(curve)
            print(f"trial {trial} {name}: {curve[-1]['accuracy']:.4f} at {budgets[name]} labels, reaches the "
                  f"reference at {first_reaching(curve, target)} ({time.perf_counter() - t:.0f} s)",
                  file=sys.stderr)
    return trials


def main() -> None:
    args = parse_args()
    if args.paired:
        print(json.dumps(paired(json.loads(args.json.read_text())), indent=1, ensure_ascii=False))
        return
    if args.plot_only:
        plot(json.loads(args.json.read_text()), args.png)
        return
    start = time.perf_counter()
    data = evaluation_split(embeddings(args.pool, args.test, args.seed, args.threads, args.bundle), args.validation,
                            args.seed)
    ref = reference(data, args.ref_seeds, args.seed)
    print(f"reference: 100 random labels per class -> {ref['accuracy']:.4f}", file=sys.stderr)
    target = float(ref["accuracy"])  # type: ignore[arg-type]
    budgets = {name: args.budget if name == "random" else args.active_budget for name in args.strategies}
    trials = run_trials(args, data, budgets, target)
    curves = {name: [{"labels": pts[0]["labels"], "accuracy": float(np.mean([p["accuracy"] for p in pts]))}
                     for pts in zip(*runs)] for name, runs in trials.items()}
    to_reference = {name: first_reaching(c, target) for name, c in curves.items()}
    reached = to_reference.get("active")
    half = int(ref["labels"]) // 2  # type: ignore[call-overload]
    result = {
        "command": "python tools/measure_active_learning.py " + " ".join(sys.argv[1:]),
        "settings": {"pool": args.pool, "test": args.test, "validation": args.validation,
                     "evaluated_on": (f"{args.validation} images held out of the training pool (validation)"
                                      if args.validation else f"{args.test} images of the test split"),
                     "seed_per_class": args.seed_per_class, "batch": args.batch, "budget": budgets,
                     "trials": args.trials, "first_trial": args.first_trial, "seed": args.seed,
                     "bundle": str(args.bundle.relative_to(ROOT) if args.bundle.is_relative_to(ROOT) else args.bundle),
                     "head": "softmax (temperature from a held-out fifth for the ranking)",
                     "ranking": "edgetl.serve.queue.rank_head",
                     "queue": {"novel_every": NOVEL_EVERY, "novel_factor": NOVEL_FACTOR, "page": BATCH,
                               "window": WINDOW, "cold_start_per_class": COLD_START_PER_CLASS},
                     "ablations": {k: v for k, v in ABLATIONS.items() if k in args.strategies}},
        "reference": ref,
        "curves": curves,
        "trials": trials,
        "active_labels_to_reference": reached,
        "random_labels_to_reference": to_reference.get("random"),
        "labels_to_reference": to_reference,
        "labels_to_reference_per_trial": {name: [first_reaching(c, target) for c in runs]
                                          for name, runs in trials.items()},
        "target": f"active (mean of the trials) reaches the reference with <= {half} labels",
        "target_met": reached is not None and reached <= half,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.png)
    print(json.dumps({k: result[k] for k in ("reference", "labels_to_reference", "labels_to_reference_per_trial",
                                             "target_met", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
