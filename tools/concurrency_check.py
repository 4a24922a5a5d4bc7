"""Randomized concurrency check: several processes interleave train / add-class / remove-class / drift / evaluate /
predict / watch --once on ONE bundle; after every run the invariant is checked:

- the current head loads and predicts;
- every content hash any head version trained on is in the embedding store (a reader never wiped a writer's rows);
- the history is consistent: versions v0001..vN without gaps and without temporary leftovers, ``current`` is one of
  them, every version was logged exactly once (promote or candidate), every logged version exists, every meta loads.

    python tools/concurrency_check.py --seeds 20 --workers 4 --ops 6          # exports a 64 px bundle (host extra)
    python tools/concurrency_check.py --bundle B --seeds 5                    # B: a bundle (a head is trained here)

Each worker is a separate Python process; every operation opens its own DeviceRuntime (as a separate CLI command
would). Expected refusals (a class that another worker already removed, a second watcher on the same inbox) are
counted, not failures. Exit code 0 when every run keeps the invariant. ``run_seed`` is what tests/test_concurrency.py
calls with a few seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BASE_CLASSES = ["bag", "coat", "dress", "sandal", "trouser"]
EXTRA_CLASSES = ["ankle_boot", "pullover", "shirt", "sneaker", "t-shirt_top"]
OPS = ["train", "train", "add-class", "remove-class", "drift", "drift", "evaluate", "predict", "watch"]
#: refusals that are a correct answer to a race, not a failure (message fragments)
EXPECTED = ("exists already", "is not in the current head", "another watcher", "too few images",
            "has classes the head does not know", "holds no images")


# ----------------------------------------------------------------------------------------------------- helpers
def _copy_images(data: Path, classes: list[str], per_class: int, out: Path, rng: np.random.Generator,
                 flat: bool = False) -> Path:
    for c in classes:
        pool = sorted((data / c).glob("*.png"))
        pick = rng.choice(len(pool), size=min(per_class, len(pool)), replace=False)
        target = out if flat else out / c
        target.mkdir(parents=True, exist_ok=True)
        for i in pick:
            shutil.copyfile(pool[i], target / f"{c}-{pool[i].name}")
    return out


def prepare(bundle: Path, data: Path, out: Path, seed: int = 0) -> Path:
    """A copy of ``bundle`` with a head trained on a few images of the base classes."""
    from edgetl.device import DeviceRuntime

    trained = Path(shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("state")))
    rng = np.random.default_rng(seed)
    folder = _copy_images(data, BASE_CLASSES, 6, out.parent / f"{out.name}-data", rng)
    DeviceRuntime(trained).train(folder, val_split=0.25, seed=seed)
    return trained


# ------------------------------------------------------------------------------------------------------ worker
def _op(name: str, bundle: Path, data: Path, scratch: Path, inbox: Path, rng: np.random.Generator) -> str:
    from edgetl.device import DeviceRuntime
    from edgetl.watch import InboxWatcher

    rt = DeviceRuntime(bundle)  # a fresh runtime per operation, like a separate command
    if name == "train":
        classes = list(rng.choice(BASE_CLASSES, size=int(rng.integers(2, 4)), replace=False))
        folder = _copy_images(data, classes, int(rng.integers(2, 5)), scratch, rng)
        report = rt.train(folder, incremental=bool(rng.random() < 0.8), wait=600, seed=int(rng.integers(1000)))
        return f"train {report.version} promoted={report.promoted}"
    if name == "add-class":
        source = str(rng.choice(EXTRA_CLASSES))
        folder = _copy_images(data, [source], 4, scratch, rng, flat=True)
        report = rt.add_class(f"x-{source}", folder, wait=600)
        return f"add-class {report.version}"
    if name == "remove-class":
        _, labels, _ = rt.load_current_head()
        extra = [c for c in labels if c.startswith("x-")]
        if not extra:
            return "remove-class skipped (no added class)"
        report = rt.remove_class(str(rng.choice(extra)), wait=600)
        return f"remove-class {report.version}"
    if name == "drift":
        folder = _copy_images(data, list(rng.choice(BASE_CLASSES + EXTRA_CLASSES, size=2, replace=False)), 3,
                              scratch, rng, flat=True)
        return f"drift {rt.drift(folder)['head_version']}"
    if name == "evaluate":
        folder = _copy_images(data, list(rng.choice(BASE_CLASSES, size=2, replace=False)), 3, scratch, rng)
        return f"evaluate {rt.evaluate(folder)['head_version']}"
    if name == "predict":
        folder = _copy_images(data, [str(rng.choice(BASE_CLASSES))], 2, scratch, rng, flat=True)
        return f"predict {rt.predict(sorted(folder.iterdir()))[0]['head_version']}"
    if name == "watch":
        _copy_images(data, [str(rng.choice(BASE_CLASSES))], 2, inbox, rng, flat=True)
        with InboxWatcher(rt, inbox, settle=0, lock_wait=600) as w:
            n = w.process_once()
            learned = w.learn_once(force=bool(rng.random() < 0.5))
        return f"watch {n} images, learn {learned.version if learned else None}"
    raise ValueError(name)


def worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``spec["ops"]`` random operations; one outcome dict per operation (never raises)."""
    import logging

    logging.disable(logging.WARNING)  # expected warnings (e.g. a busy watcher) are not the check's output
    rng = np.random.default_rng(spec["seed"])
    bundle, data, inbox = Path(spec["bundle"]), Path(spec["data"]), Path(spec["inbox"])
    outcomes = []
    for i in range(spec["ops"]):
        name = str(rng.choice(OPS))
        time.sleep(float(rng.uniform(0, 0.2)))  # vary the interleaving
        scratch = Path(spec["scratch"]) / f"op{i}"
        start = time.monotonic()
        try:
            outcomes.append({"op": name, "ok": True, "what": _op(name, bundle, data, scratch, inbox, rng)})
        except Exception as exc:  # noqa: BLE001 - classified below
            expected = any(f in str(exc) for f in EXPECTED)
            outcomes.append({"op": name, "ok": expected, "expected_refusal": expected,
                             "error": f"{type(exc).__name__}: {exc}"})
        outcomes[-1]["seconds"] = round(time.monotonic() - start, 3)
        shutil.rmtree(scratch, ignore_errors=True)
    return outcomes


