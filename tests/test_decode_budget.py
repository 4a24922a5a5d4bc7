"""Image decoding under a budget: size, aspect and memory checked before decoding, large images shrunk while
decoding, EXIF orientation applied, only regular files opened (edgetl.data.load_image)."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from edgetl.data import DecodeBudget, load_image, open_input
from edgetl.errors import DataError
from edgetl.preprocess import preprocess_batch, preprocess_image, to_rgb
from edgetl.registry import Preprocessing

PP = Preprocessing(32, 37)
ROOT = Path(__file__).resolve().parents[1]


def _image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A random image of ``mode`` (noise, so that shrinking and conversion really compute something)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ("1", "L", "P"):
        image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        if mode == "P":
            image = image.convert("P")
            image.putpalette([v for i in range(256) for v in (i, 255 - i, (i * 7) % 256)])
        return image.convert("1") if mode == "1" else image
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-70000, 90000, (h, w), dtype=np.int32))
    if mode == "F":
        array = rng.normal(0, 1000, (h, w)).astype(np.float32)
        array.flat[:3] = (np.nan, np.inf, -np.inf)
        return Image.fromarray(array)
    bands = {"LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    return Image.frombytes(mode, (w, h), rng.integers(0, 256, (h, w, bands), dtype=np.uint8).tobytes())


# --------------------------------------------------------------------------------------------- checks before decoding
def test_poison_line_png_is_refused_naming_it(tmp_path: Path) -> None:
    Image.new("1", (9_000_000, 1)).save(tmp_path / "poison.png")  # 8.8 KB, 9 MP: under the pixel limit
    with pytest.raises(DataError, match=r"poison\.png is 9000000x1 pixels.*aspect ratio"):
        load_image(tmp_path / "poison.png")
    Image.new("1", (4000, 1)).save(tmp_path / "thin.png")
    with pytest.raises(DataError, match=r"thin\.png is 4000x1"):
        load_image(tmp_path / "thin.png")


def test_aspect_at_the_limit_is_accepted(tmp_path: Path) -> None:
    Image.new("RGB", (400, 20), (1, 2, 3)).save(tmp_path / "pano.png")
    assert load_image(tmp_path / "pano.png").size == (400, 20)
    with pytest.raises(DataError, match="aspect"):
        load_image(tmp_path / "pano.png", budget=DecodeBudget(max_aspect=10))


def test_preprocess_refuses_a_line_of_pixels_from_the_api() -> None:
    with pytest.raises(DataError, match="9000000x1"):  # used to overflow resizing the short side
        preprocess_image(Image.new("L", (9_000_000, 1)), PP)
    with pytest.raises(DataError, match="3x4000"):
        preprocess_image(np.zeros((4000, 3), dtype=np.uint8), PP)


def test_decoded_size_is_checked_before_decoding(tmp_path: Path) -> None:
    Image.new("RGB", (1000, 1000)).save(tmp_path / "rgb.png")
    Image.new("L", (1000, 1000)).save(tmp_path / "grey.png")
    budget = DecodeBudget(max_bytes=1_000_000)
    with pytest.raises(DataError, match=r"rgb\.png \(1000x1000 RGB PNG\) would take 4 MB to decode"):
        load_image(tmp_path / "rgb.png", budget=budget)
    assert load_image(tmp_path / "grey.png", budget=budget).mode == "RGB"  # 1 byte per pixel: within it


def test_large_jpeg_is_drafted_while_decoding(tmp_path: Path) -> None:
    _image("RGB", (2000, 1600)).save(tmp_path / "big.jpg", quality=80)
    _image("RGB", (2000, 1600)).save(tmp_path / "big.png")
    budget = DecodeBudget(max_bytes=1_000_000, work_pixels=200_000)
    image = load_image(tmp_path / "big.jpg", budget=budget)  # decoded at 1/4: 500x400, 0.8 MB
    assert image.size == (500, 400)
    with pytest.raises(DataError, match="would take 13 MB"):  # PNG has no draft mode
        load_image(tmp_path / "big.png", budget=budget)
    assert load_image(tmp_path / "big.png", budget=DecodeBudget(work_pixels=200_000)).size == (500, 400)


def test_progressive_jpeg_counts_its_coefficients(tmp_path: Path) -> None:
    _image("RGB", (1000, 1000)).save(tmp_path / "p.jpg", progressive=True, subsampling=0)
    _image("RGB", (1000, 1000)).save(tmp_path / "b.jpg", subsampling=0)
    budget = DecodeBudget(max_bytes=5_000_000)  # image 4 MB; a progressive decode adds 6 MB of coefficients
    assert load_image(tmp_path / "b.jpg", budget=budget).size == (1000, 1000)
    with pytest.raises(DataError, match="would take 10 MB"):
        load_image(tmp_path / "p.jpg", budget=budget)


def test_only_the_listed_formats_are_tried(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png", format="PCX")  # a format Pillow reads, but not ours
    with pytest.raises(DataError, match=r"x\.png is not a PNG, JPEG, BMP, TIFF, WebP or GIF file"):
        load_image(tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------ shrinking, modes
MODES = [("1", "png"), ("L", "png"), ("P", "png"), ("P+t", "png"), ("LA", "png"), ("RGB", "png"), ("RGBA", "png"),
         ("CMYK", "tif"), ("I;16", "png"), ("I;16", "tif"), ("I", "tif"), ("F", "tif"), ("RGB", "bmp"),
         ("RGBA", "webp"), ("P", "gif")]


@pytest.mark.parametrize(("mode", "fmt"), MODES)
def test_shrinking_in_bands_equals_converting_the_whole_image(mode: str, fmt: str, tmp_path: Path) -> None:
    image = _image(mode.split("+")[0], (1301, 2203))
    path = tmp_path / f"x.{fmt}"
    image.save(path, **({"transparency": 3} if mode == "P+t" else {}), **({"lossless": True} if fmt == "webp" else {}))
    budget = DecodeBudget(work_pixels=3024)
    factor = 31  # the smallest k with ceil(1301 / k) * ceil(2203 / k) <= 3024: three bands of rows
    assert math.ceil(1301 / factor) * math.ceil(2203 / factor) <= 3024 < math.ceil(1301 / 30) * math.ceil(2203 / 30)
    got = load_image(path, budget=budget)
    with Image.open(path) as full:
        want = to_rgb(full).reduce(factor)
    assert got.mode == "RGB" and got.size == want.size == (42, 72)
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_small_images_are_decoded_exactly_as_before(tmp_path: Path) -> None:
    _image("RGB", (640, 480)).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as image:
        assert np.array_equal(np.asarray(load_image(tmp_path / "x.png")), np.asarray(image.convert("RGB")))


def test_first_frame_of_animations_and_multipage_files(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (40, 30), (255 * (i % 2), 0, 60)) for i in range(4)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(tmp_path / "a.tif", save_all=True, append_images=frames[1:])
    for name in ("a.gif", "a.tif"):
        image = load_image(tmp_path / name)
        assert image.size == (40, 30) and image.getpixel((5, 5))[0] < 10, name


# ----------------------------------------------------------------------------------------------- EXIF orientation
@pytest.mark.parametrize("fmt", ["jpg", "png", "tif", "webp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pillow_exif_transpose(fmt: str, orientation: int, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone.{fmt}"
    _image("RGB", (60, 40)).save(path, exif=exif)
    with Image.open(path) as image:
        want = ImageOps.exif_transpose(image).convert("RGB")
    got = load_image(path)
    assert got.size == want.size == ((60, 40) if orientation < 5 else (40, 60))
    assert np.array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_of_a_shrunk_image(orientation: int, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    _image("RGB", (800, 600)).save(tmp_path / "big.png", exif=exif)
    with Image.open(tmp_path / "big.png") as image:
        want = ImageOps.exif_transpose(image).convert("RGB").reduce(4)
    got = load_image(tmp_path / "big.png", budget=DecodeBudget(work_pixels=30_000))
    assert np.array_equal(np.asarray(got), np.asarray(want))


# -------------------------------------------------------------------------------------------------- regular files
def _within(seconds: float, fn: Any) -> BaseException | None:
    """Run ``fn`` in a daemon thread; fail if it takes longer than ``seconds`` (a FIFO would block forever)."""
    result: list[BaseException | None] = []

    def go() -> None:
        try:
            fn()
            result.append(None)
        except BaseException as exc:  # noqa: BLE001
            result.append(exc)
    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"still blocked after {seconds} s"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    exc = _within(10, lambda: load_image(tmp_path / "pipe.png"))
    assert isinstance(exc, DataError) and "pipe.png is a FIFO, not a regular file" in str(exc)


def test_folder_and_device_are_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError, match=r"dir\.png is a folder"):
        load_image(tmp_path / "dir.png")
    if Path("/dev/zero").exists():  # endless: reading it would never finish
        exc = _within(10, lambda: load_image("/dev/zero"))
        assert isinstance(exc, DataError) and "/dev/zero is a device" in str(exc)
    with pytest.raises(DataError, match="does not exist"):
        open_input(tmp_path / "nope.png")


def test_symlink_to_an_image_is_followed(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "real.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    assert load_image(tmp_path / "link.png").size == (8, 8)


# ------------------------------------------------------------------------------------------------------ peak memory
def _budget_tool() -> Any:
    spec = importlib.util.spec_from_file_location("image_budget", ROOT / "tools" / "image_budget.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["image_budget"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS via wait4 is measured on Linux")
def test_peak_rss_of_a_hostile_palette_png(tmp_path: Path) -> None:
    """36 MP palette PNG with transparency: converting it whole took 4 RGBA copies (about 600 MB)."""
    tool = _budget_tool()
    image = Image.new("P", (6000, 6000))
    image.putpalette([v for i in range(256) for v in (i, i, i)])
    image.save(tmp_path / "p.png", transparency=0)
    del image
    outcome, peak_mb, _ = tool.measure(tmp_path / "p.png", 224)
    assert outcome == "ok 1x3x224x224" and peak_mb < 200, (outcome, peak_mb)
    outcome, peak_mb, _ = tool.measure(None, 224)
    assert peak_mb < 80, peak_mb  # the interpreter + numpy + Pillow + edgetl


def test_preprocess_batch_of_loaded_images(tmp_path: Path) -> None:
    for i, mode in enumerate(["RGB", "I;16", "P"]):
        _image(mode, (90, 70), seed=i).save(tmp_path / f"{i}.png")
    batch = preprocess_batch([load_image(tmp_path / f"{i}.png") for i in range(3)], PP)
    assert batch.shape == (3, 3, 32, 32) and np.isfinite(batch).all()


# ----------------------------------------------------------------------------------------- property-based (hypothesis)
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: (mode, file suffix, extra save options) that Pillow writes
WRITABLE = [("1", "png"), ("L", "png"), ("P", "png"), ("P+t", "png"), ("LA", "png"), ("RGB", "png"), ("RGBA", "png"),
            ("I;16", "png"), ("I;16", "tif"), ("I", "tif"), ("F", "tif"), ("CMYK", "tif"), ("RGB", "jpg"),
            ("L", "jpg"), ("CMYK", "jpg"), ("RGB", "bmp"), ("P", "gif"), ("RGB", "webp"), ("RGBA", "webp")]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(WRITABLE), width=st.integers(1, 700), height=st.integers(1, 700),
       work_pixels=st.sampled_from([64, 1000, 30_000, 1 << 22]), orientation=st.integers(0, 9),
       seed=st.integers(0, 3))
def test_decoder_properties(kind: tuple[str, str], width: int, height: int, work_pixels: int, orientation: int,
                            seed: int) -> None:
    """Any shape and mode: either a DataError naming the file (only for a too elongated image), or an upright RGB
    image of at most ``work_pixels`` pixels, shrunk by one whole factor, whose preprocessing is finite."""
    mode, fmt = kind
    image = _image(mode.split("+")[0], (width, height), seed)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"any name.{fmt}"
        options: dict[str, Any] = {"transparency": 1} if mode == "P+t" else {}
        if orientation and fmt in ("jpg", "png", "tif", "webp"):
            exif = Image.Exif()
            exif[0x0112] = orientation
            options["exif"] = exif
        image.save(path, **options)
        elongated = max(width, height) > 20 * min(width, height)
        try:
            got = load_image(path, budget=DecodeBudget(work_pixels=work_pixels))
        except DataError as exc:
            assert elongated and "any name" in str(exc) and "aspect ratio" in str(exc), str(exc)
            return
        assert not elongated
        factor = next(k for k in range(1, 1000) if math.ceil(width / k) * math.ceil(height / k) <= work_pixels)
        if fmt == "jpg" and factor > 1:  # DCT scaling first (1/2, 1/4, 1/8), then box averaging
            draft = next(s for s in (8, 4, 2, 1) if factor >= s)
            dw, dh = math.ceil(width / draft), math.ceil(height / draft)
            factor = next(k for k in range(1, 1000) if math.ceil(dw / k) * math.ceil(dh / k) <= work_pixels)
            width, height = dw, dh
        size = (math.ceil(width / factor), math.ceil(height / factor))
        upright = size if orientation in (0, 1, 2, 3, 4, 9) or fmt not in ("jpg", "png", "tif", "webp") else size[::-1]
        assert got.mode == "RGB" and got.size == upright and got.size[0] * got.size[1] <= work_pixels
        out = preprocess_image(got, PP)
        assert out.shape == (3, 32, 32) and out.dtype == np.float32 and np.isfinite(out).all()
