"""The embedding store (SQLite, merged writes, migration of the old .npz format) and its per-class budget: reservoir
sampling keeps a uniform sample of everything seen."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from edgetl.errors import StateError
from edgetl.store import EmbeddingStore, reservoir


def test_reservoir_respects_budget_and_counts() -> None:
    y = np.array([0] * 30 + [1] * 4)
    keep, seen = reservoir(y, 0, 10, {}, seed=0)
    assert np.bincount(y[keep]).tolist() == [10, 4]
    assert seen == {0: 30, 1: 4}
    # a second batch continues the stream: counts accumulate, the budget holds
    y2 = np.concatenate([y[keep], np.array([0] * 50 + [1] * 20)])
    keep2, seen2 = reservoir(y2, len(keep), 10, seen, seed=1)
    assert np.bincount(y2[keep2]).tolist() == [10, 10]
    assert seen2 == {0: 80, 1: 24}


def test_reservoir_is_uniform_over_a_stream_of_batches() -> None:
    """Each of 200 samples offered in 10 batches of 20 ends in a budget-20 reservoir with probability 0.1."""
    hits = np.zeros(200)
    trials = 400
    for t in range(trials):
        ids = np.zeros(0, dtype=np.int64)  # which stream element each kept row is
        seen: dict[int, int] = {}
        for b in range(10):
            new = np.arange(20 * b, 20 * (b + 1))
            stream = np.concatenate([ids, new])
            keep, seen = reservoir(np.zeros(len(stream), np.int64), len(ids), 20, seen, seed=t * 10 + b)
            ids = stream[keep]
        hits[ids] += 1
    rate = hits / trials
    # early and late samples are kept equally often (a biased sampler would favour the last batches)
    assert abs(rate[:100].mean() - rate[100:].mean()) < 0.02
    assert abs(rate.mean() - 0.1) < 1e-9  # exactly 20 of 200 kept each trial


def test_reservoir_shrinks_to_a_smaller_budget() -> None:
    y = np.array([0] * 12)
    keep, seen = reservoir(y, 12, 5, {0: 40}, seed=0)
    assert len(keep) == 5 and seen == {0: 40}


def test_store_retain_persists(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, "ab" * 32)
    for i in range(5):
        store.put(f"k{i}", np.full(4, i, np.float32))
    store.save()
    assert store.retain({"k1", "k3"}) == 3
    store.save()
    again = EmbeddingStore(tmp_path, "ab" * 32)
    assert len(again) == 2 and again.get("k3") is not None and again.get("k0") is None
    np.testing.assert_allclose(again.get("k3"), np.full(4, 3.0))


def test_train_with_budget_keeps_a_reservoir(bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    budget = 3
    from edgetl.device import DeviceRuntime
    from tests.conftest import make_folder

    first = make_folder(tmp_path / "a", {"bag": 8, "dress": 8}, demo_train)
    more = make_folder(tmp_path / "b", {"coat": 6}, demo_train)
    (more / "bag").mkdir()
    for p in sorted((demo_train / "bag").glob("*.png"))[8:14]:
        (more / "bag" / p.name).write_bytes(p.read_bytes())
    rt = DeviceRuntime(bundle)
    rt.train(first, head="ncm", budget=budget, val_split=0.0)
    info = rt.store_info()
    assert info["budget"] == budget
    assert info["current_head_classes"] == {"bag": budget, "dress": budget}
    assert info["seen"] == {"bag": 8, "dress": 8}
    # only the kept embeddings stay in the store
    assert [f["embeddings"] for f in info["files"] if f["in_use"]] == [2 * budget]

    rt.train(more, head="ncm", incremental=True, val_split=0.0)  # inherits the budget
    info = rt.store_info()
    assert info["current_head_classes"] == {"bag": budget, "dress": budget, "coat": budget}
    assert info["seen"] == {"bag": 14, "dress": 8, "coat": 6}
    # the first version's training embeddings are kept too (rollback + retraining stays possible)
    kept = {str(k) for v in rt.state.versions() for k in rt.state.train_keys(v)}
    assert [f["embeddings"] for f in info["files"] if f["in_use"]] == [len(kept)]
    assert "coat" in rt.load_current_head()[1]


# ------------------------------------------------------------------------------------------------ SQLite store
SHA = "cd" * 32


def test_two_open_stores_merge_their_writes(tmp_path: Path) -> None:
    """The bug: `device drift` opened the store, `device train` saved its embeddings, drift saved its stale copy and
    train's embeddings were gone. Now each save inserts its own rows; nothing is overwritten by a stale copy."""
    reader = EmbeddingStore(tmp_path, SHA)  # drift opens the store first
    writer = EmbeddingStore(tmp_path, SHA)
    for i in range(20):
        writer.put(f"train{i}", np.full(8, i, np.float32))
    writer.save()
    writer.close()
    reader.put("drift0", np.ones(8, np.float32))
    reader.save()
    assert reader.get("train3") is not None  # sees the other process's rows without reopening
    reader.close()
    with EmbeddingStore(tmp_path, SHA) as again:
        assert len(again) == 21
        np.testing.assert_array_equal(again.get("train7"), np.full(8, 7, np.float32))  # float32, exact
        assert again.get_many(["drift0", "nope", "train0"])[1] is None


