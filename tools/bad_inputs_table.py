"""Run every bad input we guard against through the real CLI and write what the user sees to docs/bad-inputs.md.

    python tools/bad_inputs_table.py --out docs/bad-inputs.md
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from edgetl.cli import main, one_line
from edgetl.demo import demo_split
from edgetl.host.export import export
from edgetl.signing import generate_keys, sign_bundle


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Log records go to whatever ``sys.stderr`` is now (CliRunner swaps it per command), as the CLI's would."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def main_() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", handlers=[_CurrentStderr()])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/bad-inputs.md"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgetl-bad-"))
    pristine = export(work / "pristine", demo_split("train"), model="mobilenet_v2", image_size=64, calib_size=20)
    key, pub = generate_keys(work / "host.key")
    train, test = demo_split("train"), demo_split("test")
    image = next(test.glob("bag/*.png"))
    rows: list[tuple[str, str, int, str]] = []

    def case(what: str, prepare: Callable[[Path], list[str]], trained: bool = True, show_stdout: bool = False) -> None:
        bundle = work / f"b{len(rows)}"
        shutil.copytree(pristine, bundle)
        if trained:
            CliRunner().invoke(main, ["device", "train", str(bundle), "--data", str(train), "--quiet"])
        before = (bundle / "state" / "current").read_text() if (bundle / "state" / "current").exists() else None
        argv = prepare(bundle)
        res = CliRunner().invoke(main, argv)
        after = (bundle / "state" / "current").read_text() if (bundle / "state" / "current").exists() else None
        shown = one_line(" ".join(a.replace(str(work), "…").replace(str(Path.cwd()) + "/", "./") for a in argv))
        shown = shown.replace("|", "\\|")
        msg = (res.stderr.strip() + "\n" + res.stdout.strip() if show_stdout else res.stderr.strip())
        msg = msg.replace(str(work), "…").replace(str(Path.cwd()) + "/", "./").replace("|", "\\|")
        msg = " / ".join(line.strip() for line in msg.splitlines() if line.strip())
        state = "unchanged" if before == after else f"{before} → {after}"
        rows.append((what, f"`edgetl {shown}`", res.exit_code, f"{msg} *(current head {state})*"))

    def folder(spec: dict[str, int], extra: Callable[[Path], None] | None = None) -> Path:
        root = Path(tempfile.mkdtemp(dir=work))
        for name, n in spec.items():
            (root / name).mkdir()
            for p in sorted((train / name).glob("*.png"))[:n]:
                shutil.copy(p, root / name / p.name)
        if extra:
            extra(root)
        return root

    def flip(name: str) -> Callable[[Path], list[str]]:
        def go(b: Path) -> list[str]:
            data = bytearray((b / name).read_bytes())
            data[len(data) // 2] ^= 1
            (b / name).write_bytes(bytes(data))
            return ["device", "predict", str(b), str(image)]
        return go

    case("empty data folder", lambda b: ["device", "train", str(b), "--data", str(folder({}))])
    case("one class only", lambda b: ["device", "train", str(b), "--data", str(folder({"bag": 5}))])
    case("corrupt image in the data", lambda b: ["device", "train", str(b), "--data", str(folder(
        {"bag": 5, "coat": 5}, lambda r: (r / "coat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage"))), "--quiet"])
    case("zero-byte image", lambda b: ["device", "train", str(b), "--data", str(folder(
        {"bag": 5, "coat": 5}, lambda r: (r / "coat" / "empty.png").write_bytes(b""))), "--quiet"])
    case("loose images, no class folders", lambda b: ["device", "train", str(b), "--data", str(folder(
        {}, lambda r: shutil.copy(image, r / "a.png")))])
    case("image file that does not exist", lambda b: ["device", "predict", str(b), str(work / "nope.png")])

    def bomb(b: Path) -> list[str]:
        from PIL import Image

        Image.new("1", (9000, 9000)).save(work / "bomb.png")
        return ["device", "predict", str(b), str(work / "bomb.png")]
    case("decompression bomb (81 MP)", bomb)
    case("predict before any head", lambda b: ["device", "predict", str(b), str(image)], trained=False)
    case("bundle folder missing", lambda b: ["device", "info", str(work / "nowhere")])
    case("manifest missing", lambda b: ((b / "manifest.json").unlink(), ["device", "info", str(b)])[1])
    case("manifest not JSON", lambda b: ((b / "manifest.json").write_text("{oops"), ["device", "info", str(b)])[1])

    def newer(b: Path) -> list[str]:
        m = json.loads((b / "manifest.json").read_text())
        m["schema_version"] = 99
        (b / "manifest.json").write_text(json.dumps(m))
        return ["device", "info", str(b)]
    case("bundle from a newer schema", newer)
    case("flipped byte in the extractor", flip("extractor.onnx"))
    case("flipped byte in the golden vectors", flip("golden.npz"))

    def truncated(b: Path) -> list[str]:
        p = b / "extractor.onnx"
        p.write_bytes(p.read_bytes()[:4096])
        return ["device", "train", str(b), "--data", str(train)]
    case("truncated extractor", truncated)

    def swapped(b: Path) -> list[str]:
        from edgetl.bundle import file_entry

        other = export(work / "other", demo_split("train"), model="efficientnet_lite0", image_size=64, calib_size=20,
                       force=True)
        shutil.copy(other / "extractor.onnx", b / "extractor.onnx")
        m = json.loads((b / "manifest.json").read_text())
        m["files"]["extractor.onnx"] = file_entry(b / "extractor.onnx")
        (b / "manifest.json").write_text(json.dumps(m))
        return ["device", "verify", str(b)]
    case("extractor swapped, hashes rewritten", swapped)
    case("unsigned bundle, trusted key required", lambda b: ["device", "info", str(b), "--trust", str(pub)])

    def badsig(b: Path) -> list[str]:
        other, _ = generate_keys(work / f"other{len(rows)}.key")
        sign_bundle(b, other)
        return ["device", "info", str(b), "--trust", str(pub)]
    case("signed by another key", badsig)

    def edited_after_signing(b: Path) -> list[str]:
        sign_bundle(b, key)
        m = json.loads((b / "manifest.json").read_text())
        m["labels"] = ["cat", "dog"]
        (b / "manifest.json").write_text(json.dumps(m))
        return ["device", "info", str(b), "--trust", str(pub)]
    case("labels edited after signing", edited_after_signing)

    def replay(b: Path) -> list[str]:
        old = (b / "manifest.json").read_text()
        m = json.loads(old)
        m["created_unix"] += 100
        (b / "manifest.json").write_text(json.dumps(m))
        sign_bundle(b, key)
        CliRunner().invoke(main, ["device", "info", str(b), "--trust", str(pub)])
        (b / "manifest.json").write_text(old)
        sign_bundle(b, key)
        return ["device", "info", str(b), "--trust", str(pub)]
    case("replayed older signed manifest", replay)

    def evil_archive(member: tarfile.TarInfo, what: str) -> None:
        def go(b: Path) -> list[str]:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                tar.addfile(member, io.BytesIO(b"x") if member.isfile() else None)
            (work / f"{what}.tar.gz").write_bytes(buf.getvalue())
            return ["device", "install", str(work / f"{what}.tar.gz"), str(b)]
        case(f"archive with {what}", go)

    for name, kind, what in (("/etc/evil", tarfile.REGTYPE, "an absolute path"), ("../evil", tarfile.REGTYPE, "'..'"),
                             ("link", tarfile.SYMTYPE, "a symlink"), ("dev", tarfile.CHRTYPE, "a device file")):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = 1 if kind == tarfile.REGTYPE else 0
        info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
        evil_archive(info, what)

    def truncated_archive(b: Path) -> list[str]:
        CliRunner().invoke(main, ["bundle", "pack", str(pristine), str(work / "ok.tar.gz")])
        raw = (work / "ok.tar.gz").read_bytes()
        (work / "cut.tar.gz").write_bytes(raw[: len(raw) // 2])
        return ["device", "install", str(work / "cut.tar.gz"), str(b)]
    case("truncated archive", truncated_archive)
    case("archive larger than the limit", lambda b: (CliRunner().invoke(
        main, ["bundle", "pack", str(pristine), str(work / "ok.tar.gz")]),
        ["device", "install", str(work / "ok.tar.gz"), str(b), "--max-bytes", "1000"])[1])
    def missing_runtime(b: Path) -> list[str]:
        import edgetl.selection

        edgetl.selection.installed_backends = lambda: ["onnx"]  # as on a device without OpenVINO
        return ["device", "info", str(b), "--backend", "openvino"]
    case("runtime not installed (OpenVINO hidden)", missing_runtime)
    import edgetl.runtime
    import edgetl.selection

    edgetl.selection.installed_backends = edgetl.runtime.installed_backends
    case("unknown backend name (a bad flag)", lambda b: ["device", "info", str(b), "--backend", "tensorrt"])
    case("extractor precision not in the bundle", lambda b: ["device", "info", str(b), "--precision", "int8"])
    case("rollback to a version that does not exist", lambda b: ["device", "rollback", str(b), "--to", "v0042"])

    def locked(b: Path) -> list[str]:
        import subprocess
        import sys
        import time

        proc = subprocess.Popen([sys.executable, "-c", "import time; from edgetl.state import DeviceState; "
                                 f"from pathlib import Path\nwith DeviceState(Path({str(b / 'state')!r})).writer():\n"
                                 " time.sleep(8)"])
        time.sleep(2)
        locked.proc = proc  # type: ignore[attr-defined]
        return ["device", "train", str(b), "--data", str(train)]
    case("second trainer while one runs", locked)
    locked.proc.kill()  # type: ignore[attr-defined]

    # ---- field hardening (issue 15): hostile images, user-given names, flags and manifest values
    def poison(b: Path) -> list[str]:
        from PIL import Image

        Image.new("1", (9_000_000, 1)).save(work / "poison.png")  # 8.8 KB, under the pixel limit
        return ["device", "predict", str(b), str(work / "poison.png")]
    case("poison PNG, 9,000,000×1 pixels (8.8 KB)", poison)

    def big_png(b: Path) -> list[str]:
        from PIL import Image

        Image.new("RGB", (8000, 8000)).save(work / "rgb64.png")
        return ["device", "predict", str(b), str(work / "rgb64.png")]
    case("64 MP RGB PNG (256 MB decoded, over the memory budget)", big_png)

    def fifo(b: Path) -> list[str]:
        os.mkfifo(work / "pipe.png")
        return ["device", "predict", str(b), str(work / "pipe.png")]
    case("a FIFO given to predict", fifo)
    case("a folder given to predict", lambda b: ["device", "predict", str(b), str(test / "bag")])

    def newline_name(b: Path) -> list[str]:
        bad = work / "a\nerror: all good\x1b[2J.png"
        bad.write_bytes(b"not an image")
        return ["device", "predict", str(b), str(bad)]
    case("file name with a newline and a terminal escape", newline_name)

    def loop_class(b: Path) -> list[str]:
        root = folder({"bag": 5, "coat": 5})
        (root / "loop").symlink_to(root)
        return ["device", "train", str(b), "--data", str(root), "--quiet"]
    case("class folder that is a symlink loop", loop_class)
    case("rollback to a path outside state/", lambda b: ["device", "rollback", str(b), "--to", "../../../x"])
    case("--threads 10000 (warned, capped at the cores)",
         lambda b: ["device", "predict", str(b), str(image), "--threads", "10000"], show_stdout=True)

    def manifest_value(key: str, value: object) -> Callable[[Path], list[str]]:
        def go(b: Path) -> list[str]:
            m = json.loads((b / "manifest.json").read_text())
            target = m["preprocessing"] if key in m["preprocessing"] else m
            target[key] = value
            (b / "manifest.json").write_text(json.dumps(m))
            return ["device", "info", str(b)]
        return go
    case("manifest feature_dim 10^30", manifest_value("feature_dim", 10 ** 30))
    case("manifest input_size 50000", manifest_value("input_size", 50_000))
    case("manifest std with a zero", manifest_value("std", [0.229, 0.0, 0.225]))

    def exif(b: Path) -> list[str]:
        from PIL import Image

        upright = Image.open(image).convert("RGB")
        sideways = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways, as a phone does
        tag = Image.Exif()
        tag[0x0112] = 6  # "rotate 90° clockwise to view"
        sideways.save(work / "sideways.jpg", exif=tag, quality=95)
        upright.save(work / "upright.jpg", quality=95)
        return ["device", "predict", str(b), str(work / "upright.jpg"), str(work / "sideways.jpg")]
    case("phone photo stored sideways with EXIF orientation 6 (same label as upright)", exif, show_stdout=True)

    lines = ["# Bad inputs and what the user sees", "",
             "Every row was produced by `python tools/bad_inputs_table.py` through the real CLI (click's CliRunner) on "
             "a real MobileNetV2 bundle; paths are shortened to `…`. Exit code 1 is an error edgetl detected; 2 is a "
             "bad flag. Corrupt or zero-byte images **fail** the command (naming the file) rather than being "
             "skipped, so a training set is never silently smaller than the user thinks; the current head is kept. "
             "Control characters in names are shown escaped (`\\n`, `\\x1b`), so every error is one line; where a "
             "command succeeds, its output follows the warnings. How much memory decoding any image may take is "
             "measured in [Image decoding budget](#image-decoding-budget) below.",
             "", "| bad input | command | exit | what the user sees |", "|---|---|---|---|"]
    lines += [f"| {w} | {c} | {code} | {m} |" for w, c, code, m in rows]
    # sections after the table (e.g. "Image decoding budget", from tools/image_budget.py) are kept
    old = args.out.read_text().split("\n") if args.out.exists() else []
    kept = next((old[i:] for i, line in enumerate(old) if line.startswith("## ")), [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n" + ("\n" + "\n".join(kept).rstrip("\n") + "\n" if kept else ""))
    print(f"wrote {args.out} ({len(rows)} cases)")


if __name__ == "__main__":
    main_()
