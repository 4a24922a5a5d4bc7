"""Choose ImprintHead's refinement settings (steps, learning rate) on a held-out part of the Fashion-MNIST *training*
split (the test split is never read): 6,000 cached MobileNetV2 96-px embeddings (tools/fmnist_embeddings.py),
80 / 20 stratified, plus a 20-shot draw.

    python tools/tune_imprint_refine.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fmnist_embeddings import balanced, load  # noqa: E402

from edgetl.data import stratified_split  # noqa: E402
from edgetl.heads import ImprintHead  # noqa: E402


def main() -> None:
    arrays, _ = load()
    X, y = arrays["train_X"], arrays["train_y"]
    idx = balanced(y, 600, 0)
    X, y = X[idx], y[idx]
    tr, va = stratified_split(y, 0.2, 0)
    shots = tr[balanced(y[tr], 20, 1)]
    print("steps  lr    held-out acc (4,800 train)  fit s   held-out acc (20-shot)")
    for steps, lr in ((0, 10.0), (10, 10.0), (30, 1.0), (30, 3.0), (30, 10.0), (100, 10.0)):
        start = time.perf_counter()
        head = ImprintHead(refine_steps=steps, learning_rate=lr).fit(X[tr], y[tr])
        seconds = time.perf_counter() - start
        few = ImprintHead(refine_steps=steps, learning_rate=lr).fit(X[shots], y[shots])
        print(f"{steps:5d} {lr:5.1f}  {(head.predict(X[va]) == y[va]).mean():.4f}                      "
              f"{seconds:6.2f}  {(few.predict(X[va]) == y[va]).mean():.4f}")


if __name__ == "__main__":
    main()
