"""ONNX Runtime graphs: a portable optimised FP32 graph, FP16 with FP32 inputs/outputs, and static INT8 (QDQ,
per-channel weights) calibrated on real images; for text encoders, an optimised FP32 graph and dynamic INT8."""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.host.convert import ExportContext
from edgetl.host.sensitivity import candidates, first_float_convs


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


#: Settings of :func:`to_int8`, chosen by measurement (README "INT8 fidelity"; docs/results/int8_fidelity.json).
#: uint8 weights as well as activations in the dense (1x1 and full) convolutions: ONNX Runtime's u8×s8 GEMM kernels on
#: x86 CPUs without VNNI (AVX2) multiply-add pairs into int16 and saturate (MobileNetV2 mean cosine to FP32 0.80 there,
#: 0.97 on aarch64); u8×u8 widens first and gives the same numbers as the QDQ graph computed in float, on every CPU.
#: Depthwise convolutions keep int8 weights: they do not go through that GEMM, and ONNX Runtime's u8×u8 depthwise path
#: is slow for 5x5 kernels (EfficientNet-Lite0 INT8 ran at 0.23x its FP32 speed with it, 1.05x without, same fidelity).
INT8_ACTIVATIONS, INT8_WEIGHTS, INT8_DEPTHWISE_WEIGHTS = "uint8", "uint8", "int8"
#: activation ranges: the 99.99th percentile of the calibration activations (MinMax lets a few outliers set the scale)
INT8_CALIBRATION, INT8_PERCENTILE = "Percentile", 99.99
#: mixed precision: the graph's first convolutions (raw normalised pixels in, the widest ranges) stay FP32, as many as
#: it takes for the calibration images' mean cosine to FP32 to reach this, trying these numbers of float convolutions.
#: Up to 12, not 4: EfficientNet-Lite0 on 64-px digits stays below 0.99 with 0-4 float (held-out minimum cosine 0.88,
#: reference-head agreement 0.89) and reaches 0.997 with 6
INT8_CALIB_COSINE, INT8_FLOAT_CONVS = 0.99, (0, 1, 2, 3, 4, 6, 8, 10, 12)


def _run(path: Path, images: np.ndarray, batch: int = 16) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


@dataclass(frozen=True)
class PreparedInt8:
    """An FP32 graph made ready for :func:`quantize_prepared`: ``quant_pre_process``'s output, its convolutions' node
    names in graph order, and the per-channel int8 weight overrides of its depthwise convolutions."""

    graph: Path
    convs: list[str]
    depthwise: dict[str, Any]


def prepare_int8(fp32: Path, workdir: Path) -> PreparedInt8:
    """``quant_pre_process`` of the FP32 graph ``fp32`` into ``workdir``, with what :func:`quantize_prepared` needs."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = workdir / "int8.pre.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    nodes = [n for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
    # per-tensor overrides keep per-channel (axis 0) scales: without the axis the override is per-tensor, which wrecks
    # depthwise convolutions (mean cosine 0.60)
    depthwise = {n.input[1]: [{"quant_type": QuantType.QInt8, "axis": 0}] for n in nodes
                 if any(a.name == "group" and a.i > 1 for a in n.attribute)}
    return PreparedInt8(prepared, [n.name for n in nodes], depthwise)


def quantize_prepared(prep: PreparedInt8, calib: np.ndarray, float_convs: int, out: Path) -> Path:
    """The static INT8 QDQ graph of ``prep`` (settings above) with its first ``float_convs`` convolutions float,
    calibrated on ``calib`` (``(N, 3, S, S)``; the ranges are cached beside ``prep.graph`` and reused), at ``out``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with contextlib.redirect_stdout(io.StringIO()):  # the percentile calibrator prints its progress
        quantize_static(str(prep.graph), str(out), _Calibration(calib, "images"),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QUInt8, calibrate_method=getattr(CalibrationMethod, INT8_CALIBRATION),
                        nodes_to_exclude=prep.convs[:float_convs],
                        extra_options={"CalibPercentile": INT8_PERCENTILE, "TensorQuantOverrides": prep.depthwise},
                        calibration_cache_path=prep.graph.with_name("int8.ranges.json"))  # calibrated once, reused
    return out


def to_int8(ctx: ExportContext, out: Path) -> dict[str, Any]:
    """Static INT8, QDQ format, per-channel weights, activation ranges calibrated on real images (percentile), after
    ``quant_pre_process``; uint8 weights and activations (see :data:`INT8_WEIGHTS`). Mixed precision by measured
    sensitivity: the first ``k`` convolutions stay FP32 for the smallest ``k`` (in :data:`INT8_FLOAT_CONVS`) at
    which the calibration images' mean cosine to the FP32 graph reaches :data:`INT8_CALIB_COSINE` (the held-out images
    are never used here; they judge the result in the export gate). Per-tensor weights wreck depthwise convolutions;
    dynamic quantization suits CNNs poorly."""
    prep = prepare_int8(ctx.onnx_fp32, ctx.workdir)
    reference = _run(prep.graph, ctx.calib)

    def quantize(float_convs: int) -> Path:
        return quantize_prepared(prep, ctx.calib, float_convs, ctx.workdir / f"int8.float{float_convs}.onnx")

    search = first_float_convs(quantize, lambda path: _run(path, ctx.calib), reference,
                               candidates(INT8_FLOAT_CONVS, len(prep.convs)), INT8_CALIB_COSINE)
    shutil.move(search.quantized, out)
    return {"tool": f"onnxruntime {_version('onnxruntime')} quantize_static", "format": "QDQ", "per_channel": True,
            "weights": INT8_WEIGHTS, "depthwise_weights": INT8_DEPTHWISE_WEIGHTS, "activations": INT8_ACTIVATIONS,
            "calibration": f"{INT8_CALIBRATION} {INT8_PERCENTILE}", "calibration_images": len(ctx.calib),
            "float_nodes": prep.convs[:search.kept.float_convs]} | search.record(INT8_CALIB_COSINE)


# ------------------------------------------------------------------------------------------------- text encoders
def optimize_fp32_extended(ctx: ExportContext, out: Path) -> dict[str, Any]:
    """ONNX Runtime's portable offline optimisation at EXTENDED level (text encoders; the device applies ALL
    online)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    ort.InferenceSession(str(ctx.onnx_fp32), options, providers=["CPUExecutionProvider"])
    return {"tool": f"onnxruntime {ort.__version__}", "optimization": "ORT_ENABLE_EXTENDED (offline)"}


def to_int8_dynamic(ctx: ExportContext, out: Path) -> dict[str, Any]:
    """Dynamic INT8 (text encoders): per-channel int8 weights of every MatMul/Gemm, activations quantized on the fly
    per batch (suits transformers: no calibration, activations' ranges vary with every sentence). Per-tensor weights
    lose much more (MiniLM on review snippets: mean cosine to FP32 0.957 per tensor, 0.991 per channel)."""
    import logging

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quant_log = logging.getLogger()  # quantize_dynamic warns on the root logger about optional pre-processing
    level = quant_log.level
    quant_log.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(str(ctx.onnx_fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        quant_log.setLevel(level)
    return {"tool": f"onnxruntime {ort.__version__} quantize_dynamic", "format": "QOperator (dynamic)",
            "per_channel": True, "weights": "int8", "activations": "uint8, per batch at run time",
            "calibration": "none"}
