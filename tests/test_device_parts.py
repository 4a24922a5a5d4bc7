"""The parts behind the device facade: typed training data, the one prediction path, the one lock helper and the one
commit sequence (write / set current / audit)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgetl._lock import lock_exclusive
from edgetl.device import DeviceRuntime
from edgetl.errors import NotFittedError, StateError
from edgetl.labelled import LabelledEmbeddings
from edgetl.prediction import Prediction, Predictor
from edgetl.state import DeviceState


# ---------------------------------------------------------------------------------------------- labelled embeddings
def _set(keys: list[str], y: list[int], classes: list[str], value: float = 0.0) -> LabelledEmbeddings:
    X = np.full((len(keys), 2), value, np.float32)
    return LabelledEmbeddings(X, np.array(keys, dtype="U64"), np.array(y, dtype=np.int64), classes)


def test_merge_matches_classes_by_name_and_the_new_label_wins() -> None:
    old = _set(["a", "b", "c"], [0, 1, 1], ["cat", "dog"], 0.0)
    new = _set(["c", "d"], [0, 1], ["fox", "cat"], 1.0)
    merged = old.merge(new)
    assert merged.classes == ["cat", "dog", "fox"]
    assert merged.keys.tolist() == ["a", "b", "c", "d"]
    assert merged.y.tolist() == [0, 1, 2, 0]  # c is now a fox (the new label), d a cat
    assert merged.X[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0] and merged.y.dtype == np.int64
    X, keys, y, classes = merged  # the tuple it replaced still unpacks
    assert len(merged) == len(X) == len(keys) == len(y) == 4 and classes is merged.classes


def test_retain_without_a_budget_keeps_everything_and_counts_per_class() -> None:
    data = _set(["a", "b", "c"], [0, 1, 1], ["cat", "dog"])
    kept, record = data.retain(0, None, {}, seed=0)
    assert kept is data and record == {"budget": None, "seen": {"cat": 1, "dog": 2}}
    kept, record = _set([f"k{i}" for i in range(10)], [0] * 10, ["cat"]).retain(0, 3, {}, seed=0)
    assert len(kept) == 3 and record == {"budget": 3, "seen": {"cat": 10}}
    assert LabelledEmbeddings.empty(5).X.shape == (0, 5)


# ---------------------------------------------------------------------------------------------- the prediction path
class _Head:
    kind = "fixed"

    def __init__(self, scores: np.ndarray):
        self.scores = scores

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.scores[: len(X)]


class _Novelty:
    threshold = 2.5

    def score(self, X: np.ndarray) -> np.ndarray:
        return X[:, 0].astype(np.float64)


class _Versions:
    """What a :class:`Predictor` reads from a device's version history."""

    def __init__(self, scores: np.ndarray, novelty: bool = True):
        self.bundle = type("B", (), {"path": Path("b")})()
        self.current: str | None = "v0001"
        self.head = _Head(scores)
        self.novelty = _Novelty() if novelty else None
        self.loads = 0

    def current_version(self) -> str | None:
        return self.current

    def load_current(self) -> tuple[Any, list[str], str]:
        self.loads += 1
        assert self.current is not None
        return self.head, ["a", "b", "c"], self.current

    def meta(self, version: str) -> dict[str, Any]:
        return {}

    def novelty_model(self, version: str) -> Any:
        return self.novelty


