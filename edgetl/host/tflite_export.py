"""LiteRT (TFLite) converters: FP32 with litert-torch, static INT8 with ai-edge-quantizer.

Each converter follows :data:`edgetl.host.convert.Converter`. The graph is converted from the PyTorch extractor
(``ctx.features``), not from the ONNX reference: litert-torch lowers the module directly. It keeps the NCHW layout of
the PyTorch module, input ``(1, 3, S, S)`` float32 → output ``(1, D)``. litert-torch cannot export a dynamic batch, so
the graph has batch 1 and the device resizes the input tensor to its batch at run time
(:class:`edgetl.runtime.tflite.TfliteExtractor`).

The INT8 graph (recipe ``static_wi8_ai8``: int8 weights per channel, int8 activations calibrated on real images) also
has int8 input and output; their scale and zero point are recorded in the returned settings, and the device runtime
reads them from the graph itself. litert-torch, ai-edge-quantizer and ai-edge-litert are imported inside the
functions, so a host without them only loses these formats.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import DataError, EdgeTLError, ExportValidationError, RuntimeMissingError, one_line
from edgetl.host.convert import ExportContext
from edgetl.host.sensitivity import candidates, first_float_convs

log = logging.getLogger(__name__)

#: ai-edge-quantizer recipe of :func:`to_int8` (a function of ``ai_edge_quantizer.recipe``)
INT8_RECIPE = "static_wi8_ai8"
#: mixed precision, chosen by measurement (issue 14): the graph's first convolutions (normalised pixels in, then the
#: widest per-tensor activation ranges of the network) stay float, as many as it takes for the calibration images' mean
#: cosine to the FP32 graph to reach INT8_CALIB_COSINE, trying the numbers in INT8_FLOAT_CONVS. MobileNetV2 on the demo data:
#: all-int8 0.969 mean / 0.892 min cosine on held-out images, first two convolutions float 0.990 / 0.981. Float I/O
#: (0.969), a float MEAN (0.970) and the MSE algorithm (0.750) did not help; the held-out images are never used here.
#: EfficientNet-Lite0: all-int8 0.977, first four float 0.986, and the fifth and sixth convolutions are the next most
#: sensitive (one at a time: 0.989, 0.991; any later one 0.983-0.985); first five 0.993 (reference-head agreement
#: 0.942), first six 0.9965 (agreement 0.9625): the agreement limit (0.95) needs more than 0.99. On 64-px digits the
#: first five reach 0.9957 on the calibration images but agree only 0.933 on held-out ones, the first six 0.9975 / 0.953
#: (every k: tools/int8_sensitivity_sweep.py, docs/results/int8_sweep_tflite_efficientnet_lite0_digits.json), hence
#: 0.997.
INT8_CALIB_COSINE, INT8_FLOAT_CONVS = 0.997, (0, 1, 2, 3, 4, 5, 6, 8, 10, 12)
#: the op types counted as convolutions by the mixed-precision search, in graph order
CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
#: intermediate FP32 graph that :func:`to_int8` writes into ``ctx.workdir``
FP32_INTERMEDIATE = "tflite_fp32_for_int8.tflite"
_INSTALL = "install the host extra: pip install 'edgetl[host]'"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the toolchains' console output: litert-torch's progress tree (unless the user asked for it through
    ``LITERT_TORCH_SHOW_PROGRESS``), ai-edge-quantizer's tqdm bars and both libraries' Python warnings."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    set_here = key not in os.environ
    if set_here:
        os.environ[key] = "n"
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if set_here:
            os.environ.pop(key, None)


def _import_litert_torch() -> Any:
    """``litert_torch``, imported without the deprecation notice torch logs while it registers its types."""
    noisy = logging.getLogger("torch.utils._pytree")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        import litert_torch
    finally:
        noisy.setLevel(level)
    return litert_torch


def _tensor_info(detail: dict[str, Any]) -> dict[str, Any]:
    """Name, shape, dtype and (for integer tensors) scale / zero point of one interpreter tensor detail."""
    dtype = np.dtype(detail["dtype"])
    info: dict[str, Any] = {"name": str(detail["name"]), "shape": [int(d) for d in detail["shape"]],
                            "dtype": dtype.name}
    if dtype.kind in "iu":
        scale, zero_point = detail["quantization"]
        info |= {"scale": float(scale), "zero_point": int(zero_point)}
    return info


def describe_tflite(path: Path) -> dict[str, Any]:
    """The signature of a ``.tflite`` graph: its key, input/output argument names and tensor details."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise RuntimeMissingError(f"reading a LiteRT graph needs ai-edge-litert; {_INSTALL}") from exc
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=1)
        signatures = interpreter.get_signature_list()
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    except Exception as exc:  # noqa: BLE001 - the interpreter raises ValueError/RuntimeError of its own
        raise ExportValidationError(f"LiteRT cannot load the graph it just wrote, {path} ({one_line(exc)})") from exc
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportValidationError(f"{path.name} has {len(inputs)} inputs and {len(outputs)} outputs; the extractor "
                                    "must have exactly one of each")
    key = "serving_default" if "serving_default" in signatures else next(iter(signatures), None)
    sig = signatures.get(key, {}) if key else {}
    return {"signature": key, "input_arg": (sig.get("inputs") or [None])[0],
            "output_arg": (sig.get("outputs") or [None])[0],
            "input": _tensor_info(inputs[0]), "output": _tensor_info(outputs[0])}


