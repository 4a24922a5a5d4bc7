"""Plain, non-editable installs of the device extras (as on a Raspberry Pi) give a working device side without
torch, and find the models/ and devices/ registries and the demo data."""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.install


def make_env(root: Path, extra: str) -> Path:
    env_dir = root / f"venv-{extra}"
    venv.create(env_dir, with_pip=True)
    result = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", f"{ROOT}[{extra}]"],
                            capture_output=True, text=True, timeout=900,
                            env=os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if result.returncode != 0:
        pytest.fail(f"pip install .[{extra}] failed:\n{result.stderr[-3000:]}")
    return env_dir


@pytest.fixture(scope="module")
def onnx_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_env(tmp_path_factory.mktemp("device-env"), "onnx")


def run(env: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(env / "bin" / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd)


def test_onnx_device_install_has_no_torch_and_works(onnx_env: Path, bundle: Path, demo_train: Path,
                                                    tmp_path: Path) -> None:
    assert run(onnx_env, "python", "-c", "import torch", cwd=tmp_path).returncode != 0
    where = run(onnx_env, "python", "-c", "import edgetl; print(edgetl.__file__)", cwd=tmp_path).stdout
    assert "site-packages" in where  # the installed copy, not this checkout
    models = run(onnx_env, "edgetl", "models", "list", cwd=tmp_path)
    assert models.returncode == 0 and "mobilenet_v2" in models.stdout and "efficientnet_lite0" in models.stdout
    profiles = run(onnx_env, "python", "-c", "from edgetl.profiles import list_profiles; print(len(list_profiles()))",
                   cwd=tmp_path)
    assert profiles.returncode == 0 and int(profiles.stdout) >= 6, profiles.stderr
    train = run(onnx_env, "edgetl", "device", "train", str(bundle), "--data", str(demo_train), "--quiet", cwd=tmp_path)
    assert train.returncode == 0 and "held-out accuracy" in train.stdout, train.stderr
    info = run(onnx_env, "edgetl", "device", "info", str(bundle), cwd=tmp_path)
    assert info.returncode == 0 and "current head v0001" in info.stdout
    demo = run(onnx_env, "python", "-c", "from edgetl.demo import demo_split; "
               "print(len(list(demo_split('train').glob('*/*.png'))))", cwd=tmp_path)
    assert demo.stdout.strip() == "300"
    host = run(onnx_env, "edgetl", "export", "--model", "mobilenet_v2", "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert host.returncode == 1 and "pip install 'edgetl[host]'" in host.stderr


@pytest.mark.parametrize("extra,engine", [("openvino", "openvino"), ("tflite", "ai_edge_litert")])
def test_other_device_extras_without_torch(extra: str, engine: str, tmp_path_factory: pytest.TempPathFactory,
                                           bundle: Path, tmp_path: Path) -> None:
    env = make_env(tmp_path_factory.mktemp(f"env-{extra}"), extra)
    assert run(env, "python", "-c", "import torch", cwd=tmp_path).returncode != 0
    probe = run(env, "python", "-c", f"import {engine}; from edgetl.runtime import installed_backends; "
                "print(installed_backends())", cwd=tmp_path)
    assert probe.returncode == 0 and f"'{extra}'" in probe.stdout and "'onnx'" not in probe.stdout, probe.stderr
    # the bundle only has an ONNX graph: the device says which extra would run it
    info = run(env, "edgetl", "device", "info", str(bundle), cwd=tmp_path)
    assert info.returncode == 1 and "pip install 'edgetl[onnx]'" in info.stderr and "Traceback" not in info.stderr


def test_onnx_extra_resolves_for_aarch64() -> None:
    """pip, asked for manylinux aarch64 / CPython 3.11 binary wheels (nothing installed), resolves .[onnx] without
    torch."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from check_platform_wheels import resolve
    finally:
        sys.path.pop(0)
    packages = resolve("onnx", "manylinux_2_28_aarch64", "3.11")
    assert "onnxruntime" in packages and "numpy" in packages and "torch" not in packages
