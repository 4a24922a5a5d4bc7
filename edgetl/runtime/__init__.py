"""Feature extractors on the device: one table from backend name to implementation, each importing its engine lazily."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from edgetl.errors import BundleError
from edgetl.runtime.base import FeatureExtractor

#: backend → (module, class, Python module of its engine, extra that installs it)
BACKENDS: dict[str, tuple[str, str, str, str]] = {
    "onnx": ("edgetl.runtime.onnx", "OnnxExtractor", "onnxruntime", "onnx"),
    "openvino": ("edgetl.runtime.openvino", "OpenVinoExtractor", "openvino", "openvino"),
    "tflite": ("edgetl.runtime.tflite", "TfliteExtractor", "ai_edge_litert", "tflite"),
}
#: text encoders (two-input graphs: token ids + attention mask), same layout as :data:`BACKENDS`
TEXT_BACKENDS: dict[str, tuple[str, str, str, str]] = {
    "onnx": ("edgetl.runtime.onnx_text", "OnnxTextExtractor", "onnxruntime", "onnx"),
}
#: modality → its backend table: the one place an extractor implementation is chosen
MODALITY_BACKENDS: dict[str, dict[str, tuple[str, str, str, str]]] = {"image": BACKENDS, "text": TEXT_BACKENDS}


def installed_backends() -> list[str]:
    """Backends whose engine can be imported here (checked without importing it)."""
    found = []
    for name, (_, _, engine, _) in BACKENDS.items():
        if importlib.util.find_spec(engine) is not None or (name == "tflite" and
                                                             importlib.util.find_spec("tflite_runtime")):
            found.append(name)
    return found


def load_extractor(backend: str, path: Path, *, entry: dict[str, Any] | None = None, threads: int | None = None,
                   modality: str = "image", **options: Any) -> FeatureExtractor:
    """Open the graph at ``path`` with ``backend`` (see :data:`BACKENDS`; :data:`TEXT_BACKENDS` for a text encoder);
    ``entry`` is its manifest record."""
    table = MODALITY_BACKENDS.get(modality)
    if table is None:
        raise BundleError(f"unknown modality {modality!r}; known: {', '.join(MODALITY_BACKENDS)}")
    if backend not in table:
        raise BundleError(f"unknown backend {backend!r} for {modality}; known: {', '.join(table)}")
    module, name, _, _ = table[backend]
    cls = getattr(importlib.import_module(module), name)
    return cls(path, entry=entry or {}, threads=threads, **options)


__all__ = ["BACKENDS", "TEXT_BACKENDS", "FeatureExtractor", "installed_backends", "load_extractor"]