def to_fp32(ctx: ExportContext, out_path: Path) -> dict[str, Any]:
    """FP32 ``.tflite`` of ``ctx.features`` by litert-torch: input ``(1, 3, S, S)`` float32 NCHW → ``(1, D)``."""
    try:
        import torch

        litert_torch = _import_litert_torch()
    except ImportError as exc:
        raise RuntimeMissingError(f"TFLite export needs {exc.name or 'litert-torch'}; {_INSTALL}") from exc
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.zeros(1, 3, ctx.input_size, ctx.input_size)
    start = time.perf_counter()
    try:
        with _quiet(), torch.no_grad():
            litert_torch.convert(ctx.features.eval(), (sample,)).export(str(out_path))
    except Exception as exc:  # noqa: BLE001 - torch.export / MLIR lowering raise many exception types
        raise ExportValidationError(f"litert-torch could not convert the extractor to TFLite "
                                    f"({type(exc).__name__}: {one_line(exc)})") from exc
    seconds = time.perf_counter() - start
    if not out_path.is_file() or out_path.stat().st_size == 0:
        raise ExportValidationError(f"litert-torch did not write {out_path}")
    graph = describe_tflite(out_path)
    log.info("litert-torch wrote %s (%.1f MB) in %.1f s", out_path.name, out_path.stat().st_size / 1e6, seconds)
    return {"tool": f"litert-torch {_version('litert-torch')}", "litert_torch_version": _version("litert-torch"),
            "source": "pytorch", "batch": 1, "dynamic_batch": False, "layout": "NCHW", "signature": graph["signature"],
            "input_arg": graph["input_arg"], "output_arg": graph["output_arg"], "input": graph["input"],
            "output": graph["output"], "convert_seconds": round(seconds, 2)}


def _calibration_items(calib: np.ndarray, input_size: int) -> list[np.ndarray]:
    """``(N, 3, S, S)`` float32 → N contiguous ``(1, 3, S, S)`` arrays (the graph has batch 1)."""
    calib = np.asarray(calib)
    if calib.ndim != 4 or calib.shape[1:] != (3, input_size, input_size) or len(calib) == 0:
        raise DataError(f"TFLite INT8 calibration needs preprocessed real images (N, 3, {input_size}, {input_size}) "
                        f"with N >= 1, found {calib.shape}")
    calib = calib.astype(np.float32, copy=False)
    return [np.ascontiguousarray(calib[i:i + 1]) for i in range(len(calib))]


