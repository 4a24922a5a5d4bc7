"""ONNX Runtime graphs: a portable optimised FP32 graph, FP16 with FP32 inputs/outputs, and static INT8 (QDQ,
per-channel weights) calibrated on real images."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.host.convert import ExportContext


def _version(module: str) -> str:
    from importlib.metadata import version

    return version(module)


def optimize_fp32(ctx: ExportContext, out: Path) -> dict[str, Any]:
    """ONNX Runtime's offline optimisation at the portable EXTENDED level (ALL would bake in this CPU's layouts; the
    device applies it online)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    ort.InferenceSession(str(ctx.onnx_fp32), options, providers=["CPUExecutionProvider"])
    return {"tool": f"onnxruntime {ort.__version__}", "optimization": "ORT_ENABLE_EXTENDED (offline)"}


def to_fp16(ctx: ExportContext, out: Path) -> dict[str, Any]:
    """Weights and activations in float16; inputs and outputs stay float32."""
    import warnings

    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "number … will be truncated": tiny weights flushed, expected
        model = float16.convert_float_to_float16(onnx.load(str(ctx.onnx_fp32)), keep_io_types=True)
    onnx.save(model, str(out))
    return {"tool": f"onnxconverter-common {_version('onnxconverter-common')}", "keep_io_types": True}


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over preprocessed images, one at a time."""

    def __init__(self, images: np.ndarray, input_name: str):
        self._items = iter([{input_name: images[i:i + 1]} for i in range(len(images))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def to_int8(ctx: ExportContext, out: Path) -> dict[str, Any]:
    """Static INT8, QDQ format, per-channel int8 weights, uint8 activations calibrated (MinMax) on real images, after
    ``quant_pre_process``. Per-tensor weights wreck depthwise convolutions; dynamic quantization suits CNNs poorly."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = ctx.workdir / "int8.pre.onnx"
    quant_pre_process(str(ctx.onnx_fp32), str(prepared), skip_symbolic_shape=True)
    tmp = ctx.workdir / "int8.onnx"
    quantize_static(str(prepared), str(tmp), _Calibration(ctx.calib, "images"), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    shutil.move(tmp, out)
    return {"tool": f"onnxruntime {_version('onnxruntime')} quantize_static", "format": "QDQ", "per_channel": True,
            "weights": "int8", "activations": "uint8", "calibration": "MinMax",
            "calibration_images": int(len(ctx.calib))}
