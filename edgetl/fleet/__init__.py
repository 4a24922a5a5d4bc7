"""Head-only federated learning across a fleet of devices that share one bundle, on Flower (``edgetl[fleet]``).

Devices share head parameters and per-class counts/sums, never images or embeddings: :mod:`edgetl.fleet.core` holds
the numpy arithmetic (device side and aggregation), :mod:`edgetl.fleet.app` the Flower ``ServerApp`` / ``ClientApp``.
"""

from __future__ import annotations

from edgetl.fleet.core import DeviceStats, FleetStats, LocalData, merge_stats

__all__ = ["DeviceStats", "FleetStats", "LocalData", "merge_stats"]
