"""The CLI is thin: option choices come from the dispatch tables, and what `export` and `fleet` decide lives in
library modules (edgetl.export_job, edgetl.fleet_ops, edgetl._toml) that are tested here without torch or Flower."""

from __future__ import annotations

import json
import re
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgetl import _toml
from edgetl.cli import _choices, main
from edgetl.errors import DataError, ExportValidationError, RegistryError


# ------------------------------------------------------------------------------------------------ choices
def test_choices_are_the_dispatch_tables() -> None:
    from edgetl.export_model import FORMATS
    from edgetl.fleet.app import DRILLS, HEAD_KINDS, SOFTMAX_STRATEGIES
    from edgetl.heads import HEADS
    from edgetl.profiles import PRECISIONS
    from edgetl.runtime import BACKENDS

    assert _choices.backends() == list(BACKENDS) == ["onnx", "openvino", "tflite"]
    assert _choices.runtime_extras() == ["onnx", "openvino", "tflite"]
    assert _choices.precisions() == list(PRECISIONS)
    assert _choices.quantizations() == ["none", "fp16", "int8"]
    assert _choices.trainable_heads() == [k for k in HEADS if k != "depth"] == ["softmax", "ncm", "knn", "imprint"]
    assert _choices.fleet_heads() == list(HEAD_KINDS)
    assert _choices.fleet_strategies() == list(SOFTMAX_STRATEGIES)
    assert _choices.fleet_drills() == list(DRILLS)
    assert _choices.export_model_formats() == list(FORMATS) == ["onnx", "openvino"]


def test_table_choice_reads_its_table_once_when_needed() -> None:
    calls = []

    def load() -> list[str]:
        calls.append(1)
        return ["a", "b"]

    choice = _choices.TableChoice(load)
    assert calls == []
    assert choice.convert("a", None, None) == "a" and choice.choices == ("a", "b") and calls == [1]
    res = CliRunner().invoke(main, ["device", "train", "B", "--data", "D", "--head", "depth"])
    assert res.exit_code == 2 and "'depth' is not one of 'softmax', 'ncm', 'knn', 'imprint'" in res.output


@pytest.mark.host
def test_export_choices_cover_the_converter_table() -> None:
    """`export --format/--quantize` come from the device tables (torch-free); every one must have a converter."""
    from edgetl.host import convert

    keys = list(convert.CONVERTERS)  # (…, format, precision)
    assert {k[-2] for k in keys} == set(_choices.backends())
    assert {k[-1] for k in keys} == set(_choices.precisions())


# ------------------------------------------------------------------------------------------------ TOML
def test_toml_round_trips_awkward_values() -> None:
    doc = {"top": 1, "t": {"plain": "x", "quote\"key": 'a "b" \\ c', "ctl": "new\nline\ttab\x01\x7f",
                           "emoji": "\U0001F600 é", "nums": [1, -2.5, float("inf"), float("-inf")], "yes": True,
                           "deep": {"er": {"x": 0.1}}, "empty": {}}}
    text = _toml.dumps(doc, header="line one\n\nline three")
    assert text.startswith("# line one\n#\n# line three\ntop = 1\n\n[t]\n")
    assert "[t.deep.er]\n" in text and "[t.deep]" not in text and "[t.empty]\n" in text
    back = tomllib.loads(text)
    assert back == doc
    assert _toml.dumps({"n": float("nan")}) == "n = nan\n"


def test_toml_refuses_what_it_cannot_write() -> None:
    with pytest.raises(DataError, match="undecodable"):
        _toml.string("bad\udcff")
    with pytest.raises(DataError, match="cannot write"):
        _toml.value(b"bytes")
    with pytest.raises(DataError, match="cannot write"):
        _toml.dumps({"a": [{"table": 1}]})


#: the app pyproject.toml `fleet server` wrote when it formatted JSON into a template (before edgetl._toml)
OLD_APP = """\
# A Flower app (flwr run) for an edgetl fleet; written by `edgetl fleet server`.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgetl-fleet"
version = "1.0.0"
description = "edgetl head-only federated learning"
license = "Apache-2.0"
dependencies = ["edgetl[fleet]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "edgetl"

[tool.flwr.app.components]
serverapp = "edgetl.fleet.app:server_app"
clientapp = "edgetl.fleet.app:client_app"

[tool.flwr.app.config]
{config}
"""


