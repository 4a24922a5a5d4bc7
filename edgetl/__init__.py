"""edgetl: on-device transfer learning.

Host side (``edgetl.host``, needs torch): pretrained backbone → optional fine-tune → frozen extractor export → bundle.
Device side (numpy + one runtime, never torch): :class:`edgetl.DeviceRuntime` embeds, trains a head, predicts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from edgetl.device import DeviceRuntime


def __getattr__(name: str) -> Any:
    # lazy: `import edgetl` stays cheap (no numpy/runtime import) for the CLI's start-up
    if name == "DeviceRuntime":
        from edgetl.device import DeviceRuntime

        return DeviceRuntime
    raise AttributeError(f"module 'edgetl' has no attribute {name!r}")


__all__ = ["DeviceRuntime", "__version__"]
