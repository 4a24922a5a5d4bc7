"""Make the committed device-test bundle: tests/data/device-bundle/mnv2-64.

Host command (needs torch and the weight wheels that tools/setup.sh installs):

    .venv/bin/python tools/make_device_fixture.py

It exports, through the public API (:func:`edgetl.host.export.export`), the same bundle that the ``bundle`` fixture of
tests/conftest.py exports when torch is present: MobileNetV2 with its real ImageNet weights, at 64 px, FP32 ONNX,
calibrated and checked on the embedded demo data (edgetl/demo_data, train split), with the golden vectors and held-out
reference embeddings the export writes. The device tests use this committed copy wherever torch is absent (the
torch-free lane, ``bash tools/test-device.sh``), so they test the device side in the environment a device has.

Rerun it whenever the export changes what a bundle holds (manifest schema, golden vectors, gate), and commit the
folder: ``git commit -m "..." -- tests/data/device-bundle``. The folder's README.md records when, with what and how it
was made. The tool replaces the folder only after a new export succeeded and passed the device's own verification,
run in a separate interpreter with torch blocked.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import DEVICE_BUNDLE, DEVICE_BUNDLE_ARGS  # noqa: E402  (one definition of what is exported)

VERIFY = """import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None
from edgetl.device import DeviceRuntime
report = DeviceRuntime(sys.argv[1]).verify()
assert report["golden"] == "ok", report
assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]
print(report["golden"])
"""


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"


def make(out: Path) -> Path:
    """Export the device-test bundle into ``out`` (replaced on success) and write the folder's README.md."""
    from edgetl.demo import demo_split
    from edgetl.host.export import export

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".make-device-fixture-", dir=out.parent) as scratch:
        new = export(Path(scratch) / out.name, demo_split("train"), **DEVICE_BUNDLE_ARGS)
        check = subprocess.run([sys.executable, "-c", VERIFY, str(new)], capture_output=True, text=True, cwd=ROOT)
        if check.returncode != 0:
            raise SystemExit(f"the new bundle failed the device's verification without torch:\n{check.stderr}")
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(new), out)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    args = ", ".join(f"{k}={v!r}" for k, v in DEVICE_BUNDLE_ARGS.items())
    versions = ", ".join(f"{d} {_version(d)}" for d in ("torch", "torchvision", "onnx", "onnxruntime", "numpy"))
    lines = [
        f"# {rel.name}: the device-test bundle",
        "",
        "A real bundle for the device tests that run without torch (`bash tools/test-device.sh`); tests/conftest.py",
        "copies it into a temporary folder, so tests never modify these files. Do not edit them by hand: remake them.",
        "",
        "Made by (host, needs torch):",
        "",
        "    .venv/bin/python tools/make_device_fixture.py",
        "",
        f"- export: `edgetl.host.export.export(out, edgetl.demo.demo_split('train'), {args})`",
        f"- backbone: {manifest['backbone'].get('id')} ({manifest['backbone'].get('architecture')}, real pretrained "
        f"weights sha256 {str(manifest['backbone'].get('weights_sha256'))[:16]}…), "
        f"{manifest['feature_dim']}-d features",
        f"- made: {time.strftime('%Y-%m-%d')} with edgetl {manifest.get('edgetl_version')}, {versions}",
        f"- size: {total / 1e6:.1f} MB in {len(files)} files:",
        "",
        *[f"  - `{p.relative_to(out)}` {p.stat().st_size / 1e3:,.0f} kB" for p in files],
        "",
    ]
    (out.parent / "README.md").write_text("\n".join(lines), encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEVICE_BUNDLE, help=f"default: {DEVICE_BUNDLE.relative_to(ROOT)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = make(args.out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    folder = out.parent.relative_to(ROOT) if out.parent.is_relative_to(ROOT) else out.parent
    print(f"wrote {out} ({total / 1e6:.1f} MB); commit it: git commit -m '...' -- {folder}")


if __name__ == "__main__":
    main()
