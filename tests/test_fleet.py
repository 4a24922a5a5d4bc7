"""Head-only federated learning (edgetl.fleet) on Flower: real MobileNetV2 embeddings of Fashion-MNIST images held by
four devices with different class splits, plus one device whose extractor differs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_folder

pytestmark = pytest.mark.fleet
flwr = pytest.importorskip("flwr")
pytest.importorskip("ray")

from edgetl.datasets.fashion_mnist import CLASSES
from edgetl.device import DeviceRuntime
from edgetl.errors import BundleError, DataError
from edgetl.fleet import core
from edgetl.fleet.app import FleetConfig
from edgetl.heads import NCMHead, SoftmaxHead, load_head
from edgetl.heads.prototype import ScaleSearch

#: four devices, each knowing six of the ten classes (different sixes), each holding its own half of the images
SPLITS = [CLASSES[0:6], CLASSES[3:9], CLASSES[0:3] + CLASSES[7:10], CLASSES[4:10]]


def _rogue(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` whose extractor file differs (re-exported: same graph, other doc string → other sha256)."""
    import onnx

    rogue = Path(shutil.copytree(bundle, out))
    model = onnx.load(rogue / "extractor.onnx")
    model.doc_string = "re-exported elsewhere"
    onnx.save(model, rogue / "extractor.onnx")
    manifest = json.loads((rogue / "manifest.json").read_text())
    data = (rogue / "extractor.onnx").read_bytes()
    manifest["files"]["extractor.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (rogue / "manifest.json").write_text(json.dumps(manifest))
    return rogue


@pytest.fixture(scope="module")
def fleet(_pretrained_bundle: Path, demo_train: Path, demo_test: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> dict:
    root = tmp_path_factory.mktemp("fleet")
    devices = []
    for k, classes in enumerate(SPLITS):
        bundle = Path(shutil.copytree(_pretrained_bundle, root / f"device{k}"))
        folder = make_folder(root / f"data{k}", {c: 30 for c in classes}, demo_train)
        for c in classes:  # devices sharing a class hold different images of it
            for p in sorted((folder / c).glob("*.png"))[k % 2::2]:
                p.unlink()
        DeviceRuntime(bundle).train(folder, head="ncm")
        devices.append(bundle)
    rogue = _rogue(_pretrained_bundle, root / "rogue")
    DeviceRuntime(rogue).train(make_folder(root / "data-rogue", {"bag": 10, "coat": 10}, demo_train), head="ncm")
    from edgetl.data import scan_image_folder
    from edgetl.fleet.app import local_data

    runtime = DeviceRuntime(devices[0])
    test = scan_image_folder(demo_test)
    X_test = runtime.embed_paths(test.paths, cache=False)[0]
    data = [local_data(DeviceRuntime(b)) for b in devices]
    union = sorted(CLASSES)
    X = np.concatenate([d.X for d in data])
    y = np.concatenate([d.to_union(union) for d in data])
    y_test = np.array([union.index(test.classes[i]) for i in test.labels])
    return {"devices": devices, "rogue": rogue, "sha": runtime.extractor_sha256, "X": X, "y": y, "union": union,
            "X_test": X_test, "y_test": y_test, "root": root}


def _simulate(fleet: dict, head: str, out: Path, **kw: object):  # type: ignore[no-untyped-def]
    from edgetl.fleet.app import FleetConfig, simulate

    cfg = FleetConfig(extractor_sha256=fleet["sha"], out=str(out), head=head, min_clients=4, **kw)  # type: ignore[arg-type]
    return simulate([*fleet["devices"], fleet["rogue"]], cfg)


def test_federated_ncm_equals_central_and_devices_adopt_it(fleet: dict, tmp_path: Path) -> None:
    pythonpath = os.environ.get("PYTHONPATH")
    result = _simulate(fleet, "ncm", tmp_path / "out", adopt=True)
    assert os.environ.get("PYTHONPATH") == pythonpath  # Ray's PYTHONPATH must not leak into later subprocesses
    assert len(result.accepted) == 4
    assert len(result.rejected) == 1 and "differs from the fleet's" in next(iter(result.rejected.values()))
    assert result.classes == fleet["union"]  # label-space union: no device knows all ten classes
    fed = load_head(tmp_path / "out" / "head.npz")
    central = NCMHead().fit(fleet["X"], fleet["y"])
    assert isinstance(fed, NCMHead)
    np.testing.assert_array_equal(fed.counts_, central.counts_)
    np.testing.assert_allclose(fed.centre_, central.centre_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fed.sums_, central.sums_, rtol=1e-4, atol=1e-4)
    assert float(fed.scale_) == pytest.approx(float(central.scale_), rel=1e-4)
    np.testing.assert_allclose(fed.decision_function(fleet["X_test"]), central.decision_function(fleet["X_test"]),
                               atol=1e-3)
    # only sums and counts travelled: (10 x 1280) float64 + 10 counts, far less than one device's embeddings
    assert 3 <= result.rounds <= 31  # sums, then a few Newton steps of the scale
    n_local = len(fleet["y"]) // 4
    assert max(result.bytes_up[0].values()) < 11 * 1280 * 8 + 2000 < n_local * 1280 * 4
    # every device passed the head through its gate: a new current version with the fleet's ten classes
    for bundle in fleet["devices"]:
        head, labels, version = DeviceRuntime(bundle).load_current_head()
        assert labels == fleet["union"] and version == "v0002"
        np.testing.assert_allclose(head.decision_function(fleet["X_test"]), fed.decision_function(fleet["X_test"]))
    head, labels, version = DeviceRuntime(fleet["rogue"]).load_current_head()
    assert version == "v0001" and labels == ["bag", "coat"]
    record = json.loads((tmp_path / "out" / "fleet.json").read_text())
    assert record["head_sha256"] == hashlib.sha256((tmp_path / "out" / "head.npz").read_bytes()).hexdigest()


def test_federated_lbfgs_softmax_equals_central(fleet: dict, tmp_path: Path) -> None:
    result = _simulate(fleet, "softmax", tmp_path / "out", strategy="lbfgs")
    fed = load_head(tmp_path / "out" / "head.npz")
    central = SoftmaxHead(l2=FleetConfig.l2).fit(fleet["X"], fleet["y"])  # the fleet's objective, fitted centrally
    assert 2 <= result.rounds <= 60 and len(result.rejected) == 1
    agree = float((fed.predict(fleet["X_test"]) == central.predict(fleet["X_test"])).mean())
    acc_fed = float((fed.predict(fleet["X_test"]) == fleet["y_test"]).mean())
    acc_central = float((central.predict(fleet["X_test"]) == fleet["y_test"]).mean())
    assert agree >= 0.99 and abs(acc_fed - acc_central) <= 0.01 + 1e-9, (agree, acc_fed, acc_central)
    # same optimiser, same start: both stop within L-BFGS's tolerance of the same optimum (summation order differs)
    gap = np.abs(fed.predict_proba(fleet["X_test"]) - central.predict_proba(fleet["X_test"]))
    assert float(gap.mean()) < 0.01, float(gap.mean())


@pytest.mark.slow  # 60 Flower rounds: ~40 s on 2 busy cores
def test_federated_softmax_within_two_points_of_central(fleet: dict, tmp_path: Path) -> None:
    result = _simulate(fleet, "softmax", tmp_path / "out", rounds=60)
    assert result.rounds == 60 and len(result.rejected) == 1
    fed = load_head(tmp_path / "out" / "head.npz")
    central = SoftmaxHead(l2=FleetConfig.l2).fit(fleet["X"], fleet["y"])
    acc_fed = float((fed.predict(fleet["X_test"]) == fleet["y_test"]).mean())
    acc_central = float((central.predict(fleet["X_test"]) == fleet["y_test"]).mean())
    assert acc_fed >= acc_central - 0.02, (acc_fed, acc_central)
    # each device sends its head (10 x 1280 + 10 float32) per round, nothing else of size
    for per_round in result.bytes_up:
        assert set(per_round.values()) and max(per_round.values()) < (10 * 1280 + 10) * 4 + 500


# ------------------------------------------------------------------------------------------------ no Flower needed
def test_exact_ncm_aggregation_and_balanced_weights_match_the_heads() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 16)).astype(np.float32) + np.repeat(np.eye(3, 16) * 4, 100, axis=0)
    y = np.repeat(np.arange(3), 100)
    names = ["a", "b", "c"]
    parts = [core.LocalData(X[:120], y[:120], names), core.LocalData(X[120:], y[120:] - 1, ["b", "c"])]
    stats = core.merge_stats([core.local_stats(p) for p in parts])
    assert stats.classes == names and stats.counts.tolist() == [100, 100, 100]
    central = NCMHead().fit(X, y)
    sums = sum(core.local_ncm_sums(p, names, stats.mean)[0] for p in parts)
    np.testing.assert_allclose(sums, central.sums_, rtol=1e-5, atol=1e-5)
    head = NCMHead.from_sums(stats.mean, sums, central.counts_, 1.0)
    search = ScaleSearch()
    while not search.done:
        search.update(sum(core.local_scale_moments(p, names, head, search.scale) for p in parts))
    assert search.scale == pytest.approx(float(central.scale_), rel=1e-4)
    # class weights of the global balanced objective sum to one over the samples
    w = core.class_weights(np.array([10, 30, 0]))
    assert w[2] == 0 and (w[:2] * [10, 30]).sum() == pytest.approx(1.0)
    with pytest.raises(DataError):
        core.merge_stats([core.local_stats(core.LocalData(X[:5], np.zeros(5, np.int64), ["a"]))])


