"""ImageFolder data sets: scanning, stratified splits, batching and image decoding with clear errors."""

from __future__ import annotations

import os
from struct import error as struct_error
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})


@dataclass(frozen=True)
class Sample:
    """One labelled image file; ``label`` indexes :attr:`ImageFolder.classes`."""

    path: Path
    label: int


@dataclass(frozen=True)
class ImageFolder:
    """A data set in the ImageFolder layout: ``root/<class name>/<image>``; classes sorted by name."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        """Integer labels, shape ``(N,)``."""
        return np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageFolder:
        return ImageFolder(self.root, self.classes, tuple(self.samples[int(i)] for i in indices))

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(c) for name, c in zip(self.classes, counts)}


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """Every image file under ``root`` (recursively, sorted; hidden files skipped); empty when ``root`` is no folder."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if _is_image(p)) if root.is_dir() else []


def scan_image_folder(root: str | os.PathLike[str], min_classes: int = 2) -> ImageFolder:
    """Read an ImageFolder tree. Raises :class:`DataError` for a missing or empty folder or too few classes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass a folder with one sub-folder per class")
    return scan_class_folders(root, min_classes, _is_image, "images", f"{root}/<class>/<image>.png|jpg|bmp|tif",
                              "data folder")


def scan_class_folders(root: Path, min_classes: int, is_item: Callable[[Path], bool], noun: str, expected: str,
                       what: str) -> ImageFolder:
    """One class per sub-folder of ``root`` (hidden and ``_``-prefixed ones skipped), its items (``is_item``) found
    recursively. Raises :class:`DataError` naming ``what`` and the ``noun`` for an empty tree or too few classes."""
    classes: list[str] = []
    samples: list[Sample] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        files = sorted(p for p in class_dir.rglob("*") if is_item(p))
        if files:
            classes.append(class_dir.name)
            samples.extend(Sample(p, len(classes) - 1) for p in files)
    if not samples:
        loose = [p.name for p in root.iterdir() if is_item(p)][:3]
        hint = (f"; found loose {noun} ({', '.join(loose)}) — move them into one sub-folder per class" if loose
                else f"; expected {expected}")
        raise DataError(f"{what} {root} holds no {noun}{hint}")
    if len(classes) < min_classes:
        raise DataError(f"{what} {root} has {len(classes)} class ({', '.join(classes)}); a classifier needs at least "
                        f"{min_classes} classes — add a sub-folder of {noun} for each other class")
    return ImageFolder(root, tuple(classes), tuple(samples))


def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, held-out) with about ``fraction`` of each class held out (at least one per class
    when that class has two or more samples). Returns sorted index arrays."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"split fraction must be in [0, 1), found {fraction}")
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n = int(round(fraction * len(idx)))
        if fraction > 0 and n == 0 and len(idx) >= 2:
            n = 1
        held.append(idx[:n])
    held_idx = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


#: decompression-bomb guard: images with more pixels are refused before they are decoded
MAX_PIXELS = 64_000_000


def load_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> Any:
    """Decode an image file fully into an RGB PIL image (any mode converted, see :func:`edgetl.preprocess.to_rgb`);
    a missing, empty, truncated, non-image or oversized file raises :class:`DataError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    from edgetl.preprocess import to_rgb

    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"image {path} is empty (0 bytes); remove or replace the file")
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise DataError(f"image {path} has {width}x{height} pixels, more than the limit of {max_pixels}; "
                                "refusing it (possible decompression bomb) — downscale it first")
            image.load()
            return to_rgb(image)
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"image {path} does not exist") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError,
            struct_error, IndexError, TypeError, ZeroDivisionError, MemoryError) as exc:
        raise DataError(f"cannot decode image {path} ({type(exc).__name__}: {exc}); remove or replace the file") from exc


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items."""
    if size < 1:
        raise DataError(f"batch size must be at least 1, found {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]
