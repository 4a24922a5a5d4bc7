"""ONNX Runtime backend. The session is created once per extractor object and reused for every batch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl.errors import BundleError, RuntimeMissingError
from edgetl.runtime.base import FeatureExtractor, check_batch

log = logging.getLogger(__name__)


class OnnxExtractor(FeatureExtractor):
    backend = "onnx"

    def __init__(self, path: Path, entry: dict[str, Any] | None = None, threads: int | None = None,
                 providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeMissingError("onnxruntime is not installed; install the device extra: "
                                      "pip install 'edgetl[onnx]'") from exc
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # hardware-specific, online
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        available = ort.get_available_providers()
        wanted = list(providers or ["CPUExecutionProvider"])
        chosen = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        if chosen != wanted:
            log.warning("execution providers %s not all available (have %s); using %s", wanted, available, chosen)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BundleError(f"onnxruntime cannot load {path} ({str(exc).splitlines()[0]}); the graph is damaged "
                              "or needs a newer onnxruntime") from exc
        self.providers = self.session.get_providers()
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = inp.shape[2] if isinstance(inp.shape[2], int) else None
        self.output_name = self.session.get_outputs()[0].name

    def embed(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        batch = check_batch(batch, self.size)
        return self.session.run([self.output_name], {self.input_name: batch})[0].astype(np.float32, copy=False)