def test_fleet_server_app_is_the_same_file(bundle: Path, tmp_path: Path) -> None:
    from dataclasses import asdict

    from edgetl.fleet_ops import write_server_app

    path, cfg = write_server_app(bundle, tmp_path / "out dir", tmp_path / "app", head="softmax", rounds=5)
    lines = [f"{k.replace('_', '-')} = {json.dumps(v)}" for k, v in asdict(cfg).items()]
    assert path == tmp_path / "app" / "pyproject.toml"
    assert path.read_text(encoding="utf-8") == OLD_APP.format(config="\n".join(lines))
    config = tomllib.loads(path.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    assert config["out"] == str((tmp_path / "out dir").resolve()) and config["rounds"] == 5
    assert config["sign-key"] == "" and config["head"] == "softmax"


def test_supernode_command_quotes_paths_as_toml(tmp_path: Path) -> None:
    from edgetl.fleet_ops import supernode_command

    odd = tmp_path / "caf\u00e9 \U0001F600"  # JSON spelled the emoji as a surrogate pair, which TOML refuses
    cmd = supernode_command("/bin/flower-supernode", odd, "host:9092", insecure=True, port=9095, drill="nan")
    assert cmd[:4] == ["/bin/flower-supernode", "--superlink", "host:9092", "--node-config"]
    assert cmd[5:] == ["--insecure", "--port", "9095"]
    pairs = re.findall(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)", cmd[4])  # how flwr's parse_config_args reads it
    parsed = tomllib.loads("\n".join(f"{k} = {v}" for k, v in pairs))
    assert parsed == {"bundle": str(odd.resolve()), "drill": "nan"}
    plain = supernode_command("x", tmp_path, "h:1", root_certificates=tmp_path / "ca.crt", auth_key=tmp_path / "k")
    assert plain[4] == f'bundle="{tmp_path.resolve()}"'
    assert plain[5:] == ["--root-certificates", str((tmp_path / "ca.crt").resolve()), "--auth-supernode-private-key",
                         str((tmp_path / "k").resolve())]


# ------------------------------------------------------------------------------------------------ export
def test_export_targets_from_options_then_profile_then_defaults() -> None:
    from edgetl.export_job import export_targets

    assert export_targets() == (("onnx",), ("fp32",))
    assert export_targets(("tflite",), ("int8",), "raspberry-pi-5") == (("tflite",), ("int8",))
    assert export_targets(profile="raspberry-pi-5") == (("tflite", "onnx"), ("int8",))
    assert export_targets(("openvino",), profile="jetson-nano") == (("openvino",), ("fp16",))
    with pytest.raises(RegistryError, match="unknown device profile 'toaster'"):
        export_targets(("onnx",), ("fp32",), "toaster")


def test_calibration_data_falls_back_to_the_run_then_the_demo_set(tmp_path: Path) -> None:
    from edgetl.demo import demo_split
    from edgetl.export_job import calibration_data

    run, data = tmp_path / "run", tmp_path / "data"
    run.mkdir()
    assert calibration_data(None, run) == demo_split("train")  # no run.json
    (run / "run.json").write_text(json.dumps({"data": str(data)}))
    assert calibration_data(None, run) == demo_split("train")  # the run's data is gone
    data.mkdir()
    assert calibration_data(None, run) == data
    assert calibration_data(tmp_path / "given", run) == demo_split("train")  # given but absent: the demo set
    assert calibration_data(data, None) == data
    assert calibration_data() == demo_split("train")


class _Refused(ExportValidationError):
    def __init__(self, message: str, bundle: Path | None) -> None:
        super().__init__(message)
        self.bundle = bundle


def _fake_exporter(monkeypatch: pytest.MonkeyPatch, calls: list[dict[str, Any]], refuse: bool = False,
                   written: bool = True) -> None:
    """Stand in for edgetl.host.export (torch) with a module that writes a minimal bundle folder."""

    def export(out: Path, calib: Path, **kwargs: Any) -> Path:
        calls.append({"out": out, "calib": calib, **kwargs})
        out = Path(out)
        out.mkdir(parents=True)
        # a real exporter's manifest (the committed 64-px MobileNetV2 bundle: one onnx/fp32 graph)
        (out / "manifest.json").write_bytes((Path(__file__).parent / "data" / "device-bundle" / "mnv2-64" /
                                             "manifest.json").read_bytes())
        if refuse:
            raise _Refused("without the failed graphs (onnx/int8 failed: too far)", out if written else None)
        return out

    fake = types.ModuleType("edgetl.host.export")
    fake.export = export  # type: ignore[attr-defined]
    fake.QuantizationAccuracyError = _Refused  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edgetl.host.export", fake)


def test_export_command_prints_signs_and_passes_the_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgetl.signing import generate_keys

    calls: list[dict[str, Any]] = []
    _fake_exporter(monkeypatch, calls)
    key, _ = generate_keys(tmp_path / "key")
    out = tmp_path / "b"
    res = CliRunner().invoke(main, ["export", "--model", "mobilenet_v2", "--out", str(out), "--profile",
                                    "raspberry-pi-4", "--quantize", "none", "--sign", str(key), "--quiet"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == f"exported {out} (mobilenet_v2, 64 px)" and lines[1].startswith("graph")
    assert "onnx/fp32" in lines[2] and lines[-1] == f"signed with {key} ({out / 'manifest.sig'})"
    assert (out / "manifest.sig").is_file()
    (call,) = calls
    assert call["formats"] == ("tflite", "onnx") and call["precisions"] == ("fp32",)
    assert call["model"] == "mobilenet_v2" and call["run"] is None and call["calib_size"] == 64


def test_export_refusal_finishes_the_bundle_then_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgetl.export_job import export_bundle

    calls: list[dict[str, Any]] = []
    _fake_exporter(monkeypatch, calls, refuse=True)
    res = CliRunner().invoke(main, ["export", "--model", "m", "--out", str(tmp_path / "b"), "--quiet"])
    assert res.exit_code == 1 and res.stdout.startswith(f"exported {tmp_path / 'b'}")
    assert res.stderr.strip() == "error: without the failed graphs (onnx/int8 failed: too far)"
    _fake_exporter(monkeypatch, calls, refuse=True, written=False)
    with pytest.raises(_Refused):
        export_bundle(tmp_path / "c", model="m")
    _fake_exporter(monkeypatch, calls, refuse=True)
    result = export_bundle(tmp_path / "d", model="m", formats=("openvino",))
    assert isinstance(result.refused, _Refused) and result.backbone == "mobilenet_v2"
    assert result.input_size == "64 px" and result.signature is None and calls[-1]["formats"] == ("openvino",)
