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

    def crash(*args: object, **kwargs: object) -> None:
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


# ------------------------------------------------------------------------------------- hostile inboxes
def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and not p.is_symlink()}


def test_links_planted_in_the_inbox_are_never_followed(trained: Path, demo_test: Path, tmp_path: Path) -> None:
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    truth = fill(inbox, demo_test, 1)
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    outside.mkdir()
    (outside / "victim.txt").write_text("precious")
    (outside / "victim.lock").write_text("precious lock")
    shutil.copy(next(iter((demo_test / "bag").glob("*.png"))), outside / "elsewhere.png")
    before = _snapshot(outside)
    (inbox / "_watch").mkdir()
    (inbox / "_watch" / "results.jsonl").symlink_to(outside / "victim.txt")
    (inbox / "_watch" / "results.jsonl.lock").symlink_to(outside / "victim.lock")
    (inbox / "_watch" / "results.jsonl.learn.json").symlink_to(outside / "created-by-learning.json")
    (inbox / "_failed").mkdir()
    (inbox / "_failed" / "broken.png.reason").symlink_to(outside / "victim.txt")
    (inbox / "link.png").symlink_to(outside / "elsewhere.png")  # a link to an image outside
    (inbox / "linked-dir").symlink_to(outside, target_is_directory=True)
    (inbox / "fifo.png").parent.mkdir(exist_ok=True)
    os.mkfifo(inbox / "fifo.png")  # would block a reader forever
    with InboxWatcher(DeviceRuntime(trained), inbox, settle=0, batch_size=4) as w:
        assert w.process_once() == len(truth) + 1
    assert _snapshot(outside) == before  # nothing outside was truncated, appended to or renamed
    assert not (outside / "created-by-learning.json").exists()
    records = lines(inbox / "_watch" / "results.jsonl")
    assert not (inbox / "_watch" / "results.jsonl").is_symlink()
    assert sorted(r["file"] for r in records) == sorted([*truth, "broken.png"])
    assert list((inbox / "_watch").glob("results.jsonl.aside-*"))  # the planted links were moved aside, not deleted
    reasons = [p for p in (inbox / "_failed").iterdir() if p.name.endswith(".reason") and not p.is_symlink()]
    assert len(reasons) == 1 and "broken" in reasons[0].read_text()
    assert (inbox / "link.png").is_symlink() and (inbox / "fifo.png").exists()  # ignored, untouched


def test_a_link_in_place_of_the_watchers_folders(trained: Path, demo_test: Path, tmp_path: Path) -> None:
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    fill(inbox, demo_test, 1)
    (inbox / "broken.png").write_bytes(b"not an image")
    outside.mkdir()
    (inbox / "_watch").symlink_to(outside, target_is_directory=True)
    (inbox / "_failed").symlink_to(outside, target_is_directory=True)
    with InboxWatcher(DeviceRuntime(trained), inbox, settle=0) as w:
        assert w.process_once() == 11
    assert list(outside.iterdir()) == []
    assert (inbox / "_watch").is_dir() and not (inbox / "_watch").is_symlink()
    assert (inbox / "_failed" / "broken.png").is_file() and not (inbox / "_failed").is_symlink()
    assert len(list(inbox.glob("_watch.aside-*"))) == 1 and len(list(inbox.glob("_failed.aside-*"))) == 1


@pytest.mark.parametrize("exc", [OverflowError("Python int too large"), MemoryError(), RecursionError("deep"),
                                 ZeroDivisionError("bad header")])
def test_any_exception_from_one_file_is_that_files_failure(trained: Path, demo_test: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           exc: BaseException) -> None:
    from edgetl import watch

    inbox = tmp_path / "inbox"
    truth = fill(inbox, demo_test, 1)
    shutil.copy(next(iter((demo_test / "bag").glob("*.png"))), inbox / "poison.png")
    shutil.copy(next(iter((demo_test / "coat").glob("*.png"))), inbox / "bad-pixels.png")
    real = watch.load_image

    def load(path: str) -> object:
        name = os.readlink(path) if path.startswith("/proc/") else path
        if name.endswith("poison.png"):
            raise exc
        if name.endswith("bad-pixels.png"):
            return "not an image at all"  # decodes, then fails in preprocessing/embedding
        return real(path)

    monkeypatch.setattr(watch, "load_image", load)
    with InboxWatcher(DeviceRuntime(trained), inbox, settle=0, batch_size=32) as w:
        assert w.process_once() == len(truth) + 2
    records = {r["file"]: r for r in lines(w.out)}
    assert records["poison.png"]["status"] == "failed" and type(exc).__name__ in records["poison.png"]["error"]
    assert records["bad-pixels.png"]["status"] == "failed"
    assert all(records[f]["status"] == "ok" for f in truth)  # the rest of the batch classified
    assert (inbox / "_failed" / "poison.png").is_file() and (inbox / "_failed" / "bad-pixels.png").is_file()


