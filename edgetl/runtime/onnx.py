"""ONNX Runtime backend. The session is created once per extractor object and reused for every batch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl.budget import MemorySettings
from edgetl.errors import BundleError, RuntimeMissingError
from edgetl.runtime.base import FeatureExtractor, check_batch

log = logging.getLogger(__name__)


#: provider options for an FP32 graph: exact FP32 on NVIDIA GPUs (the CUDA provider's TF32 default moved embeddings by
#: up to 7.6e-3 on an H200, failing the FP32 golden-vector check; TF32 is a precision choice, not a default)
FP32_PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}


def open_session(path: Path, threads: int | None = None, providers: list[str] | None = None,
                 precision: str = "fp32", memory: MemorySettings | None = None) -> Any:
    """An ONNX Runtime session for ``path`` (all graph optimisations, online), on the available ``providers``.

    ``memory`` (from :func:`edgetl.budget.memory_settings`) sets the CPU memory arena and memory pattern; without it
    ONNX Runtime's defaults (both on) stay."""
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
    if memory is not None:
        options.enable_cpu_mem_arena = bool(memory.enable_cpu_mem_arena)
        options.enable_mem_pattern = bool(memory.enable_mem_pattern)
    available = ort.get_available_providers()
    wanted = list(providers or ["CPUExecutionProvider"])
    chosen = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    if chosen != wanted:
        log.warning("execution providers %s not all available (have %s); using %s", wanted, available, chosen)
    try:
        settings = FP32_PROVIDER_OPTIONS if precision == "fp32" else {}
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen,
                                       provider_options=[settings.get(p, {}) for p in chosen])
        failed = [p for p in chosen if p not in session.get_providers()]
        if failed:
            # onnxruntime fell back on its own (e.g. TensorRT libraries absent) and dropped every provider option;
            # start again on the providers that did work, with their options
            rest = [p for p in chosen if p not in failed] or ["CPUExecutionProvider"]
            log.warning("execution providers %s failed to start; using %s", failed, rest)
            session = ort.InferenceSession(str(path), sess_options=options, providers=rest,
                                           provider_options=[settings.get(p, {}) for p in rest])
        return session
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise BundleError(f"onnxruntime cannot load {path} ({str(exc).splitlines()[0]}); the graph is damaged "
                          "or needs a newer onnxruntime") from exc


class OnnxExtractor(FeatureExtractor):
    backend = "onnx"

    def __init__(self, path: Path, entry: dict[str, Any] | None = None, threads: int | None = None,
                 providers: list[str] | None = None, memory: MemorySettings | None = None):
        """``memory``: the budget's settings (:func:`edgetl.budget.memory_settings`), None for ONNX Runtime's
        defaults."""
        self.memory = memory
        self.session = open_session(path, threads, providers, str((entry or {}).get("precision", "fp32")), memory)
        self.providers = self.session.get_providers()
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = inp.shape[2] if isinstance(inp.shape[2], int) else None
        self.output_name = self.session.get_outputs()[0].name

    def embed(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Embeddings of ``batch``; under a memory budget, run in slices of at most its ``batch_size`` images (the
        activations of one session run grow with the batch: a 32-image run at 224 px needs ~300 MB)."""
        batch = check_batch(batch, self.size)
        step = self.memory.batch_size if self.memory is not None and self.memory.budget_mb is not None else len(batch)
        if len(batch) <= step:
            return self.session.run([self.output_name], {self.input_name: batch})[0].astype(np.float32, copy=False)
        return np.concatenate([self.session.run([self.output_name], {self.input_name: batch[i:i + step]})[0]
                               for i in range(0, len(batch), step)]).astype(np.float32, copy=False)
