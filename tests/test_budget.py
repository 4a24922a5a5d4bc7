"""edgetl.budget: a memory budget becomes a batch size, ONNX Runtime arena settings and a store read chunk."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgetl.budget import (
    BASE_MB,
    DEFAULT_MODEL_MB,
    MAX_STORE_CHUNK,
    MIN_STORE_CHUNK,
    MemorySettings,
    memory_settings,
    per_image_mb,
)
from edgetl.errors import RegistryError
from edgetl.profiles import get_profile

BUNDLE_ONNX = Path(__file__).resolve().parent / "data" / "device-bundle" / "mnv2-64" / "extractor.onnx"


def test_no_budget_changes_nothing() -> None:
    s = memory_settings(None, 224, 1280, max_batch=16)
    assert (s.batch_size, s.enable_cpu_mem_arena, s.enable_mem_pattern, s.store_chunk) == (16, True, True,
                                                                                           MAX_STORE_CHUNK)
    assert s.working_mb is None and not s.tight


def test_per_image_arithmetic() -> None:
    # 224 px: input tensor 3*224*224*4 = 602112 B, x17 (itself + 16 activations) + uint8 image + 1280 floats
    assert per_image_mb(224, 1280) == pytest.approx((602112 * 17 + 150528 + 5120) / 2**20)
    assert per_image_mb(112, 1280) < per_image_mb(224, 1280) / 3.9


def test_zero_2w_budget_is_tight() -> None:
    zero = get_profile("raspberry-pi-zero-2w")
    s = memory_settings(zero.memory_budget_mb, 224, 1280, max_batch=zero.batch_size)
    # 200 - 80 - 30 = 90 MB working; 45 MB for the batch; ~9.9 MB per image without the arena -> 4 images
    assert s.working_mb == pytest.approx(200 - BASE_MB - DEFAULT_MODEL_MB)
    assert s.tight and not s.enable_cpu_mem_arena and not s.enable_mem_pattern
    assert s.batch_size == 4 and s.batch_size * s.per_image_mb <= s.working_mb / 2
    assert s.store_chunk == MAX_STORE_CHUNK


def test_roomy_budget_keeps_the_arena_and_caps_at_max_batch() -> None:
    s = memory_settings(1024, 224, 1280, max_batch=8)
    assert not s.tight and s.enable_mem_pattern and s.batch_size == 8


def test_batch_grows_with_the_budget_and_shrinks_with_the_input() -> None:
    batches = [memory_settings(b, 224, 1280, max_batch=1000).batch_size for b in (150, 200, 400, 800, 1600)]
    assert batches == sorted(batches) and batches[0] < batches[-1]
    assert memory_settings(200, 64, 1280, max_batch=1000).batch_size > memory_settings(200, 224, 1280,
                                                                                      max_batch=1000).batch_size


def test_store_chunk_shrinks_only_when_memory_is_scarce() -> None:
    big = memory_settings(130, 224, 4096, max_batch=8)  # 20 MB working: 2.5 MB per read, 32 KiB per row
    assert MIN_STORE_CHUNK <= big.store_chunk < MAX_STORE_CHUNK
    assert big.store_chunk == int((20 / 8) // (2 * 4096 * 4 / 2**20))


def test_a_budget_too_small_for_one_image_is_refused() -> None:
    with pytest.raises(RegistryError, match="memory budget of 100 MB cannot embed even one 224px image"):
        memory_settings(100, 224, 1280)
    with pytest.raises(RegistryError, match="positive sizes"):
        memory_settings(200, 0, 1280)


def test_onnx_session_takes_the_settings_and_keeps_its_defaults_without_them() -> None:
    pytest.importorskip("onnxruntime")
    from edgetl.runtime import load_extractor
    from edgetl.runtime.onnx import open_session

    default = open_session(BUNDLE_ONNX).get_session_options()
    assert default.enable_cpu_mem_arena and default.enable_mem_pattern
    tight = memory_settings(200, 224, 1280)
    assert isinstance(tight, MemorySettings) and tight.tight
    extractor = load_extractor("onnx", BUNDLE_ONNX, threads=1, memory=tight)
    options = extractor.session.get_session_options()  # type: ignore[attr-defined]
    assert not options.enable_cpu_mem_arena and not options.enable_mem_pattern
    import numpy as np

    out = extractor.embed(np.zeros((2, 3, 64, 64), dtype=np.float32))
    assert out.shape[0] == 2


def test_zero_2w_runtime_takes_the_budget(bundle: Path) -> None:
    """A runtime opened with the 512 MB profile embeds in batches the budget allows and opens ONNX Runtime with the
    budget's arena settings; at 224 px (the exported size) those switch the arena and memory pattern off."""
    pytest.importorskip("onnxruntime")
    from edgetl.device import DeviceRuntime

    zero = get_profile("raspberry-pi-zero-2w")
    rt = DeviceRuntime(bundle, profile=zero.id, threads=1)
    assert rt.memory is not None and rt.memory.budget_mb == zero.memory_budget_mb
    allowed = memory_settings(zero.memory_budget_mb, int(rt.bundle.preprocessing.input_size), rt.bundle.feature_dim,
                              max_batch=zero.batch_size)
    assert rt.memory == allowed and rt.batch_size <= allowed.batch_size
    options = rt.extractor.session.get_session_options()  # type: ignore[attr-defined]
    assert (options.enable_cpu_mem_arena, options.enable_mem_pattern) == (allowed.enable_cpu_mem_arena,
                                                                          allowed.enable_mem_pattern)
    at_224 = memory_settings(zero.memory_budget_mb, 224, rt.bundle.feature_dim, max_batch=zero.batch_size)
    assert not at_224.enable_cpu_mem_arena and not at_224.enable_mem_pattern and at_224.batch_size <= zero.batch_size
    # without a budget nothing changes: ONNX Runtime keeps its defaults
    free = DeviceRuntime(bundle, profile="generic-cpu", threads=1)
    assert free.memory is not None and free.memory.budget_mb is None
    assert free.extractor.session.get_session_options().enable_cpu_mem_arena  # type: ignore[attr-defined]


