"""Several processes on one bundle (train / add-class / remove-class / drift / evaluate / predict / watch --once):
after every interleaving the current head loads, every embedding a version trained on is in the store and the history
is consistent. A quick run here; the full one is ``-m slow`` (or ``python tools/concurrency_check.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
try:
    import concurrency_check as cc
finally:
    sys.path.pop(0)


@pytest.fixture(scope="module")
def trained(_pretrained_bundle: Path, demo_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cc.prepare(_pretrained_bundle, demo_train, tmp_path_factory.mktemp("conc") / "trained")


def test_the_invariant_catches_a_wiped_store(trained: Path, tmp_path: Path) -> None:
    """The check can fail: a store that lost a version's training embeddings (what a stale reader used to do)."""
    import shutil

    from edgetl.device import DeviceRuntime
    from edgetl.store import EmbeddingStore

    bundle = Path(shutil.copytree(trained, tmp_path / "b"))
    assert cc.check_invariant(bundle) == []
    rt = DeviceRuntime(bundle)
    with EmbeddingStore(rt.bundle.state_dir / "store", rt.extractor_sha256) as store:
        store.retain(set(store.keys()[1:]))
    assert any("missing from the store" in v for v in cc.check_invariant(bundle))


@pytest.mark.parametrize("seed", [0, 1])
def test_interleaved_processes_keep_the_invariant(trained: Path, demo_train: Path, tmp_path: Path, seed: int) -> None:
    run = cc.run_seed(trained, demo_train, seed, workers=3, ops=3, work=tmp_path)
    assert run["violations"] == [], run
    assert len(run["outcomes"]) == 9


@pytest.mark.slow
def test_interleaved_processes_many_seeds(trained: Path, demo_train: Path, tmp_path: Path) -> None:
    runs = [cc.run_seed(trained, demo_train, seed, workers=4, ops=6, work=tmp_path) for seed in range(100, 110)]
    assert [v for r in runs for v in r["violations"]] == []
    assert np.sum([len(r["outcomes"]) for r in runs]) == 10 * 24
