"""A plain, non-editable `pip install ".[onnx]"` (as on a Raspberry Pi) gives a working device CLI without torch,
and finds the models/ and devices/ registries."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def device_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("device-env") / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    result = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[onnx]"], capture_output=True, text=True,
                            timeout=900, env=os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if result.returncode != 0:
        pytest.fail(f"pip install .[onnx] failed:\n{result.stderr[-3000:]}")
    return env_dir


def test_device_install_has_no_torch_and_works(device_env: Path, bundle: Path, demo_train: Path,
                                               tmp_path: Path) -> None:
    py, edgetl = device_env / "bin" / "python", device_env / "bin" / "edgetl"
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True, cwd=tmp_path).returncode != 0
    where = subprocess.run([str(py), "-c", "import edgetl; print(edgetl.__file__)"], capture_output=True, text=True,
                           cwd=tmp_path, check=True).stdout
    assert "site-packages" in where  # the installed copy, not this checkout
    models = subprocess.run([str(edgetl), "models", "list"], capture_output=True, text=True, cwd=tmp_path)
    assert models.returncode == 0 and "mobilenet_v2" in models.stdout and "efficientnet_lite0" in models.stdout
    profiles = subprocess.run([str(py), "-c", "from edgetl.profiles import list_profiles; "
                               "print(len(list_profiles()))"], capture_output=True, text=True, cwd=tmp_path)
    assert profiles.returncode == 0 and int(profiles.stdout) >= 6, profiles.stderr
    train = subprocess.run([str(edgetl), "device", "train", str(bundle), "--data", str(demo_train), "--quiet"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert train.returncode == 0 and "held-out accuracy" in train.stdout, train.stderr
    info = subprocess.run([str(edgetl), "device", "info", str(bundle)], capture_output=True, text=True, cwd=tmp_path)
    assert info.returncode == 0 and "current head v0001" in info.stdout
    # the demo data set ships inside the package
    demo = subprocess.run([str(py), "-c", "from edgetl.demo import demo_split; "
                           "print(len(list(demo_split('train').glob('*/*.png'))))"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert demo.stdout.strip() == "300"
