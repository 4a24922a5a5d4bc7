"""Peak memory of decoding + preprocessing hostile images: one fresh subprocess per image, its peak RSS (``ru_maxrss``
from ``wait4``), printed as a markdown table.

    python tools/image_budget.py [--size 224] [--keep DIR] [--only NAME ...]

Each image is built first (in a separate process, so the measuring parent stays small: Linux carries a parent's
peak into a child's ``ru_maxrss`` across ``fork``/``exec``), then decoded by :func:`edgetl.data.load_image` and
preprocessed by :func:`edgetl.preprocess.preprocess_batch` in a process that imports nothing else. The first row is that process
with no image at all (the interpreter, numpy, Pillow and edgetl).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BUDGET_MB = 300

#: name → (what it is, file name); built by :func:`build` in a child process
CASES: dict[str, tuple[str, str]] = {
    "baseline": ("no image: interpreter + numpy + Pillow + edgetl", ""),
    "poison-png": ("PNG 9,000,000×1, 1-bit (8.8 KB on disk, under the pixel limit)", "poison.png"),
    "thin-png": ("PNG 4000×1 (85 bytes)", "thin.png"),
    "wide-panorama": ("PNG 20000×1000 RGB (aspect 20, 20 MP)", "pano.png"),
    "bomb-81mp": ("PNG 9000×9000 1-bit (81 MP, over the pixel limit)", "bomb.png"),
    "png-64mp-1bit": ("PNG 8000×8000 1-bit (64 MP, at the pixel limit)", "bilevel.png"),
    "png-64mp-L": ("PNG 8000×8000 grey (64 MP)", "grey.png"),
    "png-64mp-rgb": ("PNG 8000×8000 RGB (64 MP: 256 MB decoded)", "rgb64.png"),
    "png-40mp-rgb": ("PNG 7000×5700 RGB (40 MP)", "rgb40.png"),
    "png-40mp-rgba": ("PNG 7000×5700 RGBA (40 MP)", "rgba40.png"),
    "png-40mp-la": ("PNG 7000×5700 grey + alpha (40 MP)", "la40.png"),
    "png-64mp-palette-transparent": ("PNG 8000×8000 palette with a transparent index (64 MP)", "palette.png"),
    "png-64mp-16bit-grey": ("PNG 8000×8000 16-bit grey (I;16, 64 MP)", "grey16.png"),
    "png-40mp-16bit-rgb": ("PNG 7000×5700 16-bit RGB (40 MP)", "rgb16.png"),
    "tiff-64mp-I16": ("TIFF 8000×8000 I;16 (64 MP)", "i16.tif"),
    "tiff-40mp-F": ("TIFF 7000×5700 32-bit float with NaN and inf (40 MP)", "float.tif"),
    "tiff-64mp-F": ("TIFF 8000×8000 32-bit float (64 MP: 256 MB decoded)", "float64mp.tif"),
    "tiff-40mp-cmyk-lzw": ("TIFF 7000×5700 CMYK, LZW, one strip (40 MP)", "cmyk.tif"),
    "tiff-multiframe": ("TIFF, 20 frames of 4000×3000 RGB", "frames.tif"),
    "gif-animated": ("GIF, 20 frames of 4000×3000", "anim.gif"),
    "jpeg-64mp-baseline": ("JPEG 8000×8000 RGB baseline (64 MP)", "big.jpg"),
    "jpeg-64mp-progressive": ("JPEG 8000×8000 RGB progressive 4:2:0 (64 MP)", "progressive.jpg"),
    "jpeg-64mp-progressive-444": ("JPEG 8000×8000 RGB progressive 4:4:4 (64 MP)", "progressive444.jpg"),
    "jpeg-64mp-cmyk": ("JPEG 8000×8000 CMYK (64 MP)", "cmyk.jpg"),
    "jpeg-12mp-exif-rotated": ("JPEG 4032×3024 phone photo, EXIF orientation 6", "phone.jpg"),
    "webp-40mp": ("WebP 7000×5700 RGB (40 MP)", "big.webp"),
    "webp-64mp": ("WebP 8000×8000 RGBA (64 MP)", "big64.webp"),
    "bmp-64mp": ("BMP 8000×8000 RGB (64 MP, uncompressed)", "big.bmp"),
    "truncated-png": ("PNG 4000×3000 cut in half", "cut.png"),
    "truncated-jpeg": ("JPEG 4000×3000 cut in half", "cut.jpg"),
    "zero-bytes": ("0-byte .png", "empty.png"),
    "not-an-image": ("text file named .jpg", "text.jpg"),
    "fifo": ("a FIFO named .png (nothing ever writes to it)", "pipe.png"),
}


def build(name: str, folder: Path) -> Path | None:
    """Write case ``name`` into ``folder``; return its path (None for the baseline)."""
    import numpy as np
    from PIL import Image, ImageDraw

    def scene(mode: str, size: tuple[int, int], fill: int | tuple[int, ...] = 0) -> Image.Image:
        image = Image.new(mode, size, fill)
        draw = ImageDraw.Draw(image)
        w, h = size
        for i in range(8):  # some structure, so that codecs do real work
            draw.rectangle((i * w // 9, i * h // 9, (i + 1) * w // 9, (i + 1) * h // 9),
                           fill=255 if mode in ("1", "L", "P") else (40 * i % 256,) * len(image.getbands()))
        return image

    _, file = CASES[name]
    if not file:
        return None
    path = folder / file
    if name == "poison-png":
        Image.new("1", (9_000_000, 1)).save(path)
    elif name == "thin-png":
        Image.new("1", (4000, 1)).save(path)
    elif name == "wide-panorama":
        scene("RGB", (20000, 1000)).save(path)
    elif name == "bomb-81mp":
        Image.new("1", (9000, 9000)).save(path)
    elif name == "png-64mp-1bit":
        scene("1", (8000, 8000)).save(path)
    elif name == "png-64mp-L":
        scene("L", (8000, 8000)).save(path)
    elif name == "png-64mp-rgb":
        scene("RGB", (8000, 8000)).save(path)
    elif name == "png-40mp-rgb":
        scene("RGB", (7000, 5700)).save(path)
    elif name == "png-40mp-rgba":
        scene("RGBA", (7000, 5700), (0, 0, 0, 128)).save(path)
    elif name == "png-40mp-la":
        scene("LA", (7000, 5700), (0, 128)).save(path)
    elif name == "png-64mp-palette-transparent":
        image = scene("P", (8000, 8000))
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        image.save(path, transparency=0)
    elif name == "png-64mp-16bit-grey":
        Image.fromarray(np.full((8000, 8000), 40000, dtype=np.uint16)).save(path)
    elif name == "png-40mp-16bit-rgb":
        _png16_rgb(path, 7000, 5700)
    elif name == "tiff-64mp-I16":
        Image.fromarray(np.full((8000, 8000), 1234, dtype=np.uint16)).save(path)
    elif name == "tiff-40mp-F":
        array = np.full((5700, 7000), 0.5, dtype=np.float32)
        array[0, :3] = (np.nan, np.inf, -np.inf)
        Image.fromarray(array).save(path)
    elif name == "tiff-64mp-F":
        Image.fromarray(np.zeros((8000, 8000), dtype=np.float32)).save(path)
    elif name == "tiff-40mp-cmyk-lzw":
        scene("CMYK", (7000, 5700)).save(path, compression="tiff_lzw", strip_size=2 ** 31 - 1)
    elif name == "tiff-multiframe":
        frames = [scene("RGB", (4000, 3000), (i * 10, 0, 0)) for i in range(20)]
        frames[0].save(path, save_all=True, append_images=frames[1:], compression="tiff_deflate")
    elif name == "gif-animated":
        frames = [scene("P", (4000, 3000), i) for i in range(20)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    elif name == "jpeg-64mp-baseline":
        scene("RGB", (8000, 8000)).save(path, quality=90)
    elif name == "jpeg-64mp-progressive":
        scene("RGB", (8000, 8000)).save(path, quality=90, progressive=True)
    elif name == "jpeg-64mp-progressive-444":
        scene("RGB", (8000, 8000)).save(path, quality=90, progressive=True, subsampling=0)
    elif name == "jpeg-64mp-cmyk":
        scene("CMYK", (8000, 8000)).save(path, quality=90)
    elif name == "jpeg-12mp-exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        scene("RGB", (4032, 3024)).save(path, quality=90, exif=exif)
    elif name == "webp-40mp":
        scene("RGB", (7000, 5700)).save(path, quality=50)
    elif name == "webp-64mp":
        scene("RGBA", (8000, 8000)).save(path, quality=50)
    elif name == "bmp-64mp":
        scene("RGB", (8000, 8000)).save(path)
    elif name in ("truncated-png", "truncated-jpeg"):
        whole = folder / ("whole" + path.suffix)
        scene("RGB", (4000, 3000)).save(whole)
        raw = whole.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
        whole.unlink()
    elif name == "zero-bytes":
        path.write_bytes(b"")
    elif name == "not-an-image":
        path.write_text("this is not a picture\n")
    elif name == "fifo":
        os.mkfifo(path)
    return path


def _png16_rgb(path: Path, width: int, height: int) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot save one), in rows so the builder stays small."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x80\x00\x40\x00\x20\x00" * width
    compress = zlib.compressobj(6)
    body = b"".join(compress.compress(row) for _ in range(height)) + compress.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


_CHILD = """
import json, sys
from edgetl.data import load_image
from edgetl.errors import EdgeTLError
from edgetl.preprocess import preprocess_batch
from edgetl.registry import Preprocessing
size = int(sys.argv[2])
pp = Preprocessing(size, round(size * 256 / 224))
outcome = "no image"
if sys.argv[1]:
    try:
        batch = preprocess_batch([load_image(sys.argv[1])], pp)
        outcome = "ok " + "x".join(map(str, batch.shape))
    except EdgeTLError as exc:
        outcome = "refused: " + str(exc).replace(sys.argv[1], "IMAGE")
