"""One bundle with every format: the device runs each graph through its own runtime, picks one by profile, and
names the extra to install when a runtime is missing."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import HAS_TORCH, SMALL

pytestmark = [pytest.mark.host, pytest.mark.openvino, pytest.mark.tflite,
              pytest.mark.skipif(not HAS_TORCH, reason="needs the host extra (torch)")]
pytest.importorskip("openvino")
pytest.importorskip("ai_edge_litert")
pytest.importorskip("litert_torch")


@pytest.fixture(scope="module")
def full_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgetl.cli import main
    from edgetl.demo import demo_split

    out = tmp_path_factory.mktemp("all") / "bundle"
    args = ["export", "--model", "mobilenet_v2", "--out", str(out), "--image-size", str(SMALL), "--calib",
            str(demo_split("train")), "--calib-size", "64", "--quiet",
            # 64 px, not the 224 px the INT8 targets are set for (tests/test_onnx_quant.py, tools/measure_int8.py):
            # INT8 at this size keeps its embeddings (mean cosine >= 0.97, the default) but one held-out image
            # in 15 may change the reference head's answer, and accuracy moves by a few images
            "--max-drop", "5", "--min-agreement", "0.9"]
    for fmt in ("onnx", "openvino", "tflite"):
        args += ["--format", fmt]
    for prec in ("none", "int8"):
        args += ["--quantize", prec]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "openvino/int8" in res.stdout and "tflite/int8" in res.stdout  # the printed gate report
    return out


@pytest.fixture()
def bundle_copy(full_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(full_bundle, tmp_path / "b"))


def test_manifest_lists_every_graph(full_bundle: Path) -> None:
    manifest = json.loads((full_bundle / "manifest.json").read_text())
    got = {(e["format"], e["precision"]) for e in manifest["extractors"]}
    assert got == {(f, p) for f in ("onnx", "openvino", "tflite") for p in ("fp32", "int8")}
    for e in manifest["extractors"]:
        for name in [e["file"], *e.get("companions", [])]:
            assert name in manifest["files"], name  # the OpenVINO .bin is hashed too
        assert e["report"]["passed"] and e["report"]["n_images"] > 100


@pytest.mark.parametrize("backend", ["onnx", "openvino", "tflite"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_device_backend(bundle_copy: Path, backend: str, precision: str) -> None:
    from edgetl.demo import demo_split
    from edgetl.device import DeviceRuntime

    rt = DeviceRuntime(bundle_copy, backend=backend, precision=precision, threads=2)
    assert (rt.backend, rt.precision) == (backend, precision)
    assert rt.verify()["golden"] == "ok"
    rt.train(demo_split("train"), val_split=0.0)
    assert rt.evaluate(demo_split("test"))["accuracy"] > 0.6


def test_profile_picks_its_backend(full_bundle: Path) -> None:
    from edgetl.device import DeviceRuntime

    ground = DeviceRuntime(full_bundle, profile="x86-ground-station")
    assert (ground.backend, ground.precision) == ("openvino", "int8")
    pi = DeviceRuntime(full_bundle, profile="raspberry-pi-4")
    assert (pi.backend, pi.precision) == ("tflite", "int8")
    assert pi.threads == 4


def test_missing_runtime_is_named(full_bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    import edgetl.selection as selection
    from edgetl.cli import main
    from edgetl.device import DeviceRuntime

    monkeypatch.setattr(selection, "installed_backends", lambda: ["onnx"])
    res = CliRunner().invoke(main, ["device", "info", str(full_bundle), "--backend", "openvino"])
    assert res.exit_code == 1 and "pip install 'edgetl[openvino]'" in res.stderr
    with caplog.at_level(logging.WARNING):
        rt = DeviceRuntime(full_bundle, profile="x86-ground-station")
    assert rt.backend == "onnx" and any("prefers openvino/int8" in r.message for r in caplog.records)


def test_device_info_shows_the_report(full_bundle: Path) -> None:
    from edgetl.cli import main

    res = CliRunner().invoke(main, ["device", "info", str(full_bundle), "--profile", "generic-cpu"])
    assert res.exit_code == 0
    assert "tflite/int8" in res.stdout and "openvino/fp32" in res.stdout and "selected     extractor.onnx" in res.stdout


def test_onnx_session_restarts_after_a_provider_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """onnxruntime's own fallback (TensorRT libraries missing) drops provider options; edgetl restarts the session on
    the providers that work, with their options (FP32: no TF32 on CUDA, measured on an H200)."""
    import onnxruntime as ort

    from edgetl.runtime import onnx as onnx_runtime

    calls: list[tuple[list[str], list[dict[str, str]]]] = []

    class FakeSession:
        def __init__(self, path: str, sess_options: object, providers: list[str],
                     provider_options: list[dict[str, str]]) -> None:
            calls.append((list(providers), list(provider_options)))
            self._used = [p for p in providers if p != "TensorrtExecutionProvider"]

        def get_providers(self) -> list[str]:
            return self._used

    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: wanted)
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    session = onnx_runtime.open_session(tmp_path / "g.onnx", providers=wanted, precision="fp32")
    assert session.get_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert calls[-1] == (["CUDAExecutionProvider", "CPUExecutionProvider"], [{"use_tf32": "0"}, {}])
    onnx_runtime.open_session(tmp_path / "g.onnx", providers=wanted[1:], precision="fp16")
    assert calls[-1][1] == [{}, {}]  # reduced precision: the provider's defaults
