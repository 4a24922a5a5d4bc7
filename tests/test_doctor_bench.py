"""`device doctor` and `device bench` (functional checks only; speed targets live in tools/ benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from edgetl.bench import bench
from edgetl.cli import main


def test_doctor_describes_machine_and_bundle(bundle: Path) -> None:
    res = CliRunner().invoke(main, ["device", "doctor", str(bundle), "--json"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["cores"] >= 1 and data["arch"] and data["python"].startswith("3.")
    assert "onnx" in data["runtimes"] and "CPUExecutionProvider" in data["runtimes"]["onnx"]["providers"]
    assert data["suggested_profile"] in {"generic-cpu", "x86-ground-station", "raspberry-pi-4", "raspberry-pi-5",
                                         "jetson-nano", "jetson-orin-nano"}
    assert data["extractors"] == [{"file": "extractor.onnx", "format": "onnx", "precision": "fp32", "runnable": True,
                                   "why_not": ""}]


def test_doctor_explains_a_missing_runtime(bundle: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import edgetl.doctor as doctor

    monkeypatch.setattr(doctor, "runtimes", lambda: {})
    row = doctor.bundle_report(bundle)[0]
    assert not row["runnable"] and "pip install 'edgetl[onnx]'" in row["why_not"]


def test_bench_reports_every_figure(bundle: Path, demo_train: Path) -> None:
    from edgetl.device import DeviceRuntime

    DeviceRuntime(bundle).train(demo_train)
    result = bench(bundle, batch=4, runs=10, cold_runs=1, threads=1)
    for key in ("images_per_s", "latency_ms_p50", "latency_ms_p95", "cold_start_s", "peak_rss_mb", "head_fit_s"):
        assert result[key] > 0, key
    assert result["latency_ms_p95"] >= result["latency_ms_p50"]
    assert result["head_fit_n"] == 300 and result["threads"] == 1


def test_cli_start_does_not_import_heavy_modules() -> None:
    code = ("import sys; from edgetl.cli import main; "
            "heavy = [m for m in ('numpy', 'onnxruntime', 'PIL', 'openvino', 'torch', 'ai_edge_litert') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bench_prints_the_profiles_expected_latency_and_a_verdict(bundle: Path) -> None:
    common = [str(bundle), "--runs", "10", "--batch", "2", "--threads", "1", "--profile", "raspberry-pi-zero-2w"]
    res = CliRunner().invoke(main, ["device", "bench", *common])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    expected = next(line for line in lines if line.startswith("expected"))
    # the 64 px test bundle against the Zero 2 W's 224 px one-thread MobileNetV2 figure, scaled by pixels
    assert "ncnn fp32 cpu, 224px, 1 thread: 274.23 ms" in expected and "github.com/Tencent/ncnn" in expected
    assert any("scaled from 224px to 64px" in line for line in lines)
    verdict = next(line for line in lines if line.startswith("verdict"))
    assert "indicative only: figure is ncnn, this run onnx" in verdict
    res = CliRunner().invoke(main, ["device", "bench", *common, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    exp = data["expected"]
    assert data["profile"] == "raspberry-pi-zero-2w" and exp["figure"]["ms"] == 274.23 and exp["scaled"]
    assert exp["expected_ms"] == round(274.23 * (64 / 224) ** 2, 3)
    assert abs(exp["ratio"] - data["latency_ms_p50"] / exp["expected_ms"]) < 0.01 * exp["ratio"] + 0.002
    assert exp["verdict"] in {"within", "slower", "faster"}


def test_bench_says_when_the_profile_has_no_figure(bundle: Path) -> None:
    res = CliRunner().invoke(main, ["device", "bench", str(bundle), "--runs", "10", "--batch", "2", "--threads", "1",
                                    "--profile", "generic-cpu"])
    assert res.exit_code == 0, res.output
    assert "expected  no published figure for this backbone in profile generic-cpu" in res.stdout
