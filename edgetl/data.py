"""ImageFolder data sets: scanning, stratified splits, batching and image decoding with clear errors."""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from struct import error as struct_error
from typing import Any, BinaryIO

import numpy as np

from edgetl.errors import DataError
from edgetl.preprocess import MAX_ASPECT, NUMERIC_MODES, check_shape, numeric_levels, to_rgb

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
    for class_dir in _class_dirs(root):
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


def _class_dirs(root: Path) -> list[Path]:
    """The class folders of ``root`` (sorted; hidden and ``_``-prefixed ones skipped). A class folder that is a
    symlink is resolved once: a loop (to itself, to ``root`` or above), a dangling link, or two class folders that are
    the same folder (or one inside another) are refused, since each would count images twice or under a wrong class.
    Links below a class folder are not followed."""
    base = root.resolve()
    found: list[tuple[Path, Path]] = []  # (class folder, its real path)
    for entry in sorted(p for p in root.iterdir() if not p.name.startswith((".", "_"))):
        if entry.is_symlink():
            try:
                real = entry.resolve(strict=True)
            except FileNotFoundError:
                raise DataError(f"class folder {entry} is a link to {os.readlink(entry)}, which does not exist; remove "
                                "the link or restore its target") from None
            except (OSError, RuntimeError):  # ELOOP (RuntimeError before Python 3.13)
                raise DataError(f"class folder {entry} is a symlink loop; remove the link") from None
            if real == base or real in base.parents:
                raise DataError(f"class folder {entry} is a symlink loop (it links to {real}, which holds the data "
                                f"folder {root}); remove the link") from None
        else:
            real = base / entry.name
        if real.is_dir():
            found.append((entry, real))
    ordered = sorted(found, key=lambda f: f[1].parts)  # a folder sorts right before the folders inside it
    for (a, real_a), (b, real_b) in zip(ordered, ordered[1:]):
        if real_a == real_b:
            x, y = sorted((a, b))
            raise DataError(f"class folders {x} and {y} are the same folder ({real_a}); keep one of them")
        if real_a in real_b.parents:
            raise DataError(f"class folder {b} links inside class folder {a} ({real_b}); its images would count twice "
                            "— remove the link")
    return [entry for entry, _ in found]


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
#: formats :func:`load_image` identifies (those of :data:`IMAGE_SUFFIXES`; JPEG includes cameras' multi-picture MPO);
#: nothing else is even tried (no EPS through Ghostscript, no exotic parsers)
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "TIFF", "WEBP", "GIF")


@dataclass(frozen=True)
class DecodeBudget:
    """What :func:`load_image` accepts and how large it lets an image become in memory.

    Checked from the header, before decoding: ``max_pixels`` (decompression bombs), ``max_aspect`` (longer / shorter
    side) and ``max_bytes``, the memory the decoder would hold (Pillow keeps 4 bytes per pixel for RGB, RGBA, CMYK and
    LA, 1 for L, P and 1-bit, 2 for 16-bit grey; progressive JPEG adds its coefficients, TIFF a strip, WebP a frame).
    An image of more than ``work_pixels`` pixels is then shrunk by a whole factor (JPEG while decoding, at 1/2, 1/4
    or 1/8; others by box averaging in bands of rows) before it is converted to RGB, so that no conversion ever
    handles a full-size copy. With the defaults one image costs at most about 300 MB of peak RSS
    (``tools/image_budget.py`` measures it).
    """

    max_pixels: int = MAX_PIXELS
    max_aspect: float = MAX_ASPECT
    max_bytes: int = 200_000_000
    work_pixels: int = 1 << 22  # 2048 x 2048: far above any model input, and what a conversion may cost (16 MB)