def test_one_prediction_top_k_novelty_and_drift() -> None:
    scores = np.array([[0.2, 0.4, 0.4], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    versions = _Versions(scores)
    predictor = Predictor(versions, window=2)  # type: ignore[arg-type]
    X = np.array([[1.0], [4.0], [3.0]], np.float32)
    first, second, third = predictor.classify(X, top_k=2, paths=["x.png", "y.png", "z.png"])
    assert (first.label, first.top_k) == ("b", (("b", pytest.approx(0.4)), ("c", pytest.approx(0.4))))  # tie: index
    assert second.label == "a" and len(second.top_k) == 2
    assert (first.novelty, first.unknown, second.unknown) == (1.0, False, True)
    assert [p.drift for p in (first, second, third)] == [1.0, 2.5, 3.5]  # median of the last two images
    assert [p.drifted for p in (first, second, third)] == [False, False, True]
    assert predictor.classify(X[:1])[0].top_k == (("b", pytest.approx(0.4)),)  # top-1 is the first best, as argmax
    assert versions.loads == 1  # loaded once while the version stays
    versions.current = "v0002"
    assert predictor.classify(X[:1])[0].drift == 1.0 and versions.loads == 2  # a new head restarts the window
    versions.current = None
    with pytest.raises(NotFittedError, match="device train"):
        predictor.classify(X)


def test_the_edges_convert_one_prediction_to_their_own_shapes() -> None:
    p = Prediction("b", 0.123456789, (("b", 0.123456789), ("a", 0.1)), "v0003", True, novelty=2.0000004,
                   unknown=False, drift=1.23456789, drifted=False, path="x.png")
    assert p.as_dict() == {"path": "x.png", "label": "b", "probability": 0.123456789,
                           "top_k": [{"label": "b", "probability": 0.123456789}, {"label": "a", "probability": 0.1}],
                           "head_version": "v0003", "calibrated": True, "novelty": 2.0000004, "unknown": False}
    assert list(p.as_record().items()) == [("label", "b"), ("probability", 0.123457), ("calibrated", True),
                                           ("unknown", False), ("novelty", 2.0), ("drift", 1.234568),
                                           ("drifted", False), ("head_version", "v0003")]
    bare = Prediction("a", 1.0, (("a", 1.0),), "bundle", False)  # the bundle's head: no novelty model
    assert "novelty" not in bare.as_dict()
    assert [bare.as_record()[k] for k in ("unknown", "novelty", "drift", "drifted")] == [None] * 4
    no_window = Predictor(_Versions(np.array([[0.1, 0.2, 0.7]], np.float32)), window=None)  # type: ignore[arg-type]
    (one,) = no_window.classify(np.array([[3.0]], np.float32))
    assert (one.unknown, one.drift) == (True, None)


def test_predict_watch_and_stream_share_the_prediction(bundle: Path, demo_train: Path, demo_test: Path) -> None:
    from edgetl.data import load_image

    rt = DeviceRuntime(bundle)
    rt.train(demo_train)
    paths = sorted(demo_test.glob("*/*.png"))[::10]
    predicted = rt.predict(paths, top_k=3)
    live = rt.predictor()  # what watch and stream classify with
    images = [load_image(p) for p in paths]  # how watch reads a file; stream hands over decoded frames
    records = [p.as_record() for p in live.classify(rt.embed_images(images))]
    for r, rec in zip(predicted, records):
        assert (r["label"], r["head_version"], r["unknown"]) == (rec["label"], rec["head_version"], rec["unknown"])
        assert r["probability"] == pytest.approx(rec["probability"], abs=1e-5)
        assert r["top_k"][0] == {"label": r["label"], "probability": r["probability"]}
    assert all(rec["drift"] is not None for rec in records)


# ---------------------------------------------------------------------------------------------- commit_version
def test_every_new_version_is_written_made_current_and_audited_alike(bundle: Path, demo_train: Path,
                                                                     tmp_path: Path) -> None:
    rt = DeviceRuntime(bundle)
    trained = rt.train(demo_train)
    head, labels, _ = rt.load_current_head()
    head.save(tmp_path / "head.npz")
    adopted = rt.adopt_head(tmp_path / "head.npz", labels, source="fleet-test")
    renamed = rt.rename_class("bag", "handbag")
    entries = [e for e in rt.state.audit() if e["action"] in ("promote", "candidate")]
    assert [e["version"] for e in entries] == [trained.version, adopted.version, renamed]
    assert [e["previous"] for e in entries] == [None, trained.version, adopted.version]
    assert all(e["extractor"] == rt.entry.file and e["reason"] for e in entries)
    assert entries[1]["source"] == "fleet-test"
    for version in (trained.version, adopted.version, renamed):
        meta = rt.state.meta(version)
        assert meta["status"] == "promoted" and meta["extractor_sha256"] == rt.extractor_sha256
        assert rt.state.train_keys(version) is not None
    assert rt.current_version() == renamed and "handbag" in rt.load_current_head()[1]


# ---------------------------------------------------------------------------------------------- one lock helper
def test_the_lock_helper_names_the_holder_and_waits(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    first = os.open(path, os.O_RDWR | os.O_CREAT)
    second = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        lock_exclusive(first, 0.0, StateError)
        assert path.read_text() == f"pid {os.getpid()}"
        start = time.monotonic()
        with pytest.raises(StateError, match=f"pid {os.getpid()}"):
            lock_exclusive(second, 0.2, StateError)
        assert time.monotonic() - start >= 0.2  # waited for the holder before giving up
        threading.Timer(0.2, os.close, (first,)).start()  # the holder ends: closing releases the lock
        lock_exclusive(second, 5.0, StateError)
    finally:
        os.close(second)


def test_the_writer_lock_and_the_journal_lock_are_the_same_helper(bundle: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import edgetl._lock
    from edgetl.journal import Journal

    calls: list[float] = []
    real = edgetl._lock.lock_exclusive

    def counted(fd: int, timeout: float, busy: Any) -> None:
        calls.append(timeout)
        real(fd, timeout, busy)

    monkeypatch.setattr("edgetl.state.lock_exclusive", counted)
    monkeypatch.setattr("edgetl.journal.lock_exclusive", counted)
    with DeviceState(bundle / "state").writer(timeout=0.5):
        pass
    Journal(tmp_path / "results.jsonl", owned=False).close()
    assert calls == [0.5, 0.0]

