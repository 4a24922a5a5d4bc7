"""Size of a fresh device environment per extra (no torch): creates a venv, installs `.[EXTRA]`, reports MB.

    python tools/device_env_size.py            # onnx, openvino, tflite
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


if __name__ == "__main__":
    for extra in sys.argv[1:] or ["onnx", "openvino", "tflite"]:
        with tempfile.TemporaryDirectory() as tmp:
            env = Path(tmp) / "venv"
            venv.create(env, with_pip=True)
            base = size_mb(env)
            subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", f"{ROOT}[{extra}]"], check=True)
            torch = subprocess.run([str(env / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode
            print(f"{extra:<9} {size_mb(env) - base:7.1f} MB installed (venv without pip/setuptools), "
                  f"torch importable: {torch == 0}")