#: bytes per pixel in Pillow's memory; modes not listed take 4 (RGB, RGBA, CMYK, LA, PA, YCbCr, I, F …)
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
#: peak memory of a format's decoder in multiples of the decoded image (WebP: libwebp's canvases and frame, then
#: Pillow's copy; measured 3.9); a compressed TIFF adds one strip or tile (see :func:`_strip_pixels`)
_DECODER_FACTOR = {"WEBP": 4.0}
#: EXIF orientation → the transposition that shows the image upright (the table of Pillow's ImageOps.exif_transpose)
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                7: "TRANSVERSE", 8: "ROTATE_90"}
_BAND_PIXELS = 1 << 20  # rows converted at a time when shrinking


def open_input(path: str | os.PathLike[str], what: str = "image", files: str = "image files") -> BinaryIO:
    """Open a user-given input file for reading, refusing anything but a non-empty regular file (a folder, FIFO,
    socket or device would hang or never end) with a :class:`DataError` naming it. Opened without blocking: a FIFO
    swapped in after the check is refused too. ``what`` names the file in messages, ``files`` what to pass instead."""
    path = Path(path)
    try:
        info = os.stat(path)
        _check_regular(info, path, what, files)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise DataError(f"{what} {path} does not exist") from exc
    except NotADirectoryError as exc:
        raise DataError(f"{what} {path} does not exist (a part of its path is a file)") from exc
    except OSError as exc:
        raise DataError(f"cannot open {what} {path} ({exc.strerror or exc}); check the path and its "
                        "permissions") from exc
    try:
        info = os.fstat(fd)
        _check_regular(info, path, what, files)
        if info.st_size == 0:
            raise DataError(f"{what} {path} is empty (0 bytes); remove or replace the file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_regular(info: os.stat_result, path: Path, what: str, files: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{what} {path} is a folder, not a file; pass {files}")
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device"
        raise DataError(f"{what} {path} is {kind}, not a regular file; refusing it — pass {files}")


def load_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS, budget: DecodeBudget | None = None) -> Any:
    """Decode an image file into an RGB PIL image, upright (EXIF orientation applied), within ``budget`` (see
    :class:`DecodeBudget`; ``max_pixels`` overrides its pixel limit). Any mode is converted (see
    :func:`edgetl.preprocess.to_rgb`); of an animated or multi-page file the first frame is used. A missing, empty,
    truncated, non-regular, non-image, oversized or too elongated file raises :class:`DataError` naming the file.
    Host and device both decode through here, so they see the same pixels."""
    from PIL import Image, UnidentifiedImageError

    budget = budget or DecodeBudget()
    if max_pixels != MAX_PIXELS:
        budget = replace(budget, max_pixels=max_pixels)
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on stderr (large image, odd EXIF); the checks here decide
            with open_input(path) as fh, Image.open(fh, formats=IMAGE_FORMATS) as image:
                full = image.size
                _check_size(*full, path, budget)
                if image.format in ("JPEG", "MPO"):
                    _draft(image, budget)
                _check_memory(image, full, path, budget)
                image.load()
                method = _ORIENTATION.get(_orientation(image))
                rgb = _shrink_to_rgb(image, budget.work_pixels)
                return rgb.transpose(Image.Transpose[method]) if method else rgb
    except DataError:
        raise
    except UnidentifiedImageError as exc:
        raise DataError(f"image {path} is not a PNG, JPEG, BMP, TIFF, WebP or GIF file (or its header is corrupt); "
                        "remove or replace the file") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError,
            struct_error, IndexError, TypeError, ZeroDivisionError, MemoryError, OverflowError, KeyError) as exc:
        raise DataError(f"cannot decode image {path} ({type(exc).__name__}: {exc}); remove or replace the "
                        "file") from exc


def _orientation(image: Any) -> int | None:
    """The EXIF orientation tag (1-8), read as Pillow's ``ImageOps.exif_transpose`` reads it; None when absent or
    unreadable (a corrupt EXIF block does not make the picture unusable)."""
    try:
        value = image.getexif().get(0x0112)
    except (OSError, SyntaxError, ValueError, EOFError, struct_error, IndexError, TypeError, KeyError):
        return None
    return value if isinstance(value, int) else None


