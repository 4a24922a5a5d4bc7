"""One dispatch point for every exported graph: ``(modality, format, precision)`` → converter.

A converter receives an :class:`ExportContext` (the PyTorch extractor, the FP32 ONNX reference already written,
the calibration inputs) and the path of the file it must write; it returns a dict of the settings it used
(recorded in the manifest as ``quantization``). Each converter module imports its toolchain lazily, so a missing
toolchain only fails the formats that need it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetl.errors import DataError, RuntimeMissingError


@dataclass(frozen=True)
class ExportContext:
    features: torch.nn.Module  #: PyTorch extractor in eval mode: images (N, 3, S, S) or packed tokens (N, 2, L) → (N, D)
    onnx_fp32: Path  #: FP32 ONNX reference graph (output "embeddings", dynamic batch)
    input_size: int  #: image side in pixels (0 for text: token inputs have no fixed size)
    calib: np.ndarray  #: (N, 3, S, S) float32 preprocessed calibration images (real, from --calib); text: none
    workdir: Path  #: scratch folder for intermediate files


Converter = Callable[[ExportContext, Path], dict[str, Any]]

#: (modality, format, precision) → (module, function, file name in the bundle, extra that provides the toolchain).
#: Text encoders are ONNX only: the device side runs them with ONNX Runtime; their INT8 is dynamic (no calibration).
CONVERTERS: dict[tuple[str, str, str], tuple[str, str, str, str]] = {
    ("image", "onnx", "fp32"): ("edgetl.host.onnx_quant", "optimize_fp32", "extractor.onnx", "host"),
    ("image", "onnx", "fp16"): ("edgetl.host.onnx_quant", "to_fp16", "extractor.fp16.onnx", "host"),
    ("image", "onnx", "int8"): ("edgetl.host.onnx_quant", "to_int8", "extractor.int8.onnx", "host"),
    ("image", "openvino", "fp32"): ("edgetl.host.openvino_export", "to_fp32", "extractor.xml", "host"),
    ("image", "openvino", "fp16"): ("edgetl.host.openvino_export", "to_fp16", "extractor.fp16.xml", "host"),
    ("image", "openvino", "int8"): ("edgetl.host.openvino_export", "to_int8", "extractor.int8.xml", "host"),
    ("image", "tflite", "fp32"): ("edgetl.host.tflite_export", "to_fp32", "extractor.tflite", "host"),
    ("image", "tflite", "int8"): ("edgetl.host.tflite_export", "to_int8", "extractor.int8.tflite", "host"),
    ("text", "onnx", "fp32"): ("edgetl.host.onnx_quant", "optimize_fp32_extended", "extractor.onnx", "host"),
    ("text", "onnx", "int8"): ("edgetl.host.onnx_quant", "to_int8_dynamic", "extractor.int8.onnx", "host"),
}
FORMATS = ("onnx", "openvino", "tflite")
PRECISIONS = ("fp32", "fp16", "int8")


def available(modality: str) -> list[tuple[str, str]]:
    """Every (format, precision) the table converts for ``modality``, in table order."""
    return [(f, p) for m, f, p in CONVERTERS if m == modality]


def converter(fmt: str, precision: str, modality: str = "image") -> tuple[Converter, str]:
    """The converter function and bundle file name for ``fmt``/``precision`` of a ``modality`` extractor."""
    key = (modality, fmt, precision)
    if key not in CONVERTERS:
        known = ", ".join(f"{f}/{p}" for f, p in available(modality))
        raise DataError(f"no exporter for {fmt}/{precision}; available: {known}")
    module, name, filename, extra = CONVERTERS[key]
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise RuntimeMissingError(f"exporting {fmt}/{precision} needs {exc.name or 'a missing package'}; install the "
                                  f"host extra: pip install 'edgetl[{extra}]'") from exc
    return fn, filename