def test_pending_rows_are_visible_and_counted(tmp_path: Path) -> None:
    with EmbeddingStore(tmp_path, SHA) as store:
        store.put("a", np.zeros(4))
        assert len(store) == 1 and "a" in store and store.keys() == ["a"]
        store.save()
        store.put("a", np.ones(4))  # replacing a saved key is not a new row
        assert len(store) == 1
        np.testing.assert_array_equal(store.get("a"), np.ones(4, np.float32))


def _writer_process(folder: str, start: int, n: int) -> None:
    for i in range(start, start + n, 5):
        with EmbeddingStore(Path(folder), SHA) as store:
            for j in range(i, i + 5):
                store.put(f"k{j}", np.full(16, j, np.float32))
            store.save()


def test_concurrent_processes_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(str(tmp_path), 100 * p, 60)) for p in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with EmbeddingStore(tmp_path, SHA) as store:
        assert len(store) == 180
        rows = store.get_many([f"k{100 * p + j}" for p in range(3) for j in range(60)])
        assert all(r is not None and r[0] == float(k) for r, k in
                   zip(rows, [100 * p + j for p in range(3) for j in range(60)]))
    assert sqlite3.connect(tmp_path / f"{SHA[:16]}.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_old_npz_store_is_migrated_on_first_open(tmp_path: Path) -> None:
    keys = np.array([f"k{i}" for i in range(30)], dtype="U64")
    emb = np.arange(30 * 6, dtype=np.float32).reshape(30, 6).astype(np.float16)
    np.savez(tmp_path / f"{SHA[:16]}.npz", keys=keys, embeddings=emb)
    with EmbeddingStore(tmp_path, SHA) as store:
        assert len(store) == 30
        np.testing.assert_array_equal(store.get("k29"), emb[29].astype(np.float32))
    assert not (tmp_path / f"{SHA[:16]}.npz").exists()
    with EmbeddingStore(tmp_path, SHA) as store:  # nothing migrated twice
        assert len(store) == 30


def test_a_damaged_store_is_set_aside_not_deleted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import edgetl.store
    from tests.conftest import LogLines

    (tmp_path / f"{SHA[:16]}.sqlite").write_bytes(b"this is not a database" * 100)
    with LogLines(edgetl.store.log), EmbeddingStore(tmp_path, SHA) as store:
        assert len(store) == 0
        store.put("a", np.zeros(3))
        store.save()
    # the warning, read in a fresh process (log capture in this one depends on what earlier tests' libraries did)
    again = tmp_path / "again"
    again.mkdir()
    (again / f"{SHA[:16]}.sqlite").write_bytes(b"this is not a database" * 100)
    import subprocess
    import sys

    code = (f"from edgetl.store import EmbeddingStore; from pathlib import Path; "
            f"EmbeddingStore(Path({str(again)!r}), {SHA!r}).close()")
    err = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=60).stderr
    assert "damaged" in err, err
    aside = list(tmp_path.glob(f"{SHA[:16]}.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")


def test_an_unwritable_store_is_a_clear_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "store"
    blocker.write_text("a file where the store folder should be")
    with pytest.raises(StateError, match="embedding store"):
        EmbeddingStore(blocker, SHA)