def _draft(image: Any, budget: DecodeBudget) -> None:
    """Let a large JPEG decode at 1/2, 1/4 or 1/8 of its size (DCT scaling: less memory and time) when the image
    would be shrunk at least that much anyway."""
    width, height = image.size
    factor = _factor(width, height, budget.work_pixels)
    scale = next((s for s in (8, 4, 2) if factor >= s), 1)
    if scale > 1:
        image.draft(None, (width // scale, height // scale))


def _check_size(width: int, height: int, path: Path, budget: DecodeBudget) -> None:
    if width * height > budget.max_pixels:
        raise DataError(f"image {path} has {width}x{height} pixels, more than the limit of {budget.max_pixels}; "
                        "refusing it (possible decompression bomb) — downscale it first")
    check_shape(width, height, f"image {path}", budget.max_aspect)


def _check_memory(image: Any, full: tuple[int, int], path: Path, budget: DecodeBudget) -> None:
    """The memory decoding would take (``full``: the size before a JPEG draft), from the header alone."""
    width, height = full
    pixel_bytes = _PIXEL_BYTES.get(image.mode, 4)
    need = image.size[0] * image.size[1] * pixel_bytes * _DECODER_FACTOR.get(image.format, 1.0)
    if image.format == "TIFF" and image.info.get("compression") != "raw":  # libtiff decodes a strip into a buffer
        need += _strip_pixels(image) * pixel_bytes
    layers = getattr(image, "layer", None)
    if image.format in ("JPEG", "MPO") and image.info.get("progressive") and layers:
        # libjpeg keeps every DCT coefficient (2 bytes) of a progressive image at full size, whatever the draft
        hmax, vmax = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
        need += sum(2.0 * width * height * layer[1] * layer[2] / (hmax * vmax) for layer in layers)
    if need > budget.max_bytes:
        raise DataError(f"image {path} ({width}x{height} {image.mode} {image.format}) would take "
                        f"{need / 1e6:.0f} MB to decode, more than the budget of {budget.max_bytes / 1e6:.0f} MB; "
                        "refusing it — downscale it or save it as JPEG")


def _strip_pixels(image: Any) -> int:
    """Pixels of one TIFF strip or tile (the whole image when the tags are missing or odd)."""
    width, height = image.size
    tags = getattr(image, "tag_v2", {})
    try:
        if 322 in tags and 323 in tags:
            return min(width * height, int(tags[322]) * int(tags[323]))
        return width * min(height, max(1, int(tags.get(278, height))))
    except (TypeError, ValueError):
        return width * height


def _factor(width: int, height: int, work_pixels: int) -> int:
    """The smallest whole factor that shrinks ``width x height`` to at most ``work_pixels`` pixels."""
    factor = max(1, math.isqrt(max(0, width * height // max(1, work_pixels))))
    while -(-width // factor) * -(-height // factor) > work_pixels:
        factor += 1
    return factor


def _shrink_to_rgb(image: Any, work_pixels: int) -> Any:
    """The loaded ``image`` in RGB, box-averaged by a whole factor down to at most ``work_pixels`` pixels; a large
    image is converted a band of rows at a time, so no full-size copy in another mode is ever made."""
    from PIL import Image

    width, height = image.size
    factor = _factor(width, height, work_pixels)
    if factor == 1:
        return to_rgb(image)
    rows = factor * max(1, _BAND_PIXELS // (width * factor))
    bands = [(0, y, width, min(height, y + rows)) for y in range(0, height, rows)]
    levels = None
    if image.mode in NUMERIC_MODES:  # one stretch for the whole image, as a full-size conversion would use
        parts = [numeric_levels(image.crop(box)) for box in bands]
        levels = min(p[0] for p in parts), max(p[1] for p in parts)
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for box in bands:
        out.paste(to_rgb(image.crop(box), levels).reduce(factor), (0, box[1] // factor))
    return out


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items."""
    if size < 1:
        raise DataError(f"batch size must be at least 1, found {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]
