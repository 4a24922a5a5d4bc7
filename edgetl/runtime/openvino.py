"""OpenVINO backend (CPU). The model is compiled once per extractor object; one infer request serves every batch.

Inference precision is always set explicitly to f32: on CPUs with bf16 support OpenVINO otherwise computes FP32 and
FP16 graphs in bf16 (a ~1e-2 difference to PyTorch). INT8 IRs still run their quantized parts in int8.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl.errors import BundleError, RuntimeMissingError, one_line
from edgetl.runtime.base import FeatureExtractor, check_batch

log = logging.getLogger(__name__)

#: compile options for every graph; threads are added per extractor
BASE_CONFIG: dict[str, str] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}


class OpenVinoExtractor(FeatureExtractor):
    """An OpenVINO IR (``.xml`` with its ``.bin``): ``(N, 3, S, S)`` float32 → ``(N, D)`` float32, any ``N``."""

    backend = "openvino"

    def __init__(self, path: Path, entry: dict[str, Any] | None = None, threads: int | None = None,
                 device: str = "CPU", config: dict[str, Any] | None = None):
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeMissingError("openvino is not installed; install the device extra: "
                                      "pip install 'edgetl[openvino]'") from exc
        path = Path(path)
        self.config: dict[str, Any] = dict(BASE_CONFIG)
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.config.update(config or {})
        self.device = device
        try:
            core = ov.Core()
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, device, self.config)
            self.request = self.compiled.create_infer_request()
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own exception types
            raise BundleError(f"openvino cannot load {path} ({one_line(exc)}); the IR or its .bin is damaged, "
                              "missing or needs a newer openvino") from exc
        inputs, outputs = self.compiled.inputs, self.compiled.outputs
        if len(inputs) != 1 or len(outputs) < 1:
            raise BundleError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; an extractor has one "
                              "image input and an embedding output")
        shape = inputs[0].get_partial_shape()
        self.size: int | None = None
        if shape.rank.is_static and len(shape) == 4 and shape[2].is_static and shape[3].is_static:
            self.size = shape[2].get_length()
        self.input_name = inputs[0].get_any_name()
        self.output = outputs[0]
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision: str = hint.to_string() if hasattr(hint, "to_string") else str(hint)  #: "f32" unless overridden

    def embed(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``(N, 3, S, S)`` float32 → ``(N, D)`` float32 (a fresh array, not the request's output buffer)."""
        batch = check_batch(batch, self.size)
        result = self.request.infer({0: batch})
        return np.array(result[self.output], dtype=np.float32, copy=True)
