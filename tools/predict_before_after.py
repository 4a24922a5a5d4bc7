"""`edgetl device predict` wall time and output, before and after a change: the same CLI run alternately with another
checkout's sources (``--before SRC``: a `git worktree` of the older commit, put first on PYTHONPATH) and this one's.

    git worktree add /tmp/before <old-commit>
    .venv/bin/python tools/predict_before_after.py --before /tmp/before --bundle B --out before_after.json IMAGE...

The bundle must have a trained head (`edgetl device train B --data DIR`). Each run is a fresh process (imports
included), ``--runs`` per side, alternating so both see the same load; outputs must be identical (paths aside).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="sources of the older checkout")
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("images", nargs="+")
    args = ap.parse_args()
    sides = {"before": {"PYTHONPATH": str(args.before)}, "after": {}}
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    outputs: dict[str, str] = {}
    command = [sys.executable, "-m", "edgetl.cli", "device", "predict", str(args.bundle), *args.images, "--top-k", "3",
               "--json"]
    for _ in range(args.runs):
        for side, extra in sides.items():
            start = time.perf_counter()
            run = subprocess.run(command, env=dict(os.environ, **extra), capture_output=True, text=True, check=True)
            seconds[side].append(round(time.perf_counter() - start, 3))
            outputs[side] = run.stdout
    result = {"command": "python tools/predict_before_after.py " + " ".join(sys.argv[1:3]) + " …",
              "images": len(args.images), "seconds": seconds,
              "median": {side: statistics.median(v) for side, v in seconds.items()},
              "same_output": outputs["before"] == outputs["after"], "load_1min_after": round(os.getloadavg()[0], 2)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    if not result["same_output"]:
        sys.exit("the outputs differ")


if __name__ == "__main__":
    main()
