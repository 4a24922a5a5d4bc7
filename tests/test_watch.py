"""`edgetl device watch`: complete files only, one line per image, bad files set aside, exactly once across restarts
(kill -9 included), SIGTERM exits 0, field learning through the promote gate. Real MobileNetV2 bundle, real images."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgetl.device import DeviceRuntime
from edgetl.watch import InboxWatcher, Journal
from tests.conftest import make_folder

CLASSES = ["ankle_boot", "bag", "coat", "dress", "pullover", "sandal", "shirt", "sneaker", "t-shirt_top", "trouser"]


@pytest.fixture(scope="module")
def _trained(_pretrained_bundle: Path, tmp_path_factory: pytest.TempPathFactory, demo_train: Path) -> Path:
    """The pretrained bundle with a head trained on the device on the demo training images (all 10 classes)."""
    b = Path(shutil.copytree(_pretrained_bundle, tmp_path_factory.mktemp("watch") / "bundle"))
    DeviceRuntime(b).train(demo_train)
    return b


@pytest.fixture()
def trained(_trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(_trained, tmp_path / "bundle"))


def fill(inbox: Path, demo_test: Path, per_class: int, sub: str = "") -> dict[str, str]:
    """Copy ``per_class`` demo test images of each class into the inbox; returns {relative name: true class}."""
    truth = {}
    (inbox / sub).mkdir(parents=True, exist_ok=True)
    for c in CLASSES:
        for p in sorted((demo_test / c).glob("*.png"))[:per_class]:
            rel = f"{sub}/{c}-{p.name}" if sub else f"{c}-{p.name}"
            shutil.copy(p, inbox / rel)
            truth[rel] = c
    return truth


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_complete_image_once_bad_ones_aside(trained: Path, demo_test: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    truth = fill(inbox, demo_test, 3) | fill(inbox, demo_test, 1, sub="pass2")
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (inbox / "empty.jpg").write_bytes(b"")
    shutil.copy(next(iter((demo_test / "bag").glob("*.png"))), inbox / "arriving.png.part")
    shutil.copy(next(iter((demo_test / "bag").glob("*.png"))), inbox / ".hidden.png")
    (inbox / "notes.txt").write_text("not an image")
    rt = DeviceRuntime(trained)
    with InboxWatcher(rt, inbox, settle=0, batch_size=8) as w:
        assert w.process_once() == len(truth) + 2
        assert w.process_once() == 0  # nothing twice
    records = lines(inbox / "_watch" / "results.jsonl")
    ok = {r["file"]: r for r in records if r["status"] == "ok"}
    assert set(ok) == set(truth)
    assert all(r["head_version"] == "v0001" and 0 < r["probability"] <= 1 and r["calibrated"] for r in ok.values())
    assert all(isinstance(r["unknown"], bool) and r["novelty"] >= 0 and r["drift"] >= 0 for r in ok.values())
    accuracy = sum(ok[f]["label"] == c for f, c in truth.items()) / len(truth)
    assert accuracy > 0.6, accuracy  # held-out demo images, 64 px extractor
    failed = {r["file"]: r for r in records if r["status"] == "failed"}
    assert set(failed) == {"broken.png", "empty.jpg"}
    for name in failed:
        assert not (inbox / name).exists() and (inbox / "_failed" / name).is_file()
        assert name in (inbox / "_failed" / f"{name}.reason").read_text()
    assert (inbox / "arriving.png.part").exists() and (inbox / ".hidden.png").exists()  # ignored, untouched


def test_only_settled_files_are_read(trained: Path, demo_test: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    image = next(iter((demo_test / "coat").glob("*.png"))).read_bytes()
    growing = inbox / "growing.png"
    growing.write_bytes(image[: len(image) // 2])  # a writer is still at work
    with InboxWatcher(DeviceRuntime(trained), inbox, settle=0.3) as w:
        assert w.process_once() == 0  # first sight
        time.sleep(0.35)
        with open(growing, "ab") as fh:
            fh.write(image[len(image) // 2:])
        assert w.process_once() == 0  # changed since the last poll: not settled
        time.sleep(0.35)
        assert w.process_once() == 1
    (record,) = lines(w.out)
    assert record["status"] == "ok" and record["size"] == len(image)


def test_move_done_and_a_move_interrupted_by_a_crash(trained: Path, demo_test: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from edgetl import watch

    inbox, done = tmp_path / "inbox", tmp_path / "inbox" / "done"
    truth = fill(inbox, demo_test, 2)
    rt = DeviceRuntime(trained)

    def crash(src: Path, dest: Path) -> None:
        raise OSError("simulated power cut between the journal write and the move")

    monkeypatch.setattr(watch, "_move", crash)
    with InboxWatcher(rt, inbox, move_done=done, settle=0) as w:
        assert w.process_once() == len(truth)
    assert all((inbox / f).exists() for f in truth)  # recorded, not moved
    monkeypatch.undo()
    with InboxWatcher(rt, inbox, move_done=done, settle=0) as w:  # restart
        assert w.process_once() == 0  # nothing processed twice ...
        assert w.stats.recovered_moves == len(truth)  # ... but every move finished
    assert sorted(p.name for p in done.iterdir()) == sorted(truth)
    assert not list(inbox.glob("*.png"))
    assert len(lines(inbox / "_watch" / "results.jsonl")) == len(truth)


def test_torn_last_line_is_cut_and_that_image_redone(trained: Path, demo_test: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    truth = fill(inbox, demo_test, 1)
    rt = DeviceRuntime(trained)
    with InboxWatcher(rt, inbox, settle=0) as w:
        w.process_once()
    journal = inbox / "_watch" / "results.jsonl"
    text = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(text[:-1]) + text[-1][: len(text[-1]) // 2])  # kill -9 in the middle of a write
    assert len(Journal(journal).done) == len(truth) - 1
    with InboxWatcher(rt, inbox, settle=0) as w:
        assert w.process_once() == 1
    records = lines(journal)
    assert sorted(r["file"] for r in records) == sorted(truth)


def _watch_cmd(bundle: Path, inbox: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgetl.cli", "device", "watch", str(bundle), str(inbox), "--settle", "0",
            "--interval", "0.05", "--no-learn", "--quiet", *extra]


def _wait_lines(journal: Path, n: int, proc: subprocess.Popen, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = journal.read_bytes().count(b"\n") if journal.exists() else 0
        if count >= n:
            return count
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    raise AssertionError(f"watch recorded fewer than {n} images in {timeout} s")


def test_kill_9_in_the_middle_then_restart_processes_every_file_exactly_once(trained: Path, demo_test: Path,
                                                                              tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    sources = [p for c in CLASSES for p in sorted((demo_test / c).glob("*.png"))[:5]]  # 50 files
    journal = inbox / "_watch" / "results.jsonl"
    proc = subprocess.Popen(_watch_cmd(trained, inbox, "--batch", "2"),
                            stderr=subprocess.PIPE, text=True)
    try:
        for i, p in enumerate(sources[:30]):  # arrive one by one, renamed into place
            shutil.copy(p, inbox / f"img{i:03d}.png.part")
            os.replace(inbox / f"img{i:03d}.png.part", inbox / f"img{i:03d}.png")
            time.sleep(0.01)
        at_kill = _wait_lines(journal, 10, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    for i, p in enumerate(sources[30:], start=30):  # the rest arrive while it is down
        shutil.copy(p, inbox / f"img{i:03d}.png")
    assert at_kill < len(sources)
    result = subprocess.run(_watch_cmd(trained, inbox, "--once"), check=False, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = lines(journal)
    names = [r["file"] for r in records]
    expected = [f"img{i:03d}.png" for i in range(len(sources))]
    assert sorted(names) == expected  # every file, none twice
    assert all(r["status"] == "ok" for r in records)
    assert sorted(p.name for p in inbox.glob("*.png")) == expected  # files stay without --move-done


def test_sigterm_finishes_the_batch_and_exits_0(trained: Path, demo_test: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    truth = fill(inbox, demo_test, 10)  # 100 files
    journal = inbox / "_watch" / "results.jsonl"
    proc = subprocess.Popen(_watch_cmd(trained, inbox, "--batch", "4"), stderr=subprocess.PIPE, text=True)
    try:
        _wait_lines(journal, 4, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped by signal" in err
    data = journal.read_bytes()
    assert data.endswith(b"\n")  # flushed whole lines only
    records = lines(journal)
    assert 4 <= len(records) <= len(truth) and len({r["file"] for r in records}) == len(records)


def test_field_learning_adds_a_class_through_the_gate(_pretrained_bundle: Path, demo_train: Path, demo_test: Path,
                                                      tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(_pretrained_bundle, tmp_path / "bundle"))
    nine = make_folder(tmp_path / "nine", {c: 30 for c in CLASSES if c != "trouser"}, demo_train)
    rt = DeviceRuntime(bundle)
    rt.train(nine)
    inbox = tmp_path / "inbox"
    make_folder(inbox / "_label", {"trouser": 30}, demo_train)
    truth = fill(inbox, demo_test, 2)
    old = os.path.getmtime(inbox / "_label" / "trouser") - 10
    for p in (inbox / "_label" / "trouser").iterdir():
        os.utime(p, (old, old))  # settled long ago
    with InboxWatcher(rt, inbox, settle=0.5) as w:
        report = w.learn_once()
        assert report is not None and report.promoted and "trouser" in report.classes and len(report.classes) == 10
        assert w.learn_once() is None  # labelled set unchanged: no new version
        assert w.process_once() == 0  # inbox files not settled yet
        time.sleep(0.55)
        assert w.process_once() == len(truth)
    records = lines(w.out)
    assert {r["head_version"] for r in records} == {report.version}
    trousers = [r for r in records if truth[r["file"]] == "trouser"]
    assert sum(r["label"] == "trouser" for r in trousers) >= 1  # the new class is predicted on held-out images
    assert [e["action"] for e in rt.state.audit()][-1] == "promote"


def test_one_watcher_per_journal(trained: Path, tmp_path: Path) -> None:
    from edgetl.errors import StateError

    (tmp_path / "inbox").mkdir()
    rt = DeviceRuntime(trained)
    with InboxWatcher(rt, tmp_path / "inbox"), pytest.raises(StateError, match="another watcher"):
        InboxWatcher(rt, tmp_path / "inbox")
    InboxWatcher(rt, tmp_path / "inbox").close()  # free again once the first one closed


def test_watch_needs_a_head(bundle: Path, tmp_path: Path) -> None:
    from edgetl.errors import NotFittedError

    (tmp_path / "inbox").mkdir()
    with pytest.raises(NotFittedError, match="device train"):
        InboxWatcher(DeviceRuntime(bundle), tmp_path / "inbox")
