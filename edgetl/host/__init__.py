"""Host side (needs the ``host`` extra: torch, torchvision, onnx): backbones, fine-tuning, export, bundle packing.

Nothing outside this package imports torch; the CLI imports it inside host commands only.
"""

from __future__ import annotations

from edgetl.errors import RuntimeMissingError

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the host extra
    raise RuntimeMissingError(
        "this command runs on the host and needs PyTorch; install the host extra: pip install 'edgetl[host]'") from exc
