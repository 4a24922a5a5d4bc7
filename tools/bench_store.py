"""Embedding store benchmark: the SQLite store (edgetl.store) against the earlier whole-file ``.npz`` store, at 1k / 10k /
100k embeddings of 1280-d float32 (MobileNetV2's feature size).

    python tools/bench_store.py                          # 1000 10000 100000, writes docs/results/bench_store.json
    python tools/bench_store.py --sizes 1000 10000 --repeats 5

Per size, each figure the median of ``--repeats`` runs (one run at 100k), on a fresh folder:
- ``fill``: put N embeddings and save (the first `device train` on N images);
- ``open_get_100``: open the store and read 100 random embeddings (a `device predict`/`drift` on 100 cached images);
- ``load_all``: open the store and read all N (what `train --incremental` reads: the current training set);
- ``insert_100``: open, add 100 new embeddings, save (a `device drift` on 100 new images, a field-learning run);
- file size on disk. The npz store is the code edgetl used before (float16 on disk, read whole, rewritten whole).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgetl._atomic import atomic_write  # noqa: E402
from edgetl.store import EmbeddingStore  # noqa: E402

SHA = "0123456789abcdef" * 4


class NpzStore:
    """The earlier store, kept here only to measure against: one ``.npz`` per extractor, float16, read whole on open
    and rewritten whole on every save."""

    def __init__(self, folder: Path, extractor_sha256: str):
        self.path = folder / f"{extractor_sha256[:16]}.npz"
        self._index: dict[str, int] = {}
        self._rows: list[np.ndarray] = []
        self._dirty = False
        if self.path.is_file():
            with np.load(self.path, allow_pickle=False) as data:
                keys, emb = data["keys"], data["embeddings"]
            self._rows = list(emb)
            self._index = {str(k): i for i, k in enumerate(keys)}

    def get_many(self, keys: list[str]) -> list[np.ndarray | None]:
        return [None if (i := self._index.get(k)) is None else self._rows[i].astype(np.float32) for k in keys]

    def put(self, key: str, embedding: np.ndarray) -> None:
        row = np.asarray(embedding, dtype=np.float16)
        if key in self._index:
            self._rows[self._index[key]] = row
        else:
            self._index[key] = len(self._rows)
            self._rows.append(row)
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        keys = np.array(list(self._index), dtype="U64")
        emb = np.stack(self._rows) if self._rows else np.zeros((0, 0), dtype=np.float16)
        atomic_write(self.path, lambda fh: np.savez(fh, keys=keys, embeddings=emb))
        self._dirty = False

    def close(self) -> None:
        return None


def _keys(n: int, start: int = 0) -> list[str]:
    return [hashlib.sha256(f"image-{i}".encode()).hexdigest() for i in range(start, start + n)]


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def bench(kind: str, n: int, dim: int, rng: np.random.Generator, work: Path) -> dict[str, float]:
    make = {"sqlite": EmbeddingStore, "npz": NpzStore}[kind]
    X = rng.standard_normal((n, dim), dtype=np.float32)
    keys = _keys(n)
    new = rng.standard_normal((100, dim), dtype=np.float32)
    new_keys = _keys(100, start=n)
    folder = Path(tempfile.mkdtemp(dir=work))
    try:
        def fill() -> None:
            store = make(folder, SHA)
            for k, x in zip(keys, X):
                store.put(k, x)
            store.save()
            store.close()

        def open_get_100() -> None:
            store = make(folder, SHA)
            pick = [keys[i] for i in rng.choice(n, size=min(100, n), replace=False)]
            assert all(r is not None for r in store.get_many(pick))
            store.close()

        def load_all() -> None:
            store = make(folder, SHA)
            rows = store.get_many(keys)
            assert rows[-1] is not None
            store.close()

        def insert_100() -> None:
            store = make(folder, SHA)
            for k, x in zip(new_keys, new):
                store.put(k, x)
            store.save()
            store.close()

        out = {"fill_s": _time(fill), "open_get_100_s": _time(open_get_100), "load_all_s": _time(load_all),
               "insert_100_s": _time(insert_100), "bytes": _size(folder)}
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="folder for the stores (default: a temporary one)")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "results" / "bench_store.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="edgetl-bench-store-", dir=args.work))
    results = []
    try:
        for n in args.sizes:
            for kind in ("npz", "sqlite"):
                runs = [bench(kind, n, args.dim, rng, work) for _ in range(1 if n >= 100_000 else args.repeats)]
                row = {"store": kind, "n": n, "dim": args.dim, "runs": len(runs)}
                row |= {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
                results.append(row)
                print(f"{kind:>6} n={n:>6}: fill {row['fill_s']:.3f} s, open+get 100 {row['open_get_100_s']:.4f} s, "
                      f"load all {row['load_all_s']:.3f} s, insert 100 {row['insert_100_s']:.4f} s, "
                      f"{row['bytes'] / 1e6:.1f} MB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"results": results, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
              "numpy": np.__version__, "sqlite": __import__("sqlite3").sqlite_version,
              "load1": float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else None,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(["python", "tools/bench_store.py", *sys.argv[1:]])}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
