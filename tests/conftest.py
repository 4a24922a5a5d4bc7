from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from edgetl.demo import demo_split

HAS_TORCH = importlib.util.find_spec("torch") is not None
SMALL = 64  # px: real pretrained weights, small input, so device tests stay fast


@pytest.fixture(scope="session")
def demo_train() -> Path:
    return demo_split("train")


@pytest.fixture(scope="session")
def demo_test() -> Path:
    return demo_split("test")


@pytest.fixture(scope="session")
def _pretrained_bundle(tmp_path_factory: pytest.TempPathFactory, demo_train: Path) -> Path:
    """A real bundle: MobileNetV2 with its ImageNet weights, exported to ONNX at 64 px and checked against PyTorch."""
    if not HAS_TORCH:
        pytest.skip("needs the host extra (torch) to export a bundle")
    from edgetl.host.export import export

    out = tmp_path_factory.mktemp("bundles") / "mnv2-64"
    return export(out, demo_train, model="mobilenet_v2", image_size=SMALL, calib_size=20, eval_size=60)


@pytest.fixture()
def bundle(_pretrained_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the pretrained bundle for one test (device state included)."""
    return Path(shutil.copytree(_pretrained_bundle, tmp_path / "bundle"))


def make_folder(root: Path, spec: dict[str, int], source: Path) -> Path:
    """An ImageFolder with ``spec[class]`` images copied from the same class of ``source``."""
    for name, n in spec.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for p in sorted((source / name).glob("*.png"))[:n]:
            shutil.copy(p, root / name / p.name)
    return root
