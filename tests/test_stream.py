"""`edgetl device stream`: a video made here from real demo images gives one prediction per sampled frame, and the
predictions agree with classifying the same images as files."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetl.device import DeviceRuntime

pytestmark = pytest.mark.stream
cv2 = pytest.importorskip("cv2", reason="needs the stream extra: pip install 'edgetl[stream]'")
if not hasattr(cv2, "VideoWriter"):  # a stray cv2.py on sys.path
    pytest.skip("the cv2 module found is not OpenCV", allow_module_level=True)

CLASSES = ["ankle_boot", "bag", "coat", "dress", "pullover", "sandal", "shirt", "sneaker", "t-shirt_top", "trouser"]
HOLD = 3  # frames per image
SIDE = 112


@pytest.fixture(scope="module")
def trained(_pretrained_bundle: Path, tmp_path_factory: pytest.TempPathFactory, demo_train: Path) -> Path:
    b = Path(shutil.copytree(_pretrained_bundle, tmp_path_factory.mktemp("stream") / "bundle"))
    DeviceRuntime(b).train(demo_train)
    return b


@pytest.fixture(scope="module")
def video(demo_test: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """An MJPEG .avi: two held-out demo images per class, each held for HOLD frames (upscaled to SIDE px)."""
    images = [p for c in CLASSES for p in sorted((demo_test / c).glob("*.png"))[:2]]
    path = tmp_path_factory.mktemp("video") / "demo.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (SIDE, SIDE))
    assert writer.isOpened()
    for p in images:
        frame = cv2.resize(cv2.imread(str(p), cv2.IMREAD_COLOR), (SIDE, SIDE), interpolation=cv2.INTER_LINEAR)
        for _ in range(HOLD):
            writer.write(frame)
    writer.release()
    return path, images


def test_one_prediction_per_sampled_frame(trained: Path, video: tuple[Path, list[Path]]) -> None:
    from edgetl.stream import stream_predictions

    path, images = video
    rt = DeviceRuntime(trained)
    rows = list(stream_predictions(rt, video=path, every=HOLD, batch_size=8))
    assert [r["frame"] for r in rows] == list(range(0, HOLD * len(images), HOLD))
    assert all(r["head_version"] == "v0001" and 0 < r["probability"] <= 1 for r in rows)
    assert np.all(np.diff([r["pos_ms"] for r in rows]) > 0)
    # each sampled frame shows one image: the stream agrees with classifying the image file
    from_files = [r["label"] for r in rt.predict(images)]
    agree = np.mean([r["label"] == f for r, f in zip(rows, from_files)])
    assert agree >= 0.8, agree
    truth = [p.parent.name for p in images]
    assert np.mean([r["label"] == t for r, t in zip(rows, truth)]) > 0.5

    every_frame = list(stream_predictions(rt, video=path, every=1, max_frames=7))
    assert [r["frame"] for r in every_frame] == list(range(7))


def test_cli_stream_writes_json_lines(trained: Path, video: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgetl.cli import main

    path, images = video
    out = tmp_path / "frames.jsonl"
    res = CliRunner().invoke(main, ["device", "stream", str(trained), "--video", str(path), "--every", "2",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    n_frames = HOLD * len(images)
    assert [r["frame"] for r in rows] == list(range(0, n_frames, 2))
    bad = CliRunner().invoke(main, ["device", "stream", str(trained), "--video", str(tmp_path / "none.avi")])
    assert bad.exit_code == 1 and "does not exist" in bad.output
    both = CliRunner().invoke(main, ["device", "stream", str(trained)])
    assert both.exit_code == 2


def test_missing_opencv_is_one_clear_error(trained: Path, video: tuple[Path, list[Path]],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from edgetl.errors import RuntimeMissingError
    from edgetl.stream import stream_predictions

    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(RuntimeMissingError, match=r"pip install 'edgetl\[stream\]'"):
        next(stream_predictions(DeviceRuntime(trained), video=video[0]))
