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
