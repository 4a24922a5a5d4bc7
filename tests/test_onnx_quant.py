"""ONNX Runtime FP16 / INT8 graphs on real images, and the accuracy gate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import HAS_TORCH, SMALL

# a marker, not a module-level importorskip: test_trust imports _garbage_converter (onnx only) from here without torch
pytestmark = [pytest.mark.host, pytest.mark.skipif(not HAS_TORCH, reason="needs the host extra (torch)"),
              pytest.mark.skipif(importlib.util.find_spec("onnxconverter_common") is None,
                                 reason="needs onnxconverter-common (host extra)")]


@pytest.fixture(scope="module")
def quant_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgetl.demo import demo_split
    from edgetl.host.export import export

    out = tmp_path_factory.mktemp("q") / "bundle"
    return export(out, demo_split("train"), model="mobilenet_v2", precisions=("fp32", "fp16", "int8"),
                  image_size=SMALL, calib_size=64, max_drop=5.0)


def test_int8_and_fp16_graphs(quant_bundle: Path) -> None:
    manifest = json.loads((quant_bundle / "manifest.json").read_text())
    entries = {(e["format"], e["precision"]): e for e in manifest["extractors"]}
    assert set(entries) == {("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8")}
    fp32, fp16, int8 = (entries["onnx", p]["report"] for p in ("fp32", "fp16", "int8"))
    assert int8["size_bytes"] <= 0.35 * fp32["size_bytes"]
    assert fp16["size_bytes"] <= 0.55 * fp32["size_bytes"]
    assert fp16["min_cosine"] > 0.999 and int8["mean_cosine"] > 0.98
    assert int8["top1_agreement"] > 0.85
    q = entries["onnx", "int8"]["quantization"]
    assert q["per_channel"] is True and q["format"] == "QDQ" and q["calibration_images"] == manifest["validation"]["calibration_images"] >= 60
    assert all(r["passed"] for r in (fp32, fp16, int8))


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_device_runs_each_precision(quant_bundle: Path, precision: str, tmp_path: Path) -> None:
    import shutil

    from edgetl.demo import demo_split
    from edgetl.device import DeviceRuntime

    bundle = Path(shutil.copytree(quant_bundle, tmp_path / "b"))
    rt = DeviceRuntime(bundle, backend="onnx", precision=precision)
    assert rt.entry.file == f"extractor.{precision}.onnx"
    assert rt.verify()["golden"] == "ok"
    rt.train(demo_split("train"))
    assert rt.evaluate(demo_split("test"))["accuracy"] > 0.5
    # embeddings of another extractor never mix: the store keeps one file per extractor hash
    assert len(list((bundle / "state" / "store").glob("*.npz"))) == 1
    with pytest.raises(Exception, match="another extractor"):
        DeviceRuntime(bundle, backend="onnx", precision="fp32").predict([next(demo_split("test").glob("*/*.png"))])


def _garbage_converter(ctx: Any, out: Path) -> dict[str, Any]:
    """A 'quantized' graph that loses the features: pooled RGB through a random projection."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proj = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, 1280)).astype(np.float32), "proj")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]), helper.make_node("MatMul", ["flat", "proj"], ["embeddings"])],
        "garbage", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SMALL, SMALL])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 1280])], [proj])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(out))
    return {"tool": "test"}


def test_gate_refuses_a_graph_that_lost_accuracy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgetl.host.convert as convert
    from edgetl.demo import demo_split
    from edgetl.host.export import QuantizationAccuracyError, export

    monkeypatch.setitem(convert.CONVERTERS, ("onnx", "fp16"), ("tests.test_onnx_quant", "_garbage_converter",
                                                               "extractor.fp16.onnx", "host"))
    with pytest.raises(QuantizationAccuracyError, match="onnx/fp16 accuracy drop") as info:
        export(tmp_path / "b", demo_split("train"), model="mobilenet_v2", precisions=("fp16",), image_size=SMALL,
               calib_size=20, eval_size=100)
    assert info.value.report[0]["drop_points"] > 1.0
    assert not (tmp_path / "b").exists()  # nothing half-written is left as a bundle
    # --keep-failed keeps it, marked failed; the device never picks it unless asked by name
    bundle = export(tmp_path / "k", demo_split("train"), model="mobilenet_v2", precisions=("fp16",),
                    image_size=SMALL, calib_size=20, eval_size=100, keep_failed=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [e.get("failed", False) for e in manifest["extractors"]] == [False, True]
    from edgetl.device import DeviceRuntime

    assert DeviceRuntime(bundle, profile="generic-cpu").precision == "fp32"


def test_cli_export_refusal_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgetl.host.convert as convert
    from edgetl.cli import main

    monkeypatch.setitem(convert.CONVERTERS, ("onnx", "int8"), ("tests.test_onnx_quant", "_garbage_converter",
                                                               "extractor.int8.onnx", "host"))
    res = CliRunner().invoke(main, ["export", "--model", "mobilenet_v2", "--out", str(tmp_path / "b"), "--quantize",
                                    "int8", "--image-size", str(SMALL), "--calib-size", "20", "--quiet"])
    assert res.exit_code == 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "export refused: onnx/int8" in lines[0]