hwm = next((int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")), None)
print(json.dumps({"outcome": outcome, "vmhwm_kb": hwm}))
"""


def measure(path: Path | None, size: int, timeout: float = 60.0) -> tuple[str, float, float]:
    """(outcome, peak RSS in MB, seconds) of decoding + preprocessing ``path`` in a fresh interpreter.

    The peak is the child's ``ru_maxrss`` (from ``wait4``) or, where smaller, its own ``VmHWM``: Linux carries the
    parent's peak into a child's ``ru_maxrss`` across ``fork``/``exec``, so only a small parent (this script) gets
    true figures from ``ru_maxrss`` alone; ``VmHWM`` is the child's own high-water mark whatever its parent."""
    import time

    start = time.monotonic()
    proc = _Popen([sys.executable, "-c", _CHILD, str(path or ""), str(size)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return f"timed out after {timeout:.0f} s", float("nan"), timeout
    usage = getattr(proc, "rusage", None)  # the child's own, kept by _Popen
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        last = (err.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        return f"CRASHED (exit {proc.returncode}): {last}", _peak(usage), seconds
    report = json.loads(out.decode())
    peak = _peak(usage)
    if report.get("vmhwm_kb"):
        peak = min(peak, report["vmhwm_kb"] / 1024.0) if peak == peak else report["vmhwm_kb"] / 1024.0
    return report["outcome"], peak, seconds


def _peak(usage: object) -> float:
    return float(getattr(usage, "ru_maxrss", float("nan"))) / 1024.0


class _Popen(subprocess.Popen):  # type: ignore[type-arg]
    """A Popen that keeps the child's own rusage (``wait4``) instead of discarding it."""

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        try:
            pid, status, self.rusage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            pid, status = self.pid, 0
        return pid, status



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="Model input size (resize = size * 256 / 224).")
    ap.add_argument("--keep", type=Path, default=None, 
                    help="Build the images here and keep them (reused by the next run).")
    ap.add_argument("--only", nargs="*", default=None, help="Case names to run (default: all).")
    args = ap.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="edgetl-budget-"))
    folder.mkdir(parents=True, exist_ok=True)
    names = [n for n in CASES if args.only is None or n in args.only or n == "baseline"]
    try:
        for name in names:  # built in a child, so this process stays small; kept images are reused
            if CASES[name][1] and (folder / CASES[name][1]).exists():
                continue
            subprocess.run([sys.executable, __file__, "--build", name, str(folder)], check=True)
        rows = []
        for name in names:
            what, file = CASES[name]
            outcome, peak, seconds = measure(folder / file if file else None, args.size)
            verdict = "ok" if peak <= BUDGET_MB else "**over**"
            rows.append(f"| {name} | {what} | {outcome.replace('|', '/')} | {peak:.0f} | {seconds:.1f} | {verdict} |")
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"| case | image | outcome (model input {args.size}) | peak RSS MB | s | ≤ {BUDGET_MB} MB |")
    print("|---|---|---|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--build":
        build(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
