"""The device side never imports torch: run it in a fresh interpreter with torch blocked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BLOCK = "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=300)


def test_blocking_works() -> None:
    result = run_blocked("import torch")
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr


def test_device_modules_import_without_torch() -> None:
    result = run_blocked(
        "import edgetl, edgetl.device, edgetl.heads, edgetl.bundle, edgetl.store, edgetl.runtime.onnx, "
        "edgetl.cli, edgetl.profiles, edgetl.registry, edgetl.text, edgetl.modality, edgetl.runtime.onnx_text, "
        "edgetl.datasets.rotten_tomatoes, edgetl.domain, edgetl.report, edgetl.novelty, edgetl.heads.depth\n"
        "import edgetl.watch, edgetl.stream, edgetl.kit, edgetl.cli.field, edgetl.cli.kit\n"
        "import edgetl.fleet, edgetl.fleet.core, edgetl.fleet.app, edgetl.cli.fleet\n"
        "from edgetl import DeviceRuntime\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n")
    assert result.returncode == 0, result.stderr


def test_device_cli_runs_without_torch(bundle: Path, demo_train: Path, demo_test: Path) -> None:
    code = f"""
from click.testing import CliRunner
from edgetl.cli import main
r = CliRunner()
for args in (["device", "train", {str(bundle)!r}, "--data", {str(demo_train)!r}, "--quiet"],
             ["device", "evaluate", {str(bundle)!r}, "--data", {str(demo_test)!r}, "--json"],
             ["device", "predict", {str(bundle)!r}, {str(next(demo_test.glob('*/*.png')))!r}],
             ["device", "verify", {str(bundle)!r}], ["models", "list"]):
    res = r.invoke(main, args)
    assert res.exit_code == 0, (args, res.output, res.exception)
loaded = [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in ('torch', 'torchvision')]
assert not loaded, loaded
print("ok")
"""
    result = run_blocked(code)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_host_command_without_torch_is_one_line(tmp_path: Path) -> None:
    code = f"""
from click.testing import CliRunner
from edgetl.cli import main
res = CliRunner().invoke(main, ["export", "--model", "mobilenet_v2", "--out", {str(tmp_path / 'b')!r}])
print(res.exit_code); print(res.stderr)
"""
    result = run_blocked(code)
    lines = result.stdout.splitlines()
    assert lines[0] == "1" and "pip install 'edgetl[host]'" in lines[1], result.stdout + result.stderr
