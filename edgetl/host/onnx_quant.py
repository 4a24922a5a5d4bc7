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


#: ONNX Runtime graph fusions that write runtime-specific (com.microsoft) ops; kept out of every exported graph
NON_PORTABLE_FUSIONS = ("ConvActivationFusion", "ConvAddActivationFusion", "GemmActivationFusion", "MatMulAddFusion")


def portable_optimize(src: Path, dst: Path) -> str:
    """ONNX Runtime's offline BASIC optimisation (constant folding, redundant nodes, BatchNorm into Conv) of ``src``
    into ``dst``, keeping standard ONNX ops only: ONNX Runtime 1.2x+ fuses Conv+Clip into its CPU-only
    com.microsoft FusedConv even at BASIC, which the CUDA and TensorRT providers refuse (seen on an H200: "unsupported
    conv activation mode Clip"). The device's runtime applies such fusions online, for the provider it runs on.
    Returns a description for the manifest."""
    import onnx
    import onnxruntime as ort

    from edgetl.errors import ExportValidationError

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(NON_PORTABLE_FUSIONS))
    custom = sorted({f"{n.domain}.{n.op_type}" for n in onnx.load(str(dst)).graph.node
                     if n.domain not in ("", "ai.onnx")})
    if custom:
        raise ExportValidationError(f"the optimised ONNX graph uses runtime-specific ops ({', '.join(custom)}); GPU "
                                    "providers could not load it — report this with your onnxruntime version")
    return f"onnxruntime {ort.__version__} ORT_ENABLE_BASIC (offline, standard ONNX ops only)"


def optimize_fp32(ctx: ExportContext, out: Path) -> dict[str, Any]:
    """The portable optimised FP32 graph (:func:`portable_optimize`; the device applies ALL online)."""
    return {"tool": "onnxruntime", "optimization": portable_optimize(ctx.onnx_fp32, out)}


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
