"""Device side on a real exported bundle: verification, training, prediction, state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgetl.bundle import Bundle
from edgetl.device import DeviceRuntime
from edgetl.errors import BundleError, DataError, NotFittedError
from tests.conftest import make_folder


def test_bundle_manifest(bundle: Path) -> None:
    b = Bundle.load(bundle)
    assert b.manifest.schema_version == 1 and b.feature_dim == 1280
    entry = b.extractor("onnx", "fp32")
    assert b.manifest.files[entry.file].sha256 == b.sha256(entry.file)
    assert b.manifest.validation["max_abs_diff"] < 1e-3
    assert b.manifest.extractors[0].report["passed"]
    assert b.preprocessing.input_size == 64


def test_golden_vectors_pass(bundle: Path) -> None:
    assert DeviceRuntime(bundle).verify()["golden"] == "ok"


def test_tampered_extractor_is_refused(bundle: Path) -> None:
    data = bytearray((bundle / "extractor.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "extractor.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        DeviceRuntime(bundle)


def test_truncated_extractor_is_refused(bundle: Path) -> None:
    path = bundle / "extractor.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match="truncated"):
        DeviceRuntime(bundle)


def test_missing_or_corrupt_manifest(bundle: Path, tmp_path: Path) -> None:
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupt"):
        Bundle.load(bundle)
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(bundle)
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.load(tmp_path / "nowhere")


def test_newer_schema_is_refused(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="upgrade edgetl"):
        Bundle.load(bundle)


def test_manifest_cannot_point_outside(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside"):
        Bundle.load(bundle)


def test_no_head_yet(bundle: Path, demo_test: Path) -> None:
    with pytest.raises(NotFittedError, match="device train"):
        DeviceRuntime(bundle).predict([next(demo_test.glob("*/*.png"))])


def test_train_predict_evaluate_and_cache(bundle: Path, demo_train: Path, demo_test: Path) -> None:
    rt = DeviceRuntime(bundle)
    report = rt.train(demo_train, seed=0)
    assert report.version == "v0001" and report.cached == 0 and report.embedded == 300
    assert report.val_accuracy is not None and report.val_accuracy > 0.5
    result = rt.evaluate(demo_test)
    assert result["n"] == 100 and 0.5 < result["accuracy"] <= 1.0  # chance is 0.1
    again = DeviceRuntime(bundle).train(demo_train, seed=0)  # a new process would read the cache the same way
    assert again.version == "v0002" and again.cached == 300 and again.embedded == 0
    bag = sorted((demo_test / "bag").glob("*.png"))[:3]
    preds = rt.predict(bag, top_k=3)
    assert [len(p["top_k"]) for p in preds] == [3, 3, 3]
    assert all(p["head_version"] == "v0002" for p in preds)
    assert sum(p["label"] == "bag" for p in preds) >= 2
    assert (bundle / "state" / "current").read_text() == "v0002"


def test_cached_embeddings_equal_fresh_ones(bundle: Path, demo_test: Path) -> None:
    rt = DeviceRuntime(bundle)
    paths = sorted(demo_test.glob("coat/*.png"))[:4]
    fresh, cached = rt.embed_paths(paths)
    assert cached == 0
    again, cached = rt.embed_paths(paths)
    assert cached == 4
    np.testing.assert_allclose(again, fresh, rtol=2e-3, atol=2e-3)  # float16 on disk


def test_failed_training_keeps_current_head(bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    rt = DeviceRuntime(bundle)
    rt.train(demo_train)
    one_class = make_folder(tmp_path / "one", {"bag": 5}, demo_train)
    with pytest.raises(DataError, match="1 class"):
        rt.train(one_class)
    broken = make_folder(tmp_path / "broken", {"bag": 5, "coat": 5}, demo_train)
    (broken / "coat" / "zz.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="zz.png"):
        rt.train(broken)
    assert rt.current_version() == "v0001"
    assert not list((bundle / "state" / "heads").glob(".*"))


def test_evaluate_unknown_class(bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    rt = DeviceRuntime(bundle)
    rt.train(make_folder(tmp_path / "two", {"bag": 10, "coat": 10}, demo_train))
    with pytest.raises(DataError, match="does not know: sandal"):
        rt.evaluate(make_folder(tmp_path / "other", {"bag": 2, "sandal": 2}, demo_train))