@pytest.fixture()
def device(bundle: Path, demo_train: Path, tmp_path: Path) -> Path:
    """A device with a softmax head trained on three classes."""
    folder = make_folder(tmp_path / "local", {c: 20 for c in ("bag", "sandal", "trouser")}, demo_train)
    DeviceRuntime(bundle).train(folder)
    return bundle


def test_adopt_head_checks_extractor_labels_and_gate(device: Path, tmp_path: Path) -> None:
    runtime = DeviceRuntime(device)
    _, classes, version = runtime.load_current_head()
    X, _, y, _ = runtime.training_set()
    good = NCMHead().fit(X, y)
    good.save(tmp_path / "good.npz")
    with pytest.raises(BundleError, match="install the fleet's bundle"):
        runtime.adopt_head(tmp_path / "good.npz", classes, extractor_sha256="0" * 64)
    with pytest.raises(DataError, match="labels"):
        runtime.adopt_head(tmp_path / "good.npz", classes[:-1])
    # a head that is badly wrong for this device's classes is kept as a candidate by the gate
    bad = NCMHead().fit(X, (y + 1) % len(classes))
    bad.save(tmp_path / "bad.npz")
    report = runtime.adopt_head(tmp_path / "bad.npz", classes, extractor_sha256=runtime.extractor_sha256)
    assert not report.promoted and "candidate" in report.reason
    assert runtime.current_version() == version
    report = runtime.adopt_head(tmp_path / "good.npz", classes)
    assert report.promoted and runtime.current_version() == report.version


