"""Feature extractors on the device: one table from backend name to implementation, each importing its engine lazily."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from edgetl.errors import BundleError
from edgetl.runtime.base import FeatureExtractor

#: backend → (module, class); the module is imported only when that backend is used
BACKENDS: dict[str, tuple[str, str]] = {
    "onnx": ("edgetl.runtime.onnx", "OnnxExtractor"),
}


def load_extractor(backend: str, path: Path, **options: Any) -> FeatureExtractor:
    """Open the graph at ``path`` with ``backend`` (see :data:`BACKENDS`)."""
    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    module, name = BACKENDS[backend]
    cls = getattr(importlib.import_module(module), name)
    return cls(path, **options)


__all__ = ["BACKENDS", "FeatureExtractor", "load_extractor"]