def test_unreadable_journal_lines_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = tmp_path / "results.jsonl"
    good = {"file": "a.png", "size": 3, "mtime_ns": 5, "status": "ok"}
    bad = [b'{"file": "b.png", "size": 1e999, "mtime_ns": 1, "status": "ok"}', b"[1, 2, 3]", b"\xff\xfe\x00garbage",
           b'{"file": 7, "size": 1, "mtime_ns": 1}', b'{"file": "c.png", "size": Infinity, "mtime_ns": 1}',
           b"[" * 100_000, b'"just a string"', b'{"file": "d.png", "size": "x", "mtime_ns": 1}',
           b'{"file": "e.png", "size": 1, "mtime_ns": 1, "moved_to": 5}', b"x" * (2 << 20)]
    journal.write_bytes(b"\n".join([json.dumps(good).encode(), *bad, json.dumps(good | {"file": "z.png"}).encode()])
                        + b"\n")
    import subprocess
    import sys

    import edgetl.journal
    from tests.conftest import LogLines

    code = (f"from edgetl.watch import Journal; from pathlib import Path; "
            f"Journal(Path({str(journal)!r}), owned=False).close()")
    err = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=60).stderr
    # read in a fresh process: log capture in this one depends on what earlier tests' libraries did
    assert err.count("not a watch record") == len(bad) and "longer than" in err, err
    with LogLines(edgetl.journal.log):
        j = Journal(journal, owned=False)
    assert sorted(k.split("\x00")[0] for k in j.done) == ["a.png", "z.png"]
    j.append([good | {"file": "new.png"}])
    j.close()
    assert journal.read_bytes().endswith(b'"new.png","size":3,"mtime_ns":5,"status":"ok"}\n')


def test_a_slow_writer_is_retried_not_failed(trained: Path, demo_test: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    image = next(iter((demo_test / "coat").glob("*.png"))).read_bytes()
    slow = inbox / "slow.png"
    slow.write_bytes(image[: len(image) // 2])  # the writer pauses longer than --settle
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n never an image")
    with InboxWatcher(DeviceRuntime(trained), inbox, settle=0.3) as w:
        assert w.process_once() == 0  # first sight
        time.sleep(0.35)
        assert w.process_once() == 0  # both settled, both fail to decode: another settle window first
        assert w.stats.retried == 2 and not (inbox / "_failed").exists()
        with open(slow, "ab") as fh:  # the writer resumes and finishes
            fh.write(image[len(image) // 2:])
        time.sleep(0.35)
        assert w.process_once() == 1  # broken.png, unchanged: failed for good now
        assert (inbox / "_failed" / "broken.png").is_file()
        time.sleep(0.35)
        assert w.process_once() == 1  # slow.png, complete and settled
    records = {r["file"]: r for r in lines(w.out)}
    assert records["slow.png"]["status"] == "ok" and records["slow.png"]["size"] == len(image)
    assert records["broken.png"]["status"] == "failed"


def test_a_file_replaced_under_the_same_name_is_a_new_arrival(trained: Path, demo_test: Path,
                                                               tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    first, second = sorted((demo_test / "bag").glob("*.png"))[:2]
    shutil.copy(first, inbox / "cam.png")
    with InboxWatcher(DeviceRuntime(trained), inbox, settle=0) as w:
        assert w.process_once() == 1
        shutil.copy(second, inbox / "cam.png.part")
        os.utime(inbox / "cam.png.part", ns=(time.time_ns(), time.time_ns() + 10**9))  # a later mtime
        os.replace(inbox / "cam.png.part", inbox / "cam.png")
        assert w.process_once() == 1
        assert w.process_once() == 0
    records = lines(w.out)
    assert [r["file"] for r in records] == ["cam.png", "cam.png"]
    assert records[0]["mtime_ns"] != records[1]["mtime_ns"]


def test_a_file_replaced_before_its_move_stays_in_the_inbox(trained: Path, demo_test: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    inbox.mkdir()
    first, second = sorted((demo_test / "coat").glob("*.png"))[:2]
    shutil.copy(first, inbox / "cam.png")
    append = Journal.append
    replaced = []

    def append_then_replace(self: Journal, records: list) -> None:
        append(self, records)
        if not replaced:  # a new image lands under the same name after the first was read, before it is moved
            shutil.copy(second, inbox / "cam.png.part")
            os.replace(inbox / "cam.png.part", inbox / "cam.png")
            replaced.append(True)

    monkeypatch.setattr(Journal, "append", append_then_replace)
    with InboxWatcher(DeviceRuntime(trained), inbox, move_done=done, settle=0) as w:
        assert w.process_once() == 1
        assert (inbox / "cam.png").read_bytes() == second.read_bytes()  # the unprocessed file was not moved away
        assert not (done / "cam.png").exists()
        assert w.process_once() == 1  # ... and is classified as the new arrival it is
    assert (done / "cam.png").read_bytes() == second.read_bytes() and not (inbox / "cam.png").exists()
    assert [r["size"] for r in lines(w.out)] == [first.stat().st_size, second.stat().st_size]
