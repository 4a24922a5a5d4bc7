"""Device profiles carry their memory, a memory budget and published latency figures; ``expected_latency`` picks the
closest figure, scales it by input size² and gives a verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgetl.errors import RegistryError
from edgetl.profiles import LatencyFigure, expected_latency, get_profile, list_profiles

BASE = """id = "board"
description = "a test board"
arch = "aarch64"
cores = 4
memory_mb = 1024
backends = ["onnx"]
onnx_providers = ["CPUExecutionProvider"]
threads = 4
precision = "int8"
batch_size = 4
"""

FIGURE = """
[[latency]]
model = "mobilenet_v2"
runtime = "onnx"
unit = "cpu"
precision = "int8"
input_size = 224
threads = 4
ms = 40.0
source = "https://example.org/bench"
measured = "a test figure"
"""


def _profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "board.toml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("EDGETL_DEVICES_DIR", str(tmp_path))
    return path


def test_shipped_profiles_carry_memory_budget_and_sourced_figures() -> None:
    profiles = {p.id: p for p in list_profiles()}
    for p in profiles.values():
        assert p.memory_mb >= 0 and (p.memory_budget_mb is None or 0 < p.memory_budget_mb)
        for f in p.latency:
            assert f.source.startswith("https://") and f.ms > 0 and f.measured
    zero = profiles["raspberry-pi-zero-2w"]
    assert (zero.memory_mb, zero.memory_budget_mb, zero.cores, zero.arch) == (512, 200, 4, "aarch64")
    assert set(zero.backends) == {"onnx", "tflite"} and zero.precision == "int8"
    assert profiles["generic-cpu"].memory_budget_mb is None  # unlimited
    pi4 = profiles["raspberry-pi-4"]
    assert pi4.memory_mb == 2048 and pi4.memory_variants_mb == (1024, 2048, 4096, 8192)
    for board in ("raspberry-pi-4", "raspberry-pi-5", "raspberry-pi-zero-2w", "jetson-nano", "jetson-orin-nano"):
        assert any(f.model == "mobilenet_v2" for f in profiles[board].latency), board


def test_parses_a_latency_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _profile(tmp_path, monkeypatch, BASE + "memory_budget_mb = 300\n" + FIGURE)
    p = get_profile("board")
    assert p.memory_budget_mb == 300
    assert p.latency == (LatencyFigure(model="mobilenet_v2", runtime="onnx", unit="cpu", precision="int8",
                                       input_size=224, threads=4, ms=40.0, source="https://example.org/bench",
                                       measured="a test figure"),)


@pytest.mark.parametrize("change,field", [
    (("ms = 40.0", "ms = -3"), "latency[0].ms"),
    (("ms = 40.0", 'ms = "fast"'), "latency[0].ms"),
    (("ms = 40.0\n", ""), "latency[0].ms is missing"),
    (('unit = "cpu"', 'unit = "npu"'), "latency[0].unit"),
    (('precision = "int8"', 'precision = "int4"'), "latency[0].precision"),
    (('source = "https://example.org/bench"', 'source = "a blog"'), "latency[0].source"),
    (("input_size = 224", "input_size = 0"), "latency[0].input_size"),
    (("threads = 4", "threads = -1"), "latency[0].threads"),
    (("threads = 4", "threads = true"), "latency[0].threads"),
    (('measured = "a test figure"', 'measured = " "'), "latency[0].measured"),
    (("threads = 4", "threads = 4\nfps = 3"), "latency[0].fps"),
])
def test_a_malformed_figure_is_a_one_line_error_naming_file_and_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: tuple[str, str], field: str) -> None:
    _profile(tmp_path, monkeypatch, BASE + FIGURE.replace(*change, 1))
    with pytest.raises(RegistryError) as err:
        list_profiles()
    message = str(err.value)
    assert "board.toml" in message and field in message and "\n" not in message


@pytest.mark.parametrize("extra,words", [
    ("memory_budget_mb = 0\n", "memory_budget_mb must be positive"),
    ("memory_budget_mb = 4096\n", "exceeds the board's memory_mb"),
    ("memory_variants_mb = [2048]\n", "memory_variants_mb"),
    ('latency = "fast"\n', "latency must be an array of tables"),
])
def test_bad_memory_fields_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str,
                                       words: str) -> None:
    _profile(tmp_path, monkeypatch, BASE + extra)
    with pytest.raises(RegistryError, match=words):
        list_profiles()


def _board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, figures: str) -> object:
    _profile(tmp_path, monkeypatch, BASE + figures)
    return get_profile("board")


def test_the_closest_figure_wins_and_sizes_scale_by_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = FIGURE.replace('runtime = "onnx"', 'runtime = "ncnn"').replace("ms = 40.0", "ms = 10.0")
    p = _board(tmp_path, monkeypatch, other + FIGURE)
    exact = expected_latency(p, "mobilenet_v2", "onnx", "int8", 224, threads=4, measured_ms=44.0)
    assert exact is not None and exact.figure.runtime == "onnx" and exact.expected_ms == 40.0
    assert exact.exact and not exact.scaled and exact.verdict == "within" and exact.notes == ()
    half = expected_latency(p, "mobilenet_v2", "onnx", "int8", 112, measured_ms=10.0)
    assert half is not None and half.expected_ms == pytest.approx(10.0) and half.scaled and half.exact
    assert "scaled from 224px to 112px" in half.line()
    # no figure of this runtime: the other runtime's, flagged as indicative
    tfl = expected_latency(p, "mobilenet_v2", "tflite", "int8", 224, measured_ms=100.0)
    assert tfl is not None and not tfl.exact and tfl.verdict == "slower" and tfl.ratio == pytest.approx(10.0)
    assert "indicative only" in tfl.line() and "SLOWER than expected by 10.0x" in tfl.line()
    assert expected_latency(p, "efficientnet_lite0", "onnx", "int8", 224) is None


def test_precision_threads_and_unit_are_preferred_in_that_order(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fp32 = FIGURE.replace('precision = "int8"', 'precision = "fp32"').replace("ms = 40.0", "ms = 80.0")
    one = FIGURE.replace("threads = 4", "threads = 1").replace("ms = 40.0", "ms = 120.0")
    gpu = FIGURE.replace('unit = "cpu"', 'unit = "gpu"').replace("ms = 40.0", "ms = 5.0")
    p = _board(tmp_path, monkeypatch, fp32 + one + gpu)
    e = expected_latency(p, "mobilenet_v2", "onnx", "fp32", 224, threads=4)
    assert e is not None and e.figure.ms == 80.0 and e.verdict == "unmeasured"
    e = expected_latency(p, "mobilenet_v2", "onnx", "int8", 224, threads=1, measured_ms=30.0)
    assert e is not None and e.figure.ms == 120.0 and e.verdict == "faster"
    e = expected_latency(p, "mobilenet_v2", "onnx", "int8", 224, unit="gpu")
    assert e is not None and e.figure.ms == 5.0
    d = e.as_dict()
    assert d["figure"]["source"] == "https://example.org/bench" and d["verdict"] == "unmeasured"


def test_zero_2w_expectation_for_a_224px_mobilenet_v2() -> None:
    e = expected_latency(get_profile("raspberry-pi-zero-2w"), "mobilenet_v2", "onnx", "int8", 224, threads=4,
                         measured_ms=300.0)
    assert e is not None and e.figure.threads == 4 and e.expected_ms == pytest.approx(147.39)
    assert e.verdict == "slower" and "figure is ncnn, this run onnx" in e.notes
