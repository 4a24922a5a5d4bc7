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


def _anisotropic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes on the unit sphere's neighbourhood in 64-d, spread along a few directions only."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(0)
    means = base.normal(0, 1, (3, 64)) + 8 * np.eye(64)[0]  # all classes share a dominant direction
    spread = base.normal(0, 1, (4, 64))  # the within-class variation lives in a 4-d subspace
    X = np.concatenate([m + rng.normal(0, 1.5, (n, 4)) @ spread + rng.normal(0, 0.05, (n, 64)) for m in means])
    return X.astype(np.float32), np.repeat(np.arange(3), n)


def test_mahalanobis_flags_a_class_off_the_known_spread() -> None:
    X, y = _anisotropic(200, 1)
    held, _ = _anisotropic(100, 2)
    model = Novelty.fit(X, y, held)
    rng = np.random.default_rng(3)
    # an unseen class: as close to a known mean as the known samples are, but off their spread
    base = np.random.default_rng(0)
    mean = base.normal(0, 1, (3, 64))[0] + 8 * np.eye(64)[0]
    unseen = (mean + rng.normal(0, 0.25, (200, 64))).astype(np.float32)
    assert model.kind == "mahalanobis"
    assert (model.score(unseen) > model.threshold).mean() > 0.9
    assert abs((model.score(held) > model.threshold).mean() - 0.05) < 0.03


def test_threshold_without_held_out_data_is_cross_fitted() -> None:
    X, y = _anisotropic(150, 4)
    held, _ = _anisotropic(150, 5)
    for model in (Novelty.fit(X, y, X), Novelty.fit(X, y, np.empty((0, 64), np.float32))):
        rate = (model.score(held) > model.threshold).mean()  # in-sample scores would flag far more than 5 %
        assert rate < 0.15, rate


def test_save_load_roundtrip_and_legacy_cosine_file(tmp_path: Path) -> None:
    X, y = _anisotropic(50, 6)
    model = Novelty.fit(X, y, X[::3])
    model.save(tmp_path / "n.npz")
    again = Novelty.load(tmp_path / "n.npz")
    np.testing.assert_array_equal(again.score(X), model.score(X))
    assert again.threshold == pytest.approx(model.threshold)
    # a file written by the earlier cosine-to-centred-class-mean score still loads and scores the same way
    centre = X.mean(axis=0)
    protos = np.stack([X[y == c].mean(axis=0) - centre for c in range(3)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    np.savez(tmp_path / "old.npz", centre=centre, prototypes=protos, threshold=np.float32(0.3))
    old = Novelty.load(tmp_path / "old.npz")
    assert old.kind == "cosine" and old.threshold == pytest.approx(0.3)
    Zc = (X - centre) / np.linalg.norm(X - centre, axis=1, keepdims=True)
    np.testing.assert_allclose(old.score(X), 1 - (Zc @ protos.T).max(axis=1), atol=1e-5)
    np.savez(tmp_path / "bad.npz", kind=np.array("mahalanobis"), threshold=np.float32(1.0), means=X[:3])
    with pytest.raises(KeyError):
        Novelty.load(tmp_path / "bad.npz")
