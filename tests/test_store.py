"""The embedding store's per-class budget: reservoir sampling keeps a uniform sample of everything seen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
    from tests.conftest import make_folder

    from edgetl.device import DeviceRuntime

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
