"""Host fine-tuning across processes (torchrun, DistributedDataParallel over gloo) and resumable checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HAS_TORCH, make_folder

pytestmark = [pytest.mark.host, pytest.mark.skipif(not HAS_TORCH, reason="needs the host extra (torch)")]

SPEC = {"bag": 8, "sandal": 8, "trouser": 8}


@pytest.fixture()
def small(demo_train: Path, tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data", SPEC, demo_train)


class _Crash(Exception):
    pass


@pytest.mark.slow  # three short fine-tunes: ~30 s
def test_interrupted_run_resumes_to_the_same_result(small: Path, tmp_path: Path) -> None:
    from edgetl.host.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(model="mobilenet_v2", epochs=2, image_size=32, batch_size=8, seed=3)
    whole = finetune(small, tmp_path / "whole", cfg)

    def crash(stage: str, done: int, total: int) -> None:
        if stage.startswith("epoch 2"):
            raise _Crash

    with pytest.raises(_Crash):
        finetune(small, tmp_path / "cut", cfg, progress=crash)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "metrics.json").exists()
    resumed = finetune(small, tmp_path / "cut", cfg, resume=True)
    assert resumed["resumed_from_epoch"] == 1
    for a, b in zip(whole["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"])
    # other settings cannot resume this checkpoint
    from edgetl.errors import DataError

    with pytest.raises(DataError, match="other settings"):
        finetune(small, tmp_path / "cut", FinetuneConfig(model="mobilenet_v2", epochs=3, image_size=32, batch_size=8,
                                                          seed=3), resume=True)


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_one_process(small: Path, tmp_path: Path) -> None:
    args = ["finetune", "--model", "mobilenet_v2", "--data", str(small), "--epochs", "1", "--image-size", "32",
            "--batch-size", "8", "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29517", "-m", "edgetl.cli", *args, "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=600, env=env, check=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("wrote ") == 1  # rank 0 only reports
    one = subprocess.run([sys.executable, "-m", "edgetl.cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    m_ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    m_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert m_ddp["world_size"] == 2 and m_one["world_size"] == 1
    assert m_ddp["n_train"] == m_one["n_train"]
    # same images per step (the sampler interleaves ranks); dropout masks differ, so equal within noise
    assert m_ddp["history"][0]["train_loss"] == pytest.approx(m_one["history"][0]["train_loss"], abs=0.15)
    assert abs(m_ddp["best_val_accuracy"] - m_one["best_val_accuracy"]) <= 0.34
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.pt", "metrics.json",
                                                                   "model.safetensors", "run.json"]
