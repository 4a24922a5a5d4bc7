"""OpenVINO IR converters: FP32, FP16 (compressed weights) and INT8 (NNCF post-training quantization).

Each converter follows :data:`edgetl.host.convert.Converter`: it reads the FP32 ONNX reference graph of an
:class:`~edgetl.host.convert.ExportContext` (input ``images`` ``(N, 3, S, S)`` float32, output ``embeddings``
``(N, D)``, dynamic batch), writes ``out_xml`` and the weights file next to it (same stem, ``.bin``), and returns the
settings it used. The weights file is listed under ``"companions"`` (file names only) so the bundle writer hashes it
too. OpenVINO and NNCF are imported inside the functions, so a host without them only loses these formats.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import DataError, EdgeTLError, ExportValidationError, RuntimeMissingError, one_line
from edgetl.host.convert import ExportContext
from edgetl.host.sensitivity import candidates, first_float_convs

log = logging.getLogger(__name__)

#: NNCF settings of :func:`to_int8`: symmetric ("performance") quantization, no model-type specific scheme (CNN)
INT8_PRESET = "performance"
INT8_TARGET_DEVICE = "ANY"
#: NNCF's full bias correction: on MobileNetV2 at 64 px it lifts the mean cosine to FP32 from 0.980 (fast variant)
#: to 0.988 for about 4 s more on two cores
INT8_FAST_BIAS_CORRECTION = False

#: mixed precision, chosen by measurement (issue 14): the graph's first convolutions (normalised pixels in, the widest
#: activation ranges) are left out of quantization (``nncf.IgnoredScope``), as many as it takes for the calibration
#: images' mean cosine to the FP32 model to reach INT8_CALIB_COSINE, trying the numbers in INT8_FLOAT_CONVS (the
#: held-out images are never used here). MobileNetV2 on the demo data, held-out mean / min cosine: all-int8 0.974 / 0.944, first
#: convolution float 0.980 / 0.953, first two 0.985 / 0.971 (full bias correction) or 0.990 / 0.980 (fast bias
#: correction, which is also quicker: hence INT8_MIXED_FAST_BIAS_CORRECTION); the MIXED preset (asymmetric
#: activations) 0.960, OverflowFix.ENABLE 0.975. The reference-head agreement limit (0.95) needs about 0.99.
#: EfficientNet-Lite0 (demo data, held-out mean cosine, fast bias correction): first 4 float 0.977 (full bias
#: correction 0.983), 8: 0.982, 10: 0.994, 12: 0.996 — its sensitive convolutions lie deeper, hence the wider steps.
INT8_CALIB_COSINE, INT8_FLOAT_CONVS = 0.99, (0, 1, 2, 4, 6, 8, 10, 12)
#: bias correction of :func:`to_int8` (mixed precision): fast; :func:`quantize_with_accuracy_control` keeps
#: INT8_FAST_BIAS_CORRECTION
INT8_MIXED_FAST_BIAS_CORRECTION = True
#: OpenVINO op types counted as convolutions by the mixed-precision search, in topological order
CONV_TYPES = ("Convolution", "GroupConvolution")

#: ``val_fn(embeddings (K, D) float32, indices (K,) int64 into the validation images) → metric``, higher is better
ValidationFn = Callable[[np.ndarray, np.ndarray], float]


def _missing(exc: ImportError, package: str) -> RuntimeMissingError:
    return RuntimeMissingError(f"OpenVINO export needs {exc.name or package}; install the host extra: "
                               "pip install 'edgetl[host]'")


def _import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:
        raise _missing(exc, "openvino") from exc
    return ov


def _import_nncf() -> Any:
    try:
        with _quiet():
            import nncf
    except ImportError as exc:
        raise _missing(exc, "nncf") from exc
    nncf.set_log_level(logging.ERROR)  # NNCF logs INFO lines to stdout by default
    return nncf


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Swallow NNCF's console output (rich progress bars and stdout logging) and its warnings."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield buffer


def _companions(out_xml: Path) -> list[str]:
    """Files written next to ``out_xml`` that belong to it (the weights): file names only."""
    return [out_xml.with_suffix(".bin").name]


def _convert(ctx: ExportContext) -> Any:
    """The FP32 ONNX reference as an in-memory ``ov.Model`` (dynamic batch kept)."""
    ov = _import_openvino()
    return ov.convert_model(str(ctx.onnx_fp32))


def _save(model: Any, out_xml: Path, compress_to_fp16: bool) -> None:
    ov = _import_openvino()
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out_xml), compress_to_fp16=compress_to_fp16)
    missing = [p.name for p in (out_xml, out_xml.with_suffix(".bin")) if not p.is_file()]
    if missing:
        raise ExportValidationError(f"OpenVINO did not write {', '.join(missing)} next to {out_xml}")


def _base_settings(ov: Any, out_xml: Path, compress_to_fp16: bool, seconds: float) -> dict[str, Any]:
    return {"tool": "openvino", "openvino_version": ov.__version__, "source": "onnx_fp32",
            "compress_to_fp16": compress_to_fp16, "dynamic_batch": True, "companions": _companions(Path(out_xml)),
            "convert_seconds": round(seconds, 2)}


def _to_ir(ctx: ExportContext, out_xml: Path, compress_to_fp16: bool) -> dict[str, Any]:
    ov = _import_openvino()
    start = time.perf_counter()
    try:
        _save(_convert(ctx), Path(out_xml), compress_to_fp16)
    except EdgeTLError:
        raise
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own exception types
        precision = "FP16" if compress_to_fp16 else "FP32"
        raise ExportValidationError(f"OpenVINO {precision} conversion of {ctx.onnx_fp32.name} failed "
                                    f"({one_line(exc)})") from exc
    return _base_settings(ov, Path(out_xml), compress_to_fp16, time.perf_counter() - start)


def to_fp32(ctx: ExportContext, out_xml: Path) -> dict[str, Any]:
    """FP32 IR: ``out_xml`` + ``<stem>.bin`` with float32 weights (``compress_to_fp16=False``)."""
    return _to_ir(ctx, out_xml, compress_to_fp16=False)


def to_fp16(ctx: ExportContext, out_xml: Path) -> dict[str, Any]:
    """FP16 IR: weights stored as float16 (about half the size); OpenVINO decompresses them at load time."""
    return _to_ir(ctx, out_xml, compress_to_fp16=True)


def _calibration_items(calib: np.ndarray, what: str = "calibration") -> list[np.ndarray]:
    """``(N, 3, S, S)`` float32 → N contiguous ``(1, 3, S, S)`` arrays (NNCF feeds one item per inference)."""
    calib = np.asarray(calib)
    if calib.ndim != 4 or calib.shape[1] != 3 or len(calib) == 0:
        raise DataError(f"INT8 {what} needs preprocessed real images (N, 3, S, S) with N >= 1, found {calib.shape}")
    calib = calib.astype(np.float32, copy=False)
    return [np.ascontiguousarray(calib[i:i + 1]) for i in range(len(calib))]


def _int8_settings(ov: Any, nncf: Any, out_xml: Path, subset_size: int, seconds: float) -> dict[str, Any]:
    return _base_settings(ov, out_xml, False, seconds) | {
        "tool": "nncf", "nncf_version": nncf.__version__, "method": "post_training_quantization",
        "preset": INT8_PRESET, "target_device": INT8_TARGET_DEVICE, "model_type": None, "subset_size": subset_size,
        "fast_bias_correction": INT8_FAST_BIAS_CORRECTION, "calibration": "real images (ExportContext.calib)"}


def conv_names(model: Any) -> list[str]:
    """Friendly names of the convolutions of an ``ov.Model`` (:data:`CONV_TYPES`), in topological order."""
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in CONV_TYPES]


def _embed(model: Any, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """``images`` through an in-memory ``ov.Model`` compiled as the device runtime compiles it (f32 hint)."""
    from edgetl.runtime.openvino import BASE_CONFIG

    compiled = _import_openvino().Core().compile_model(model, "CPU", dict(BASE_CONFIG))
    request = compiled.create_infer_request()
    return np.concatenate([np.array(request.infer({0: images[i:i + batch]})[compiled.outputs[0]], dtype=np.float32)
                           for i in range(0, len(images), batch)])


def to_int8(ctx: ExportContext, out_xml: Path) -> dict[str, Any]:
    """INT8 IR by NNCF post-training quantization of the converted FP32 model on ``ctx.calib`` (every image used).

    Symmetric ("performance" preset) INT8 weights and activations, per-channel weights, fast bias correction
    (:data:`INT8_MIXED_FAST_BIAS_CORRECTION`); weights file saved without FP16 compression. Input and output stay
    float32: ``(N, 3, S, S) → (N, D)``. Mixed precision by measured sensitivity, as :func:`edgetl.host.onnx_quant.to_int8`: the first ``k`` convolutions
    stay FP32 (``nncf.IgnoredScope``) for the smallest ``k`` (in :data:`INT8_FLOAT_CONVS`) at which the
    calibration images' mean cosine to the FP32 model reaches :data:`INT8_CALIB_COSINE` (when none does, the smallest
    ``k`` on the best one's plateau, :data:`edgetl.host.sensitivity.PLATEAU`); every trial is recorded under
    ``"sensitivity"``. The held-out images judge the result in the export gate.
    """
    items = _calibration_items(ctx.calib)
    ov = _import_openvino()
    nncf = _import_nncf()
    calib = np.concatenate(items)
    start = time.perf_counter()
    try:
        model = _convert(ctx)
        convs = conv_names(model)
        reference = _embed(model, calib)

        def quantize(k: int) -> Any:
            scope = nncf.IgnoredScope(names=convs[:k]) if k else None
            with _quiet():
                return nncf.quantize(model.clone(), nncf.Dataset(items), preset=nncf.QuantizationPreset.PERFORMANCE,
                                     target_device=nncf.TargetDevice.ANY, subset_size=len(items),
                                     fast_bias_correction=INT8_MIXED_FAST_BIAS_CORRECTION, ignored_scope=scope)

        search = first_float_convs(quantize, lambda quantized: _embed(quantized, calib), reference,
                                   candidates(INT8_FLOAT_CONVS, len(convs)), INT8_CALIB_COSINE)
        _save(search.quantized, Path(out_xml), compress_to_fp16=False)
    except EdgeTLError:
        raise
    except Exception as exc:  # noqa: BLE001 - NNCF/OpenVINO raise their own exception types
        raise ExportValidationError(f"NNCF INT8 quantization of {ctx.onnx_fp32.name} failed "
                                    f"({one_line(exc)})") from exc
    settings = _int8_settings(ov, nncf, Path(out_xml), len(items), time.perf_counter() - start)
    return settings | {"fast_bias_correction": INT8_MIXED_FAST_BIAS_CORRECTION,
                       "float_nodes": convs[:search.kept.float_convs]} | search.record(INT8_CALIB_COSINE)


def quantize_with_accuracy_control(ctx: ExportContext, out_xml: Path, val_images: np.ndarray, val_fn: ValidationFn,
                                   max_drop: float = 0.01) -> dict[str, Any]:
    """INT8 IR whose validation metric stays within ``max_drop`` (absolute) of the FP32 model's (NNCF accuracy control).

    NNCF quantizes on ``ctx.calib`` as :func:`to_int8` does, validates the FP32 and INT8 models, and when the drop is
    larger than ``max_drop`` returns the most harmful quantized layers to float precision until it fits (or all are).

    ``val_images``: ``(M, 3, S, S)`` float32 preprocessed real images. ``val_fn(embeddings, indices)`` gets the
    model's ``(K, D)`` float32 embeddings of ``val_images[indices]`` (``indices`` int64 ``(K,)``; NNCF validates the
    whole set, subsets and single images) and returns a float metric, higher is better — for example
    nearest-class-mean accuracy with the labels closed over. The returned settings add ``max_drop``, ``drop_type``
    and ``validation_size``.
    """
    items = _calibration_items(ctx.calib)
    validation = [(i, item) for i, item in enumerate(_calibration_items(val_images, what="validation"))]
    ov = _import_openvino()
    nncf = _import_nncf()

    def validate(compiled: Any, data: Iterable[tuple[int, np.ndarray]]) -> tuple[float, None]:
        pairs = list(data)
        indices = np.fromiter((i for i, _ in pairs), dtype=np.int64, count=len(pairs))
        embeddings = compiled(np.concatenate([x for _, x in pairs]))[compiled.outputs[0]]
        return float(val_fn(np.asarray(embeddings, dtype=np.float32), indices)), None

    start = time.perf_counter()
    try:
        model = _convert(ctx)
        with _quiet():
            quantized = nncf.quantize_with_accuracy_control(
                model, nncf.Dataset(items), nncf.Dataset(validation, lambda pair: pair[1]), validate,
                max_drop=float(max_drop), drop_type=nncf.DropType.ABSOLUTE,
                preset=nncf.QuantizationPreset.PERFORMANCE, target_device=nncf.TargetDevice.ANY, subset_size=len(items),
                fast_bias_correction=INT8_FAST_BIAS_CORRECTION)
        _save(quantized, Path(out_xml), compress_to_fp16=False)
    except EdgeTLError:
        raise
    except Exception as exc:  # noqa: BLE001 - NNCF/OpenVINO (and val_fn) raise their own exception types
        raise ExportValidationError(f"NNCF INT8 quantization with accuracy control of {ctx.onnx_fp32.name} failed "
                                    f"({one_line(exc)})") from exc
    settings = _int8_settings(ov, nncf, Path(out_xml), len(items), time.perf_counter() - start)
    return settings | {"method": "post_training_quantization_with_accuracy_control", "max_drop": float(max_drop),
                       "drop_type": "absolute", "validation_size": len(validation)}
