"""Every user-given name is validated: version names, input files (regular files only), control characters in
messages, --threads, and the ranges of the manifest's numbers."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgetl.bundle import Bundle
from edgetl.cli import main, one_line
from edgetl.errors import BundleError, DataError, StateError
from edgetl.runtime.base import available_cores, cap_threads
from edgetl.state import DeviceState, check_version


# --------------------------------------------------------------------------------------------------- version names
@pytest.mark.parametrize("name", ["../../../x", "/etc/passwd", "v0001/../../x", "v0001\n", "v1", "v²³⁴⁵", "", "bundle"])
def test_state_refuses_names_that_are_no_version(name: str, tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "state")
    for call in (state.meta, state.head_file, state.train_keys, state.train_labels):
        with pytest.raises(StateError, match="is not a head version name"):
            call(name)


@pytest.mark.parametrize("content", [b"", b"\x93NUMPY\x01\x00", b"\x00" * 64, b"not an array at all"])
def test_unreadable_training_keys_read_as_unknown(content: bytes, tmp_path: Path) -> None:
    """An empty, truncated or foreign train_keys.npy / train_labels.npy reads as unknown (None), as a missing one does:
    an empty file used to raise EOFError, which the console's queue page (reading the keys on every request) passed
    on as a failed request."""
    state = DeviceState(tmp_path / "state")
    folder = state.version_dir("v0001")
    folder.mkdir(parents=True)
    for name in ("train_keys.npy", "train_labels.npy"):
        (folder / name).write_bytes(content)
    assert state.train_keys("v0001") is None and state.train_labels("v0001") is None


def test_version_names() -> None:
    assert check_version("v0001") == "v0001" and check_version("v12345") == "v12345"
    assert check_version("bundle", bundle_head=True) == "bundle"
    with pytest.raises(StateError, match=r"'\.\./x' is not a head version name; versions are named like v0001"):
        check_version("../x", bundle_head=True)


def test_current_pointer_naming_a_path_is_refused(tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "state")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "current").write_text("../../../x")
    with pytest.raises(StateError, match=r"holds '\.\./\.\./\.\./x', not a head version name"):
        state.current()
    (tmp_path / "state" / "current").write_text("bundle\n")
    assert state.current() == "bundle"
    with pytest.raises(StateError):
        state.set_current("../x")


def test_versions_ignore_odd_folders(tmp_path: Path) -> None:
    for name in ("v0001", "v0002", "v²³", "vx", ".v0003.12.tmp"):
        (tmp_path / "state" / "heads" / name).mkdir(parents=True)
    assert DeviceState(tmp_path / "state").versions() == ["v0001", "v0002"]


def test_rollback_to_a_path_is_refused(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "x"
    outside.mkdir()
    res = CliRunner().invoke(main, ["device", "rollback", str(bundle), "--to", "../../../x"])
    assert res.exit_code == 1
    assert res.stderr.strip() == ("error: '../../../x' is not a head version name; versions are named like v0001 ('bundle' "
                                  "is the bundle's own head) — see `edgetl device history`")
    assert not (bundle / "state" / "current").exists()


# ------------------------------------------------------------------------------------------ one line per message
def test_one_line_escapes_control_characters() -> None:
    assert one_line("a\nerror: b") == "a\\nerror: b"
    assert one_line("x\r\x1b[31m\x00\t") == "x\\r\\x1b[31m\\x00\\t"
    assert one_line("evil\u202egnp.exe \u2028 \udcff") == "evil\\u202egnp.exe \\u2028 \\udcff"
    assert one_line("café 猫 🐈 ok") == "café 猫 🐈 ok"


def test_cli_error_naming_a_newline_file_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["device", "info", str(tmp_path / "b\nerror: all fine\x1b[2J")])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: bundle ")
    assert "b\\nerror: all fine\\x1b[2J does not exist" in res.stderr


def test_predict_names_a_newline_file_on_one_line(bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    CliRunner().invoke(main, ["device", "train", str(bundle), "--data", str(demo_train), "--quiet"])
    bad = tmp_path / "a\nerror: b.png"
    bad.write_bytes(b"not an image")
    res = CliRunner().invoke(main, ["device", "predict", str(bundle), str(bad)])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1
    assert "a\\nerror: b.png is not a PNG, JPEG" in res.stderr
    good = tmp_path / "c\nbag 1.000.png"
    shutil.copy(next(demo_train.glob("bag/*.png")), good)
    res = CliRunner().invoke(main, ["device", "predict", str(bundle), str(good)])
    assert res.exit_code == 0 and res.stdout.count("\n") == 1 and "c\\nbag 1.000.png: " in res.stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_predict_refuses_a_fifo(bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    CliRunner().invoke(main, ["device", "train", str(bundle), "--data", str(demo_train), "--quiet"])
    os.mkfifo(tmp_path / "pipe.png")
    res = CliRunner().invoke(main, ["device", "predict", str(bundle), str(tmp_path / "pipe.png")])
    assert res.exit_code == 1
    assert res.stderr.strip() == f"error: image {tmp_path / 'pipe.png'} is a FIFO, not a regular file; refusing it — " \
                                 "pass image files"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_text_reader_refuses_a_fifo(tmp_path: Path) -> None:
    from edgetl.text import read_text

    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(DataError, match="is a FIFO"):
        read_text(tmp_path / "pipe.txt")
    (tmp_path / "ok.txt").write_text("hello")
    assert read_text(tmp_path / "ok.txt") == "hello"


# ------------------------------------------------------------------------------------------------------- --threads
def test_threads_are_capped_at_the_cores(caplog: pytest.LogCaptureFixture) -> None:
    cores = available_cores()
    with caplog.at_level(logging.WARNING):
        assert cap_threads(10_000) == cores
    assert f"10000 threads asked for, but this machine has {cores} CPU cores; using {cores}" in caplog.text
    caplog.clear()
    assert cap_threads(1) == 1 and cap_threads(None) is None and not caplog.records


def test_cli_threads_10000(bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        res = CliRunner().invoke(main, ["device", "info", str(bundle), "--threads", "10000", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["selected"]["threads"] == available_cores()
    assert "10000 threads asked for" in caplog.text


def test_api_threads_are_capped(bundle: Path) -> None:
    from edgetl.device import DeviceRuntime

    assert DeviceRuntime(bundle, threads=10_000).threads == available_cores()


# ------------------------------------------------------------------------------------------------- manifest ranges
def _minimal() -> dict[str, Any]:
    return {"schema_version": 1, "backbone": {"id": "x"}, "feature_dim": 8,
            "preprocessing": {"input_size": 32, "resize": 37, "interpolation": "bilinear", "channels": "RGB",
                              "layout": "NCHW", "scale": 255.0, "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]},
            "extractors": [{"file": "e.onnx", "format": "onnx", "precision": "fp32", "input_name": "i",
                            "output_name": "o", "golden": {"key": "k", "tolerance": {"max_abs": 1e-3}}}],
            "files": {"e.onnx": {"sha256": "0" * 64, "size": 1}}, "labels": ["a", "b"], "created_unix": 1.7e9}


def _load(tmp_path: Path, manifest: dict[str, Any] | str) -> Bundle:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (tmp_path / "manifest.json").write_text(text)
    return Bundle.load(tmp_path, verify=False)


def test_minimal_manifest_loads(tmp_path: Path) -> None:
    assert _load(tmp_path, _minimal()).feature_dim == 8


OUT_OF_RANGE = [
    ("feature_dim", 10 ** 30, "feature_dim is 1e\\+30"),
    ("feature_dim", 0, "feature_dim is 0"),
    ("feature_dim", True, "feature_dim is True"),
    ("preprocessing.input_size", 50_000, r"preprocessing\.input_size is 50000"),
    ("preprocessing.input_size", 0, r"preprocessing\.input_size is 0"),
    ("preprocessing.resize", -3, r"preprocessing\.resize is -3"),
    ("preprocessing.scale", 0, r"preprocessing\.scale is 0"),
    ("preprocessing.std", [0.2, 0, 0.2], r"preprocessing\.std\[1\] is 0"),
    ("preprocessing.std", [0.2, -1, 0.2], r"preprocessing\.std\[1\] is -1"),
    ("preprocessing.std", [0.2, 0.2], r"preprocessing\.std is \[0\.2, 0\.2\], expected 3 numbers"),
    ("preprocessing.mean", [0.2, 1e300, 0.2], r"preprocessing\.mean\[1\] is 1e\+300"),
    ("preprocessing.mean", [0.2, "0.3", 0.2], r"preprocessing\.mean\[1\] is '0\.3'"),
    ("preprocessing.channels", "XYZ", r"preprocessing\.channels is 'XYZ', expected one of RGB, BGR"),
    ("preprocessing.interpolation", "lanczos9", r"preprocessing\.interpolation is 'lanczos9'"),
    ("files.e.onnx.size", -1, r"files\['e\.onnx'\]\.size is -1"),
    ("files.e.onnx.sha256", "zz", r"files\['e\.onnx'\]\.sha256 is not 64 lowercase hex"),
    ("labels", ["a", 2], "labels must be at most 100000 non-empty strings"),
    ("created_unix", "yesterday", "created_unix is 'yesterday'"),
    ("golden", {"key": "k", "tolerance": {"max_abs": -1}}, r"extractors\[0\]\.golden\.tolerance\.max_abs is -1"),
]


@pytest.mark.parametrize(("field", "value", "message"), OUT_OF_RANGE)
def test_manifest_value_out_of_range(field: str, value: Any, message: str, tmp_path: Path) -> None:
    manifest = copy.deepcopy(_minimal())
    if field.startswith("files."):
        manifest["files"]["e.onnx"][field.rsplit(".", 1)[1]] = value
    elif field == "golden":
        manifest["extractors"][0]["golden"] = value
    elif "." in field:
        manifest["preprocessing"][field.split(".")[1]] = value
    else:
        manifest[field] = value
    with pytest.raises(BundleError, match=message) as info:
        _load(tmp_path, manifest)
    assert "\n" not in str(info.value) and ("re-export" in str(info.value) or "copy the bundle" in str(info.value))


@pytest.mark.parametrize(("literal", "field"), [("NaN", "std[0]"), ("Infinity", "mean[2]"), ("-Infinity", "scale")])
def test_manifest_non_finite_numbers(literal: str, field: str, tmp_path: Path) -> None:
    text = json.dumps(_minimal())  # Python's json reads NaN and Infinity literals: they must not get through
    key = field.split("[")[0]
    index = int(field[-2]) if "[" in field else None
    manifest = json.loads(text)
    if index is None:
        manifest["preprocessing"][key] = "@@"
    else:
        manifest["preprocessing"][key][index] = "@@"
    with pytest.raises(BundleError, match=rf"preprocessing\.{re.escape(field)} is -?(nan|inf),"):
        _load(tmp_path, json.dumps(manifest).replace('"@@"', literal))


def test_text_max_length_range(tmp_path: Path) -> None:
    manifest = _minimal() | {"modality": "text", "preprocessing": {"max_length": 10 ** 9, "tokenizer": "t.json"}}
    manifest["files"]["t.json"] = {"sha256": "1" * 64, "size": 2}
    with pytest.raises(BundleError, match=r"preprocessing\.max_length is 1000000000"):
        _load(tmp_path, manifest)
