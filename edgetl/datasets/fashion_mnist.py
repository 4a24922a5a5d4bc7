"""Fashion-MNIST (Zalando, MIT licence) from its IDX files — e.g. Debian's ``dataset-fashion-mnist`` package — into an
ImageFolder of PNG files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from edgetl.errors import DataError

CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into an array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path} ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(raw) - offset != count:
        raise DataError(f"{path} is truncated: header declares {dims}, file holds {len(raw) - offset} of {count} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find(source: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (source / name).is_file():
            return source / name
    raise DataError(f"{stem}(.gz) not found in {source}; install Debian's dataset-fashion-mnist "
                    "(apt-get install dataset-fashion-mnist) or pass --source DIR with the IDX files")


def load_split(split: str, source: str | os.PathLike[str] = DEBIAN_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` of the official ``train`` or ``test`` split."""
    if split not in _FILES:
        raise DataError(f"unknown split {split!r}; use train or test")
    source = Path(source)
    images = read_idx(_find(source, _FILES[split][0]))
    labels = read_idx(_find(source, _FILES[split][1]))
    if len(images) != len(labels):
        raise DataError(f"{source}: {len(images)} images but {len(labels)} labels in the {split} split")
    return images, labels


def write_image_folder(out: str | os.PathLike[str], split: str, per_class: int | None = None, seed: int = 0,
                       source: str | os.PathLike[str] = DEBIAN_DIR) -> int:
    """Write ``per_class`` images of each class (all when None, chosen at random with ``seed`` otherwise) of the
    ``split`` as ``out/<class>/<split>_<index>.png``. Returns the number of images written."""
    from PIL import Image

    images, labels = load_split(split, source)
    rng = np.random.default_rng(seed)
    out = Path(out)
    written = 0
    for c, name in enumerate(CLASSES):
        idx = np.flatnonzero(labels == c)
        if per_class is not None:
            if per_class > len(idx):
                raise DataError(f"{split} split has {len(idx)} images of {name}, fewer than --per-class {per_class}")
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx:
            Image.fromarray(images[i], mode="L").save(folder / f"{split}_{i:05d}.png", optimize=True)
            written += 1
    return written