# --------------------------------------------------------------------------------------------------- invariant
def check_invariant(bundle: Path) -> list[str]:
    """Everything that must hold after any interleaving; returns the violations (empty: all good)."""
    from edgetl.device import DeviceRuntime
    from edgetl.store import EmbeddingStore

    problems: list[str] = []
    rt = DeviceRuntime(bundle)
    try:
        head, labels, current = rt.load_current_head()
        head.predict(np.zeros((1, rt.bundle.feature_dim), np.float32))
    except Exception as exc:  # noqa: BLE001
        return [f"current head does not load: {type(exc).__name__}: {exc}"]
    versions = rt.state.versions()
    if versions != [f"v{i:04d}" for i in range(1, len(versions) + 1)]:
        problems.append(f"versions are not v0001..vN: {versions}")
    if current not in versions:
        problems.append(f"current {current} is not a version")
    leftovers = [p.name for p in rt.state.heads.iterdir() if p.name.startswith(".")]
    if leftovers:
        problems.append(f"temporary version folders left: {leftovers}")
    with EmbeddingStore(rt.bundle.state_dir / "store", rt.extractor_sha256) as store:
        for v in versions:
            keys = rt.state.train_keys(v)
            train_labels = rt.state.train_labels(v)
            if keys is None or train_labels is None or len(keys) != len(train_labels):
                problems.append(f"{v} does not record its training images")
                continue
            missing = sum(r is None for r in store.get_many(str(k) for k in keys))
            if missing:
                problems.append(f"{v}: {missing} of its {len(keys)} training embeddings are missing from the store")
    logged = [e for e in rt.state.audit() if e.get("action") in ("promote", "candidate")]
    if sorted(e["version"] for e in logged) != versions:
        problems.append(f"audit log records {sorted(e['version'] for e in logged)}, versions are {versions}")
    for e in rt.state.audit():
        if "version" in e and e["version"] not in (*versions, "bundle"):
            problems.append(f"audit entry names an unknown version: {e}")
    try:
        rows = rt.history()
        if sum(r["status"] == "current" for r in rows) != 1:
            problems.append("history does not have exactly one current version")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"history fails: {type(exc).__name__}: {exc}")
    try:
        rt.training_set()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"the current head's training set does not load: {type(exc).__name__}: {exc}")
    return problems


