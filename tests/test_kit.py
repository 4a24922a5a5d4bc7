"""Field kit: the right wheels for a profile's platform, and an install that works with no package index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgetl.kit import KitError, build_kit, kit_target


def test_kit_target_follows_the_profile_and_the_bundle() -> None:
    pi5 = kit_target("raspberry-pi-5", formats=("onnx",))
    assert pi5["extra"] == "onnx" and pi5["python"] == "3.11"  # the profile prefers tflite; the bundle has ONNX only
    assert pi5["platforms"] and all(t.endswith("_aarch64") for t in pi5["platforms"])
    assert kit_target("raspberry-pi-5", formats=("onnx", "tflite"))["extra"] == "tflite"
    station = kit_target("x86-ground-station", formats=("onnx", "openvino"))
    assert station["extra"] == "openvino" and all(t.endswith("_x86_64") for t in station["platforms"])
    assert kit_target("raspberry-pi-4", extra="onnx", python="3.12")["python"] == "3.12"
    with pytest.raises(KitError, match="Python 3.10 but edgetl needs Python >= 3.11"):
        kit_target("jetson-orin-nano")
    with pytest.raises(KitError, match="Python 3.6"):
        kit_target("jetson-nano")
    with pytest.raises(KitError, match="export one of those or pass --extra"):
        kit_target("raspberry-pi-5", formats=("openvino",))


def test_kit_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "x").write_text("x")
    with pytest.raises(KitError, match="not empty"):
        build_kit(tmp_path / "bundle", tmp_path / "kit", "raspberry-pi-5")


@pytest.mark.slow
def test_aarch64_kit_has_aarch64_wheels_and_no_torch(bundle: Path, tmp_path: Path) -> None:
    meta = build_kit(bundle, tmp_path / "kit", "raspberry-pi-5", archive=tmp_path / "kit.tar")
    wheels = meta["wheels"]
    assert any(w.startswith("onnxruntime-") and "aarch64" in w for w in wheels)
    assert any(w.startswith("numpy-") and "aarch64" in w for w in wheels)
    assert not any(w.startswith(("torch-", "torchvision-")) for w in wheels)
    assert (tmp_path / "kit.tar").stat().st_size > meta["bytes"] * 0.9


@pytest.mark.slow
def test_kit_installs_with_no_index(bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    """A kit for this machine (x86_64, this Python) installs from its own wheelhouse only — pip's configuration and
    find-links are switched off — and the installed edgetl verifies the bundle and trains a head on it."""
    kit = tmp_path / "kit"
    build_kit(bundle, kit, "generic-cpu", extra="onnx")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PATH": "/usr/bin:/bin",
            "PYTHON": os.path.realpath(Path(sys.base_prefix) / "bin" / "python3")}
    result = subprocess.run(["sh", str(kit / "install.sh"), str(tmp_path / "venv"), str(tmp_path / "installed")],
                            check=False, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "golden vectors" in result.stdout
    edgetl = tmp_path / "venv" / "bin" / "edgetl"
    train = subprocess.run([str(edgetl), "device", "train", str(tmp_path / "installed"), "--data", str(demo_train),
                            "--quiet", "--json"], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert train.returncode == 0, train.stderr
    assert json.loads(train.stdout)["val_accuracy"] > 0.5
    probe = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", "import torch"], check=False,
                           capture_output=True)
    assert probe.returncode != 0