def _embed(path: Path, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """``images`` through the device runtime's LiteRT extractor (dequantized float32 embeddings)."""
    from edgetl.runtime.tflite import TfliteExtractor

    extractor = TfliteExtractor(path, entry={"layout": "NCHW"})
    return np.concatenate([extractor.embed(images[i:i + batch]) for i in range(0, len(images), batch)])


def conv_scopes(path: Path) -> list[dict[str, Any]]:
    """The convolutions of a ``.tflite`` graph in graph order: ``{"index", "op", "scope"}`` (``scope``: the op's output
    tensor names, which ai-edge-quantizer's recipe regexes match)."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    model = tfl.read_model(str(path))
    convs = []
    for subgraph in model.subgraphs[:1]:
        for index, op in enumerate(subgraph.operators):
            name = tfl.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode)
            if name is not None and str(getattr(name, "value", name)) in CONV_OPS:
                convs.append({"index": index, "op": str(getattr(name, "value", name)),
                              "scope": tfl.get_op_scope(op, subgraph.tensors)})
    return convs


def to_int8(ctx: ExportContext, out_path: Path) -> dict[str, Any]:
    """INT8 ``.tflite``: the FP32 graph of :func:`to_fp32` (written to ``ctx.workdir``) quantized by ai-edge-quantizer
    with recipe ``static_wi8_ai8``, activation ranges calibrated on every image of ``ctx.calib`` (one at a time).

    Mixed precision by measured sensitivity, as :func:`edgetl.host.onnx_quant.to_int8`: the first ``k`` convolutions
    (:data:`CONV_OPS`, graph order) stay float for the smallest ``k`` (in :data:`INT8_FLOAT_CONVS`) at which the
    calibration images' mean cosine to the FP32 graph reaches :data:`INT8_CALIB_COSINE` (when none does, the smallest
    ``k`` on the best one's plateau, :data:`edgetl.host.sensitivity.PLATEAU`); the held-out images are never used
    here, they judge the result in the export gate. Every trial is recorded under ``"sensitivity"``.

    Input ``(1, 3, S, S)`` and output ``(1, D)`` are int8; the returned settings carry their scale and zero point
    (``real = scale * (q - zero_point)``).
    """
    items = _calibration_items(ctx.calib, ctx.input_size)
    try:
        from ai_edge_quantizer import algorithm_manager, qtyping, quantizer, recipe  # noqa: F401 - fail early
    except ImportError as exc:
        raise RuntimeMissingError(f"TFLite INT8 export needs {exc.name or 'ai-edge-quantizer'}; {_INSTALL}") from exc
    out_path = Path(out_path)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    fp32_path = ctx.workdir / FP32_INTERMEDIATE
    fp32 = to_fp32(ctx, fp32_path)
    if fp32["signature"] is None or fp32["input_arg"] is None:
        raise ExportValidationError(f"{fp32_path.name} has no signature to calibrate through; cannot quantize it")
    start = time.perf_counter()
    search, convs = _mixed_precision(ctx, fp32_path, fp32, items, out_path)
    seconds = time.perf_counter() - start
    if not out_path.is_file() or out_path.stat().st_size == 0:
        raise ExportValidationError(f"ai-edge-quantizer did not write {out_path}")
    graph = describe_tflite(out_path)
    float_convs = convs[:search.kept.float_convs]
    log.info("ai-edge-quantizer wrote %s (%.1f MB, %s, %d float convolutions) in %.1f s", out_path.name,
             out_path.stat().st_size / 1e6, INT8_RECIPE, len(float_convs), seconds)
    return {"tool": f"litert-torch {_version('litert-torch')} + ai-edge-quantizer {_version('ai-edge-quantizer')}",
            "litert_torch_version": _version("litert-torch"),
            "ai_edge_quantizer_version": _version("ai-edge-quantizer"), "source": "pytorch",
            "method": "post_training_static_quantization", "recipe": INT8_RECIPE, "algorithm": "min_max_uniform_quant",
            "weights": "int8", "activations": "int8", "calibration": "real images (ExportContext.calib)",
            "calibration_images": len(items), "batch": 1, "dynamic_batch": False, "layout": "NCHW",
            "float_nodes": [f"{c['op']}#{c['index']}" for c in float_convs],
            "signature": graph["signature"], "input_arg": graph["input_arg"], "output_arg": graph["output_arg"],
            "int8_input": graph["input"]["dtype"] == "int8", "int8_output": graph["output"]["dtype"] == "int8",
            "input": graph["input"], "output": graph["output"], "fp32_convert_seconds": fp32["convert_seconds"],
            "quantize_seconds": round(seconds, 2)} | search.record(INT8_CALIB_COSINE)


def _quantizer(fp32_path: Path, float_convs: list[dict[str, Any]]) -> Any:
    """An ai-edge-quantizer of the FP32 graph with recipe :data:`INT8_RECIPE`, leaving ``float_convs`` unquantized."""
    import re

    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer, recipe

    q = quantizer.Quantizer(str(fp32_path), getattr(recipe, INT8_RECIPE)())
    for conv in float_convs:  # later recipe entries win: these ops are left unquantized
        q.update_quantization_recipe("^" + re.escape(conv["scope"]) + "$", qtyping.TFLOperationName.ALL_SUPPORTED,
                                     algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE)
    return q


def _mixed_precision(ctx: ExportContext, fp32_path: Path, fp32: dict[str, Any], items: list[np.ndarray],
                     out_path: Path) -> tuple[Any, list[dict[str, Any]]]:
    """Calibrate the activation ranges once, quantize with the first ``k`` convolutions left float for each ``k`` the
    search tries, and move the chosen graph to ``out_path``; return the search and the graph's convolutions."""
    calib = np.concatenate(items)
    trials: list[Path] = []
    ranges: Any = None

    def trial(k: int) -> Path:
        path = ctx.workdir / f"tflite_int8_float{k}.tflite"
        trials.append(path)
        result = _quantizer(fp32_path, convs[:k]).quantize(ranges, enable_progress_bar=False,
                                                           enable_progress_report=False)
        path.unlink(missing_ok=True)
        result.export_model(str(path))
        return path

    try:
        convs = conv_scopes(fp32_path)
        reference = _embed(fp32_path, calib)
        with _quiet():
            # activation ranges of every tensor, calibrated once and reused by every trial
            ranges = _quantizer(fp32_path, []).calibrate({fp32["signature"]: [{fp32["input_arg"]: item}
                                                                                for item in items]},
                                                          num_threads=min(os.cpu_count() or 1, 16))
            search = first_float_convs(trial, lambda path: _embed(path, calib), reference,
                                       candidates(INT8_FLOAT_CONVS, len(convs)), INT8_CALIB_COSINE)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.unlink(missing_ok=True)
        shutil.move(str(search.quantized), str(out_path))
    except EdgeTLError:
        raise
    except Exception as exc:  # noqa: BLE001 - ai-edge-quantizer raises ValueError/RuntimeError of its own
        raise ExportValidationError(f"ai-edge-quantizer {INT8_RECIPE} quantization of {fp32_path.name} failed "
                                    f"({type(exc).__name__}: {one_line(exc)})") from exc
    finally:
        for path in trials:
            path.unlink(missing_ok=True)
    return search, convs
