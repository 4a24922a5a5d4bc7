"""The counters and gauges behind ``GET /metrics`` (the Prometheus text format, through ``prometheus_client``)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from edgetl.state import BUNDLE_HEAD

#: predictions the unknown rate is computed over
RECENT = 500


@dataclass
class Metrics:
    """Counters and gauges behind ``GET /metrics`` (Prometheus text format)."""

    registry: Any
    predictions: Any
    unknown: Any
    latency: Any
    drift: Any
    head_version: Any
    queue_length: Any
    unknown_rate: Any
    labels: Any
    recent_unknown: deque[bool] = field(default_factory=lambda: deque(maxlen=RECENT))

    @classmethod
    def create(cls) -> Metrics:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = CollectorRegistry()
        return cls(
            registry=r,
            predictions=Counter("edgetl_predictions", "Images classified, by predicted label and source "
                                "(api: POST /api/predict; inbox: the watcher's journal)", ["label", "source"],
                                registry=r),
            unknown=Counter("edgetl_unknown_predictions", "Images flagged unknown (novelty above the threshold)",
                            ["source"], registry=r),
            latency=Histogram("edgetl_predict_latency_seconds", "Latency of POST /api/predict (decode, embed, head)",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=r),
            drift=Gauge("edgetl_drift_score", "Rolling drift score (median novelty of the last inbox images)",
                        registry=r),
            head_version=Gauge("edgetl_head_version", "Current head version number (0: the bundle's own head, -1: "
                               "none)", registry=r),
            queue_length=Gauge("edgetl_label_queue_length", "Unlabelled images waiting in the label queue",
                               registry=r),
            unknown_rate=Gauge("edgetl_unknown_rate", f"Fraction of the last {RECENT} predictions flagged unknown",
                               registry=r),
            labels=Counter("edgetl_operator_labels", "Labels submitted by the operator", registry=r),
        )

    def observe(self, label: str, unknown: bool | None, source: str) -> None:
        self.predictions.labels(label=label, source=source).inc()
        if unknown is not None:
            self.recent_unknown.append(bool(unknown))
            if unknown:
                self.unknown.labels(source=source).inc()
            self.unknown_rate.set(sum(self.recent_unknown) / len(self.recent_unknown))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


def version_number(version: str | None) -> int:
    """A head version as the ``edgetl_head_version`` gauge shows it: ``v0003`` → 3, the bundle's head 0, none -1."""
    if version is None:
        return -1
    return 0 if version == BUNDLE_HEAD else int(version[1:])


__all__ = ["Metrics", "version_number"]