def run_seed(trained: Path, data: Path, seed: int, workers: int = 3, ops: int = 3,
             work: Path | None = None) -> dict[str, Any]:
    """One run: a fresh copy of ``trained``, ``workers`` processes of ``ops`` random operations each, then the
    invariant. Returns {"seed", "violations", "outcomes", "versions", "seconds"}."""
    work = Path(tempfile.mkdtemp(prefix=f"edgetl-conc-{seed}-", dir=work))
    try:
        bundle = Path(shutil.copytree(trained, work / "bundle"))
        inbox = work / "inbox"
        _copy_images(data, EXTRA_CLASSES[:1], 4, inbox / "_label" / "x-label", np.random.default_rng(seed), True)
        procs = []
        start = time.monotonic()
        for w in range(workers):
            spec = {"bundle": str(bundle), "data": str(data), "inbox": str(inbox), "ops": ops,
                    "seed": seed * 1000 + w, "scratch": str(work / f"w{w}")}
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
        outcomes, violations = [], []
        for w, p in enumerate(procs):
            out, err = p.communicate(timeout=1800)
            if p.returncode != 0:
                violations.append(f"worker {w} exited {p.returncode}: {err.strip()[-500:]}")
                continue
            for o in json.loads(out.strip().splitlines()[-1]):
                outcomes.append(o | {"worker": w})
                if not o["ok"]:
                    violations.append(f"worker {w} {o['op']}: {o['error']}")
        violations += check_invariant(bundle)
        from edgetl.device import DeviceRuntime

        versions = len(DeviceRuntime(bundle).state.versions())
        return {"seed": seed, "violations": violations, "outcomes": outcomes, "versions": versions,
                "seconds": round(time.monotonic() - start, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle to test on (default: export a 64 px one)")
    ap.add_argument("--data", type=Path, default=None, help="ImageFolder of images (default: the demo training set)")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--ops", type=int, default=6)
    ap.add_argument("--report", type=Path, default=None, help="write the figures here (JSON)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from edgetl.demo import demo_split

    data = args.data or demo_split("train")
    work = Path(tempfile.mkdtemp(prefix="edgetl-conc-"))
    try:
        bundle = args.bundle
        if bundle is None:
            from edgetl.host.export import export

            bundle = export(work / "exported", data, model="mobilenet_v2", image_size=64, calib_size=20,
                            eval_size=60)
        trained = prepare(bundle, data, work / "trained")
        runs, start = [], time.monotonic()
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            run = run_seed(trained, data, seed, args.workers, args.ops, work)
            runs.append(run)
            status = "ok" if not run["violations"] else "VIOLATED: " + "; ".join(run["violations"])
            print(f"seed {seed}: {len(run['outcomes'])} operations, {run['versions']} versions, {run['seconds']} s "
                  f"— {status}", flush=True)
        ops: dict[str, int] = {}
        for r in runs:
            for o in r["outcomes"]:
                ops[o["op"]] = ops.get(o["op"], 0) + 1
        summary = {"seeds": args.seeds, "workers": args.workers, "ops_per_worker": args.ops,
                   "operations": sum(len(r["outcomes"]) for r in runs), "operations_by_kind": ops,
                   "expected_refusals": sum(bool(o.get("expected_refusal")) for r in runs for o in r["outcomes"]),
                   "runs_violating": sum(bool(r["violations"]) for r in runs),
                   "violations": [v for r in runs for v in r["violations"]],
                   "versions_written": sum(r["versions"] for r in runs), "seconds": round(time.monotonic() - start, 1),
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "command": " ".join(["python", "tools/concurrency_check.py", *sys.argv[1:]])}
        print(json.dumps({k: v for k, v in summary.items() if k != "violations"}, indent=2))
        if args.report:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(json.dumps(summary, indent=2) + "\n")
        sys.exit(1 if summary["runs_violating"] else 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
