"""The one preprocessing implementation, shared by the host (training, calibration, parity) and the device.

An image (PIL image or HxWxC uint8 array) becomes a float32 ``(3, S, S)`` array: convert to RGB, resize the shorter side
to ``resize``, centre-crop ``input_size``, then ``(pixel / scale - mean) / std``, channels first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edgetl.errors import DataError

if TYPE_CHECKING:
    from edgetl.registry import Preprocessing

_RESAMPLE = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image.Resampling values


#: modes whose pixels are numbers rather than 8-bit levels; :func:`to_rgb` stretches them to 0..255
NUMERIC_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
#: longest side / shortest side beyond which an image is refused (a line of pixels is no photo, and resizing its short
#: side to the model's size would need a buffer as many times larger)
MAX_ASPECT = 20.0


def numeric_levels(image: Any) -> tuple[float, float]:
    """``(low, high)`` with which :func:`to_rgb` maps a numeric (16-bit, int32, float) image to 0..255: NaN and
    infinities count as 0, negative values are shifted up by ``-low`` (``low <= 0``), then ``high - low`` becomes 255.
    The levels of a whole image are ``min`` of the lows and ``max`` of the highs of its parts."""
    array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return min(0.0, float(array.min(initial=0.0))), float(array.max(initial=-np.inf))


def to_rgb(image: Any, levels: tuple[float, float] | None = None) -> Any:
    """Return a PIL RGB image from a PIL image of any mode (L, LA, P, RGBA, I;16, CMYK …) or a uint8 array.

    Transparent pixels are composed over white so that RGBA and palette images with transparency look as displayed.
    Numeric images (:data:`NUMERIC_MODES`) are stretched with ``levels`` (``(low, high)`` from :func:`numeric_levels`
    of the whole image; default: this image's own), so that bands of one image convert alike.
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            raise DataError(f"expected a uint8 image array, found dtype {array.dtype}; convert it with .astype(np.uint8)")
        if array.ndim == 2:
            image = Image.fromarray(array, mode="L")
        elif array.ndim == 3 and array.shape[2] in (1, 3, 4):
            image = Image.fromarray(array.squeeze(2) if array.shape[2] == 1 else array)
        else:
            raise DataError(f"expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), found {array.shape}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in NUMERIC_MODES:
        low, high = levels if levels is not None else numeric_levels(image)
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        array -= low
        peak = max(0.0, high - low) or 1.0
        image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def check_shape(width: int, height: int, what: str = "image", max_aspect: float = MAX_ASPECT) -> None:
    """Refuse an image without pixels or with a longer side more than ``max_aspect`` times its shorter side
    (:class:`DataError` naming ``what``)."""
    if width < 1 or height < 1:
        raise DataError(f"{what} has no pixels ({width}x{height}); remove or replace it")
    if max(width, height) > max_aspect * min(width, height):
        ratio = max(width, height) / min(width, height)
        raise DataError(f"{what} is {width}x{height} pixels, an aspect ratio of {ratio:.0f}:1, "
                        f"more than the limit of {max_aspect:g}:1; refusing it (not a photo) — crop it first")


def crop_image(image: Any, pp: Preprocessing) -> npt.NDArray[np.uint8]:
    """The geometric half of :func:`preprocess_image`: RGB, shorter side resized to ``pp.resize``, centre crop of
    ``pp.input_size``; a uint8 ``(S, S, 3)`` array in RGB order (what a graph with preprocessing inside takes)."""
    from PIL import Image

    rgb = to_rgb(image)
    width, height = rgb.size
    check_shape(width, height)  # a 9,000,000x1 line would need a 9,000,000*resize buffer
    ratio = pp.resize / min(width, height)
    new_w, new_h = max(pp.input_size, round(width * ratio)), max(pp.input_size, round(height * ratio))
    rgb = rgb.resize((new_w, new_h), resample=Image.Resampling(_RESAMPLE.get(pp.interpolation, 2)))
    left, top = (new_w - pp.input_size) // 2, (new_h - pp.input_size) // 2
    return np.asarray(rgb.crop((left, top, left + pp.input_size, top + pp.input_size)), dtype=np.uint8)


def preprocess_image(image: Any, pp: Preprocessing,
                     out: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.float32]:
    """One image → float32 array of shape ``(3, S, S)`` (``S = pp.input_size``), written into ``out`` when given
    (one float buffer per image, normalised in place, one transposing copy into the batch)."""
    array = crop_image(image, pp).astype(np.float32)  # (S, S, 3), a fresh buffer
    if pp.channels.upper() == "BGR":
        array = array[:, :, ::-1]
    std = np.asarray(pp.std, dtype=np.float32)
    array *= 1.0 / (np.float32(pp.scale) * std)  # (x / scale - mean) / std  ==  x * a - b
    array -= np.asarray(pp.mean, dtype=np.float32) / std
    if out is None:
        out = np.empty((3, pp.input_size, pp.input_size), dtype=np.float32)
    np.copyto(out, array.transpose(2, 0, 1))
    return out


def preprocess_batch(images: list[Any], pp: Preprocessing) -> npt.NDArray[np.float32]:
    """Several images → float32 array ``(N, 3, S, S)``, written in place into one buffer."""
    out = np.empty((len(images), 3, pp.input_size, pp.input_size), dtype=np.float32)
    for i, image in enumerate(images):
        preprocess_image(image, pp, out=out[i])
    return out
