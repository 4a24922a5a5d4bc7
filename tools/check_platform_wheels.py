"""Ask pip whether a device extra resolves to binary wheels for another platform, without installing anything.

    python tools/check_platform_wheels.py                       # .[onnx] for manylinux aarch64, CPython 3.11
    python tools/check_platform_wheels.py --extra tflite --python 3.12
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def resolve(extra: str, platform: str, python: str) -> dict[str, str]:
    """{package: version} pip would install for ``.[extra]`` on ``platform``/``python`` (binary wheels only)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, str(ROOT)], check=True)
        wheel = next(Path(tmp).glob("edgetl-*.whl"))
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--only-binary=:all:",
               "--platform", platform, "--python-version", python, "--implementation", "cp", "--target",
               str(Path(tmp) / "t"), "--report", str(report), f"{wheel}[{extra}]"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{extra} does not resolve for {platform} / Python {python}:\n{result.stderr[-2000:]}")
        data = json.loads(report.read_text())
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in data["install"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extra", default="onnx")
    ap.add_argument("--platform", default="manylinux_2_28_aarch64")
    ap.add_argument("--python", default="3.11")
    args = ap.parse_args()
    packages = resolve(args.extra, args.platform, args.python)
    print(json.dumps(packages, indent=2))
    print(f".[{args.extra}] resolves for {args.platform} / CPython {args.python}; torch included: {'torch' in packages}")
