"""Calibrated confidence, unknown inputs and drift on real embeddings (thresholds from held-out local data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.device import DeviceRuntime
from edgetl.errors import NotFittedError
from edgetl.novelty import Novelty, fit_temperature
from tests.conftest import make_folder

FIVE = ("ankle_boot", "bag", "sandal", "sneaker", "trouser")


def test_temperature_recovers_a_known_scale() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, 5)) * 3
    y = np.array([rng.choice(5, p=np.exp(row / 2.0) / np.exp(row / 2.0).sum()) for row in logits])
    assert 1.6 < fit_temperature(logits, y) < 2.5  # the labels were drawn at temperature 2


def test_novelty_threshold_is_a_held_out_quantile() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 5, (3, 16))
    X = np.concatenate([c + rng.normal(0, 1, (100, 16)) for c in centres])
    y = np.repeat(np.arange(3), 100)
    held = np.concatenate([c + rng.normal(0, 1, (50, 16)) for c in centres])
    model = Novelty.fit(X, y, held)
    assert abs((model.score(held) > model.threshold).mean() - 0.05) < 0.02
    far = rng.normal(0, 5, (50, 16))
    assert (model.score(far) > model.threshold).mean() > 0.5


def test_unknown_classes_are_flagged_more_often(bundle: Path, demo_train: Path, demo_test: Path,
                                                tmp_path: Path) -> None:
    rt = DeviceRuntime(bundle)
    rt.train(make_folder(tmp_path / "five", {c: 30 for c in FIVE}, demo_train))
    known = [p for c in FIVE for p in sorted((demo_test / c).glob("*.png"))]
    unseen = [p for c in ("coat", "dress", "pullover", "shirt", "t-shirt_top")
              for p in sorted((demo_test / c).glob("*.png"))]
    k = rt.predict(known)
    u = rt.predict(unseen)
    assert all(0.0 <= r["probability"] <= 1.0 and r["calibrated"] for r in k)
    rate_known = np.mean([r["unknown"] for r in k])
    rate_unseen = np.mean([r["unknown"] for r in u])
    assert rate_unseen > rate_known + 0.2, (rate_known, rate_unseen)


def test_drift_photos_vs_same_domain(bundle: Path, demo_train: Path, demo_test: Path, tmp_path: Path) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    with pytest.raises(NotFittedError):
        DeviceRuntime(bundle).drift(demo_test)
    DeviceRuntime(bundle).train(demo_train)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "immunohistochemistry",
                 "moon", "clock", "page"):
        Image.fromarray(getattr(skimage_data, name)()).save(photos / f"{name}.png")  # shipped with scikit-image
    res = CliRunner().invoke(main, ["device", "drift", str(bundle), "--data", str(photos), "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["drifted"] is True
    same = DeviceRuntime(bundle).drift(demo_test)
    assert same["drifted"] is False and same["n"] == 100