def test_cli_server_app_and_client_dry_run(fleet: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from flwr.common.config import validate_fields_in_config

    from edgetl.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["fleet", "server", "--bundle", str(fleet["devices"][0]), "--out", str(tmp_path / "o"),
                               "--app-dir", str(tmp_path / "app"), "--head", "softmax"])
    assert res.exit_code == 0, res.output
    config = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    ok, errors, _ = validate_fields_in_config(config)
    assert ok, errors
    assert config["tool"]["flwr"]["app"]["config"]["extractor-sha256"] == fleet["sha"]
    from edgetl.fleet.app import FleetConfig

    assert FleetConfig.from_run_config(config["tool"]["flwr"]["app"]["config"]).head == "softmax"
    res = runner.invoke(main, ["fleet", "client", str(fleet["devices"][0]), "--superlink", "127.0.0.1:9092",
                               "--insecure", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "flower-supernode" in res.output and "bundle=" in res.output
    empty = Path(shutil.copytree(fleet["devices"][0], tmp_path / "fresh", ignore=shutil.ignore_patterns("state")))
    res = runner.invoke(main, ["fleet", "client", str(empty), "--superlink", "x:1", "--dry-run"])
    assert res.exit_code == 1 and "train" in res.output


def test_cli_adopt_verifies_the_head_file(device: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgetl.cli import main
    from edgetl.fleet import app

    bundle = device
    runtime = DeviceRuntime(bundle)
    X, _, y, classes = runtime.training_set()
    out = tmp_path / "fleet-head"
    out.mkdir()
    NCMHead().fit(X, y).save(out / "head.npz")
    (out / "labels.json").write_text(json.dumps(classes))
    sha = hashlib.sha256((out / "head.npz").read_bytes()).hexdigest()
    (out / "fleet.json").write_text(json.dumps({"extractor_sha256": runtime.extractor_sha256, "head_sha256": sha}))
    assert app.read_result(out)["head_sha256"] == sha
    res = CliRunner().invoke(main, ["fleet", "adopt", str(bundle), "--head", str(out)])
    assert res.exit_code == 0 and "promoted" in res.output, res.output
    (out / "head.npz").write_bytes((out / "head.npz").read_bytes()[:-10] + b"0" * 10)
    res = CliRunner().invoke(main, ["fleet", "adopt", str(bundle), "--head", str(out)])
    assert res.exit_code == 1 and "sha256" in res.output
