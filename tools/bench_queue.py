"""Time of one label-queue ranking (:func:`edgetl.serve.queue.rank`) with and without the cold start.

    .venv/bin/python tools/bench_queue.py [--candidates 2000] [--dim 1280] [--classes 10] [--labelled 20]

Random embeddings and probabilities stand in for the console's pool (the cost depends on the sizes, not on the
values); best of ``--repeats`` runs each, on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgetl.serve.queue import ColdStart, rank


def best_of(repeats: int, fn: object) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=2000, help="the console's pool (Console(pool=2000))")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--labelled", type=int, default=20, help="the head's labels (cold start below 6 per class)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.candidates, args.dim)).astype(np.float32)
    labelled = rng.normal(size=(args.labelled, args.dim)).astype(np.float32)
    proba = rng.dirichlet(np.ones(args.classes), args.candidates)
    warm = best_of(args.repeats, lambda: rank(proba, features=X))
    cold = best_of(args.repeats, lambda: rank(proba, features=X, cold_start=ColdStart(X, labelled)))
    print(json.dumps({"command": "python tools/bench_queue.py " + " ".join(sys.argv[1:]), **vars(args),
                      "rank_s": round(warm, 3), "rank_with_cold_start_s": round(cold, 3)}))


if __name__ == "__main__":
    main()
