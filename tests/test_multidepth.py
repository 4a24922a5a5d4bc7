"""Multi-depth features (Head2Toe-style): export --features multi, DepthHead selection, device train --features."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.device import DeviceRuntime
from edgetl.errors import BundleError, DataError
from edgetl.heads import DepthHead, load_head
from tests.conftest import HAS_TORCH, SMALL


def _grouped_data(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """A 'last' group of 64 uninformative features and a small 8-feature group that carries the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    last = rng.standard_normal((n, 64))
    early = rng.standard_normal((n, 8)) * 0.5
    early[:, 0] += 2.0 * y
    early[:, 1] -= 1.5 * y
    return np.hstack([last, early]).astype(np.float32), y, [[0, 64], [64, 8]]


def test_depth_head_selects_the_informative_group(tmp_path: Path) -> None:
    X, y, groups = _grouped_data(0)
    Xt, yt, _ = _grouped_data(1)
    last = DepthHead(groups=groups[:1], normalise=False, keep=0).fit(X, y)
    multi = DepthHead(groups=groups, keep=16).fit(X, y)
    assert len(multi.columns_) == 16 and {64, 65} <= set(multi.columns_.tolist())
    assert (multi.predict(Xt) == yt).mean() > 0.9 > (last.predict(Xt) == yt).mean() + 0.3
    multi.save(tmp_path / "h.npz")
    again = load_head(tmp_path / "h.npz")
    np.testing.assert_allclose(again.decision_function(Xt), multi.decision_function(Xt), rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="feature groups"):
        DepthHead(groups=[[60, 64]]).fit(X, y)
    with pytest.raises(DataError, match="expected embeddings with 72 features"):
        multi.predict(Xt[:, :64])


@pytest.mark.parametrize("inner", ["ncm", "knn", "imprint"])
def test_depth_head_wraps_every_head(inner: str) -> None:
    X, y, groups = _grouped_data(2)
    Xt, yt, _ = _grouped_data(3)
    head = DepthHead(inner=inner, groups=groups).fit(X, y)
    assert (head.predict(Xt) == yt).mean() > 0.6
    assert head.predict_proba(Xt).shape == (len(Xt), 3)


@pytest.fixture(scope="module")
def _multi_bundle(tmp_path_factory: pytest.TempPathFactory, demo_train: Path) -> Path:
    if not HAS_TORCH:
        pytest.skip("needs the host extra (torch) to export a bundle")
    from edgetl.host.export import export

    out = tmp_path_factory.mktemp("multi") / "mnv2-multi"
    return export(out, demo_train, model="mobilenet_v2", image_size=SMALL, calib_size=20, eval_size=60,
                  features="multi", precisions=("fp32", "int8"), max_drop=5.0,  # 60 held-out images: 1 = 1.7 pts
                  min_agreement=0.9)  # 64 px, as the other small fixtures; full-size fidelity: tools/measure_int8.py


@pytest.mark.host
def test_export_multi_describes_groups_and_gates_each(_multi_bundle: Path) -> None:
    manifest = json.loads((_multi_bundle / "manifest.json").read_text())
    groups = manifest["feature_groups"]
    assert [g["size"] for g in groups] == [1280, 16, 24, 32, 64, 96, 160, 320]
    assert manifest["feature_dim"] == 1992
    int8 = [e for e in manifest["extractors"] if e["precision"] == "int8"][0]
    assert set(int8["report"]["group_drop_points"]) == {g["name"] for g in groups}  # every group measured
    fp32 = [e for e in manifest["extractors"] if e["precision"] == "fp32"][0]
    assert fp32["report"]["max_abs_diff"] < 1e-3  # every output matches PyTorch


@pytest.mark.host
def test_device_train_last_multi_auto(_multi_bundle: Path, demo_train: Path, demo_test: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(_multi_bundle, tmp_path / "b"))
    rt = DeviceRuntime(bundle, precision="fp32")
    last = rt.train(demo_train, features="last", force=True)
    acc_last = rt.evaluate(demo_test)["accuracy"]
    multi = rt.train(demo_train, features="multi", force=True)
    acc_multi = rt.evaluate(demo_test)["accuracy"]
    assert last.features["features"] == "last" and multi.features["features"] == "multi"
    head = load_head(rt.state.head_file(multi.version))
    assert isinstance(head, DepthHead) and len(head.columns_) == 1280 and head.columns_.max() >= 1280
    assert acc_last > 0.6 and acc_multi > 0.6
    res = CliRunner().invoke(main, ["device", "train", str(bundle), "--data", str(demo_train), "--features", "auto",
                                    "--precision", "fp32", "--quiet", "--force"])
    assert res.exit_code == 0, res.stderr
    assert "features: " in res.stdout and "held-out accuracy" in res.stdout
    # adding a class refits the same kind of head on the same features
    kept = rt.state.meta(rt.current_version())
    rt.rename_class("coat", "jacket")
    rt.remove_class("bag")
    assert rt.state.meta(rt.current_version())["head_params"] == kept["head_params"]
    pred = rt.predict(sorted((demo_test / "coat").glob("*.png"))[:3])
    assert all(p["label"] not in ("bag", "coat") for p in pred)


def test_multi_on_a_last_layer_bundle_is_refused(bundle: Path, demo_train: Path) -> None:
    with pytest.raises(DataError, match="--features multi"):
        DeviceRuntime(bundle).train(demo_train, features="multi")


@pytest.mark.host
def test_malformed_feature_groups_are_refused(_multi_bundle: Path, tmp_path: Path) -> None:
    from edgetl.bundle import Bundle

    bundle = Path(shutil.copytree(_multi_bundle, tmp_path / "b"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["feature_groups"][1]["offset"] += 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="feature_groups"):
        Bundle.load(bundle, verify=False)


@pytest.mark.host
def test_exported_onnx_graphs_hold_standard_ops_only(_multi_bundle: Path) -> None:
    """GPU providers (CUDA, TensorRT) refuse ONNX Runtime's CPU-only fused ops: every shipped graph stays standard."""
    import onnx

    for path in sorted(_multi_bundle.glob("*.onnx")):
        domains = {n.domain for n in onnx.load(str(path)).graph.node}
        assert domains <= {"", "ai.onnx"}, (path.name, domains)
