"""Classes at run time: add, remove, rename, incremental training and few-shot subsets, from the embedding store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.device import DeviceRuntime
from edgetl.errors import DataError
from tests.conftest import make_folder

FIVE = ("ankle_boot", "bag", "coat", "dress", "pullover")


def test_add_class_without_forgetting(bundle: Path, demo_train: Path, demo_test: Path, tmp_path: Path) -> None:
    rt = DeviceRuntime(bundle)
    rt.train(demo_train, head="ncm")
    all_at_once = rt.evaluate(demo_test)["accuracy"]

    import shutil

    b2 = Path(shutil.copytree(bundle, tmp_path / "b2"))
    shutil.rmtree(b2 / "state" / "heads")
    (b2 / "state" / "current").unlink()
    rt2 = DeviceRuntime(b2)
    rt2.train(make_folder(tmp_path / "five", {c: 30 for c in FIVE}, demo_train), head="ncm")
    runner = CliRunner()
    for name in sorted({p.name for p in demo_train.iterdir()} - set(FIVE)):
        res = runner.invoke(main, ["device", "add-class", str(b2), name, "--data", str(demo_train / name)])
        assert res.exit_code == 0, res.stderr
    stepwise = DeviceRuntime(b2).evaluate(demo_test)
    assert len(DeviceRuntime(b2).load_current_head()[1]) == 10
    assert abs(stepwise["accuracy"] - all_at_once) <= 0.02  # NCM from the same stored embeddings


def test_remove_and_rename(bundle: Path, demo_train: Path, demo_test: Path) -> None:
    rt = DeviceRuntime(bundle)
    rt.train(demo_train)
    removed = rt.remove_class("bag")
    assert "bag" not in removed.classes and len(removed.classes) == 9
    version = rt.rename_class("coat", "jacket")
    _, labels, current = rt.load_current_head()
    assert current == version and "jacket" in labels and "coat" not in labels
    res = CliRunner().invoke(main, ["device", "predict", str(bundle), str(next((demo_test / "coat").glob("*.png"))),
                                    "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["label"] in labels
    with pytest.raises(DataError, match="not in the current head"):
        rt.remove_class("bag")


def test_incremental_and_shots(bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    rt = DeviceRuntime(bundle)
    first = rt.train(demo_train, shots=5)
    assert first.n_train + first.n_val == 50
    more = make_folder(tmp_path / "more", {"bag": 30, "coat": 30}, demo_train)
    report = rt.train(more, incremental=True, force=True)
    info = rt.store_info()
    assert info["current_head_classes"]["bag"] == 30 and info["current_head_classes"]["dress"] == 5
    assert report.cached == 10  # the 5-shot bag and coat images were embedded before
    res = CliRunner().invoke(main, ["device", "store", str(bundle), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["files"][0]["in_use"]


def test_add_class_errors(bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    rt = DeviceRuntime(bundle)
    with pytest.raises(Exception, match="no head trained"):
        rt.add_class("x", demo_train / "bag")
    rt.train(demo_train)
    with pytest.raises(DataError, match="exists already"):
        rt.add_class("bag", demo_train / "bag")
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["device", "add-class", str(bundle), "new", "--data", str(tmp_path / "empty")])
    assert res.exit_code == 1 and "holds no images" in res.stderr
