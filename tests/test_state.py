"""Versioned device state: promote gate, history, rollback, audit log, writer lock, write failures, kill -9."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.bundle import Bundle
from edgetl.cli import main
from edgetl.device import DeviceRuntime
from edgetl.errors import StateError
from tests.conftest import make_folder


def mislabelled(src: Path, dst: Path) -> Path:
    """The same images with every class folder renamed to the next class: a head trained on it is wrong."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    for i, name in enumerate(classes):
        shutil.copytree(src / name, dst / classes[(i + 1) % len(classes)])
    return dst


def test_gate_keeps_a_worse_head_as_candidate(bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    rt = DeviceRuntime(bundle)
    first = rt.train(demo_train)
    assert first.promoted and rt.current_version() == "v0001"
    bad = rt.train(mislabelled(demo_train, tmp_path / "bad"))
    assert not bad.promoted and "kept as a candidate" in bad.reason
    assert rt.current_version() == "v0001"
    statuses = {r["version"]: r["status"] for r in rt.history()}
    assert statuses == {"v0001": "current", "v0002": "candidate"}
    forced = rt.train(tmp_path / "bad", force=True)
    assert forced.promoted and rt.current_version() == "v0003"
    assert rt.rollback() == "v0001" and rt.current_version() == "v0001"
    assert rt.rollback(to="v0003") == "v0003"
    actions = [e["action"] for e in rt.state.audit()]
    assert actions == ["promote", "candidate", "promote", "rollback", "rollback"]


def test_gate_compares_on_images_the_current_head_never_saw(bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    rt = DeviceRuntime(bundle)
    classes = ("bag", "coat", "sandal", "trouser", "dress", "sneaker")
    rt.train(make_folder(tmp_path / "a", {c: 10 for c in classes}, demo_train))
    report = rt.train(make_folder(tmp_path / "b", {c: 30 for c in classes}, demo_train))
    assert "neither head trained on" in report.reason


def test_history_and_rollback_cli(bundle: Path, demo_train: Path) -> None:
    runner = CliRunner()
    for _ in range(2):
        assert runner.invoke(main, ["device", "train", str(bundle), "--data", str(demo_train), "--quiet"]).exit_code == 0
    res = runner.invoke(main, ["device", "history", str(bundle), "--json"])
    rows = json.loads(res.stdout)
    assert [r["version"] for r in rows] == ["v0001", "v0002"] and rows[1]["status"] == "current"
    res = runner.invoke(main, ["device", "rollback", str(bundle)])
    assert res.exit_code == 0 and "v0001" in res.stdout
    res = runner.invoke(main, ["device", "rollback", str(bundle), "--to", "v0042"])
    assert res.exit_code == 1 and "does not exist" in res.stderr


def test_rollback_with_nothing_earlier(bundle: Path) -> None:
    with pytest.raises(StateError, match="no earlier head"):
        DeviceRuntime(bundle).rollback()


def test_second_trainer_fails_clearly_and_readers_go_on(bundle: Path, demo_train: Path, demo_test: Path) -> None:
    rt = DeviceRuntime(bundle)
    rt.train(demo_train)
    with rt.state.writer():
        res = CliRunner().invoke(main, ["device", "train", str(bundle), "--data", str(demo_train), "--quiet"])
        assert res.exit_code == 1 and "another trainer" in res.stderr
        assert rt.predict([next(demo_test.glob("*/*.png"))])[0]["head_version"] == "v0001"
    with pytest.raises(StateError, match="another trainer"), rt.state.writer(), \
            DeviceRuntime(bundle).state.writer(timeout=0.2):
        pass


def test_full_disk_keeps_the_previous_head(bundle: Path, demo_train: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgetl.state

    rt = DeviceRuntime(bundle)
    rt.train(demo_train)

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(edgetl.state, "atomic_write", no_space)
    with pytest.raises(StateError, match="disk is full.*previous head stays current"):
        rt.train(demo_train)
    assert rt.current_version() == "v0001" and rt.state.versions() == ["v0001"]


def test_a_reader_started_during_train_never_wipes_the_store(bundle: Path, demo_train: Path, demo_test: Path,
                                                              tmp_path: Path) -> None:
    """The field bug: `device drift` opened the store, `device train` saved its embeddings and a new head, then drift
    saved its stale copy — the new head's training embeddings were gone and every later --incremental, add-class,
    remove-class and field-learning run failed. The store now merges, so the reader adds its rows and loses none."""
    first = make_folder(tmp_path / "a", {"bag": 8, "coat": 8, "dress": 8}, demo_train)
    later = make_folder(tmp_path / "b", {"bag": 8, "sandal": 8}, demo_train)  # 8 new sandal images
    DeviceRuntime(bundle).train(first)
    reader, writer = DeviceRuntime(bundle), DeviceRuntime(bundle)
    embed = reader.embedder.embed_items
    trained = []

    def train_meanwhile(items: list) -> object:  # drift is embedding (its store is open) when train runs to the end
        if not trained:
            trained.append(writer.train(later, incremental=True, force=True))
        return embed(items)

    reader.embedder.embed_items = train_meanwhile  # type: ignore[method-assign]
    reader.drift(demo_test / "shirt")
    assert trained and trained[0].version == "v0002"
    rt = DeviceRuntime(bundle)
    stored = rt.training_set()  # every training embedding of the new head is still stored
    assert len(stored.keys) == 32 and "sandal" in stored.classes  # the 8 bag images are the same ones
    assert rt.add_class("trouser", demo_train / "trouser").version == "v0003"
    assert rt.store_info()["files"][0]["embeddings"] >= 32 + 30 + len(list((demo_test / "shirt").glob("*.png")))


def _kill_trials(bundle: Path, data: Path, trials: int, seed: int) -> list[str]:
    """Start `device train`, kill -9 it at a random moment, check the state; returns the versions seen."""
    rng = random.Random(seed)
    DeviceRuntime(bundle).train(data)  # v0001 exists; embeddings are cached, so kills land in fitting and writing
    seen = []
    for _ in range(trials):
        before = DeviceRuntime(bundle).current_version()
        proc = subprocess.Popen([sys.executable, "-m", "edgetl.cli", "device", "train", str(bundle), "--data", str(data),
                                 "--quiet", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 2.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        Bundle.load(bundle)  # the signed part is untouched
        rt = DeviceRuntime(bundle)
        now = rt.current_version()
        versions = rt.state.versions()
        assert now == before or now == versions[-1], (before, now, versions)
        head, labels, _ = rt.load_current_head()  # complete and loadable, never a mix
        assert len(labels) == 10 and head.coef_.shape == (10, 1280)
        for v in versions:
            assert (bundle / "state" / "heads" / v / "meta.json").is_file()
        seen.append(now or "")
    return seen


def test_kill_minus_9_during_training(bundle: Path, demo_train: Path) -> None:
    _kill_trials(bundle, demo_train, trials=3, seed=1)


@pytest.mark.slow
def test_kill_minus_9_during_training_30_trials(bundle: Path, demo_train: Path) -> None:
    seen = _kill_trials(bundle, demo_train, trials=30, seed=2)
    assert len(set(seen)) > 1  # some kills landed after a promotion, some before