def test_predict_under_the_zero_2w_profile_stays_within_its_budget(bundle: Path, demo_train: Path,
                                                                    demo_test: Path, tmp_path: Path) -> None:
    """Peak RSS of one real `edgetl device predict` process under the 512 MB profile (regression guard; the full
    224 px table is tools/measure_memory.py → docs/results/memory.json)."""
    pytest.importorskip("onnxruntime")
    import json
    import os
    import subprocess
    import sys

    from edgetl.device import DeviceRuntime

    zero = get_profile("raspberry-pi-zero-2w")
    DeviceRuntime(bundle, threads=1).train(demo_train, seed=0)
    images = sorted(str(p) for p in demo_test.glob("*/*.png"))[:40]
    # measured through a small launcher: a child forked straight from pytest (hundreds of MB) would report pytest's
    # size as its ru_maxrss, which Linux keeps across exec
    launcher = ("import json, os, sys\npid = os.fork()\nif pid == 0:\n    os.execvp(sys.argv[1], sys.argv[1:])\n"
                "_, status, usage = os.wait4(pid, 0)\n"
                "print(json.dumps({'rc': os.waitstatus_to_exitcode(status), 'kb': usage.ru_maxrss}))")
    cmd = [sys.executable, "-m", "edgetl.cli", "device", "predict", str(bundle), *images, "--json", "--profile",
           zero.id, "--threads", "1"]
    out = subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["rc"] == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count('"label"') >= len(images)
    peak_mb = got["kb"] / 1024
    assert peak_mb < zero.memory_budget_mb, f"device predict peaked at {peak_mb:.0f} MB under {zero.id}"


def test_a_budgeted_extractor_runs_a_large_batch_in_slices_with_the_same_result() -> None:
    """`device bench` embeds 32 images in one call; under a budget the extractor runs them in slices of its batch."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    from edgetl.runtime import load_extractor

    tight = memory_settings(200, 224, 1280, max_batch=4)
    assert tight.batch_size == 4
    budgeted = load_extractor("onnx", BUNDLE_ONNX, threads=1, memory=tight)
    calls: list[int] = []
    run = budgeted.session.run  # type: ignore[attr-defined]

    class Spy:
        def run(self, names, feeds):  # type: ignore[no-untyped-def]
            calls.append(len(next(iter(feeds.values()))))
            return run(names, feeds)

        def __getattr__(self, name: str) -> object:
            return getattr(budgeted.session, name)  # type: ignore[attr-defined]

    batch = np.random.default_rng(0).standard_normal((10, 3, 64, 64)).astype(np.float32)
    free = load_extractor("onnx", BUNDLE_ONNX, threads=1).embed(batch)
    budgeted.session = Spy()  # type: ignore[attr-defined]
    out = budgeted.embed(batch)
    assert calls == [4, 4, 2] and out.dtype == np.float32
    np.testing.assert_allclose(out, free, rtol=1e-4, atol=1e-5)


def test_store_reads_in_the_budget_chunks(tmp_path: Path) -> None:
    import numpy as np

    from edgetl.store import EmbeddingStore

    rng = np.random.default_rng(0)
    rows = {f"k{i:03d}": rng.standard_normal(8).astype(np.float32) for i in range(40)}
    with EmbeddingStore(tmp_path, "ab" * 32) as store:
        for k, v in list(rows.items())[:30]:
            store.put(k, v)
        store.save()
        for k, v in list(rows.items())[30:]:
            store.put(k, v)  # buffered, not saved
        keys = [*reversed(rows), "absent", "k001"]
        whole = store.get_many(keys)
        for chunk in (1, 7, MIN_STORE_CHUNK, 10_000):
            got = store.get_many(keys, chunk)
            assert len(got) == len(keys) and got[-2] is None
            for a, b in zip(got, whole):
                assert (a is None and b is None) or np.array_equal(a, b)
        assert np.array_equal(got[-1], rows["k001"])
