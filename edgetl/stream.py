"""Frames from a camera or a video file → predictions, with OpenCV (the optional ``stream`` extra:
``pip install 'edgetl[stream]'``, which brings ``opencv-python-headless``; imported only when a stream is opened).

Every ``every``-th frame (frames 0, N, 2N, …) is classified by the current head — calibrated probability, unknown
flag, novelty and rolling drift through the same :class:`edgetl.prediction.Predictor` as ``watch`` and ``device
predict``; frames of a video file are embedded in batches, camera frames one by one (latency first). No torch.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.errors import DataError, RuntimeMissingError

if TYPE_CHECKING:
    from edgetl.device import DeviceRuntime
    from edgetl.prediction import Predictor


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:
        raise RuntimeMissingError("stream needs OpenCV, which is not installed; pip install 'edgetl[stream]' "
                                  "(opencv-python-headless)") from exc
    if not hasattr(cv2, "VideoCapture"):
        raise RuntimeMissingError(f"the module cv2 found at {getattr(cv2, '__file__', '?')} is not OpenCV; remove it "
                                  "or run from another folder, and pip install 'edgetl[stream]'")
    return cv2


def open_capture(camera: int | None = None, video: str | os.PathLike[str] | None = None) -> Any:
    """An opened ``cv2.VideoCapture`` on camera index ``camera`` or on the file ``video`` (exactly one)."""
    if (camera is None) == (video is None):
        raise DataError("pass exactly one source: a camera index or a video file")
    cv2 = _cv2()
    if video is not None:
        path = Path(video)
        if not path.is_file():
            raise DataError(f"video file {path} does not exist")
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise DataError(f"OpenCV cannot open video {path} (unknown container or codec); convert it, e.g. to "
                            "MJPEG .avi or H.264 .mp4")
    else:
        cap = cv2.VideoCapture(int(camera))  # type: ignore[arg-type]
        if not cap.isOpened():
            raise DataError(f"camera {camera} cannot be opened (absent, busy or no permission); check /dev/video* "
                            "and that your user is in the 'video' group")
    return cap


def stream_predictions(runtime: DeviceRuntime, camera: int | None = None, video: str | os.PathLike[str] | None = None,
                       every: int = 1, batch_size: int | None = None, max_frames: int | None = None,
                       stop_event: threading.Event | None = None) -> Iterator[dict[str, Any]]:
    """Yield one prediction per sampled frame: ``{"frame", "pos_ms", "label", "probability", "calibrated",
    "unknown", "novelty", "drift", "drifted", "head_version", "time"}`` (``frame`` counts from 0 in the source).

    ``every``: classify frames 0, every, 2·every, …; ``max_frames``: stop after that many predictions;
    ``stop_event``: stop after the batch in progress. Batches: ``batch_size`` (default: the runtime's for a video
    file, 1 for a camera)."""
    if every < 1:
        raise DataError(f"--every must be at least 1, found {every}")
    cv2 = _cv2()
    cap = open_capture(camera, video)
    live = runtime.predictor()
    live.refresh()
    size = batch_size or (runtime.batch_size if video is not None else 1)
    emitted, index = 0, -1
    pending: list[tuple[int, float, np.ndarray]] = []
    try:
        while stop_event is None or not stop_event.is_set():
            if max_frames is not None and emitted + len(pending) >= max_frames:
                break
            if not cap.grab():
                break
            index += 1
            if index % every:
                continue
            ok, frame = cap.retrieve()
            if not ok or frame is None:
                break
            pos_ms = float(cap.get(cv2.CAP_PROP_POS_MSEC))
            rgb = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB if frame.ndim == 2 else cv2.COLOR_BGR2RGB)
            pending.append((index, pos_ms, rgb))
            if len(pending) >= size:
                yield from _flush(runtime, live, pending)
                emitted += len(pending)
                pending = []
        if pending:
            yield from _flush(runtime, live, pending)
    finally:
        cap.release()


def _flush(runtime: DeviceRuntime, live: Predictor, pending: list[tuple[int, float, np.ndarray]]
           ) -> Iterator[dict[str, Any]]:
    predictions = live.classify(runtime.embed_images([f for _, _, f in pending]))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for (index, pos_ms, _), prediction in zip(pending, predictions):
        yield {"frame": index, "pos_ms": round(pos_ms, 3)} | prediction.as_record() | {"time": stamp}


__all__ = ["open_capture", "stream_predictions"]
