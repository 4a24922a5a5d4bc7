"""CLI through click's CliRunner: the happy path on a real bundle and one-line errors with exit code 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from tests.conftest import make_folder


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.host
def test_models_list() -> None:
    code, out, _ = run("models", "list", "--json")
    assert code == 0
    rows = {r["id"]: r for r in json.loads(out)}
    assert rows["mobilenet_v2"]["weights"].startswith("ok")
    assert rows["efficientnet_lite0"]["feature_dim"] == 1280


def test_device_train_predict_evaluate_info(bundle: Path, demo_train: Path, demo_test: Path) -> None:
    code, out, err = run("device", "train", str(bundle), "--data", str(demo_train), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["version"] == "v0001" and report["n_train"] + report["n_val"] == 300
    code, out, err = run("device", "evaluate", str(bundle), "--data", str(demo_test), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] == 100 and result["accuracy"] > 0.5
    images = sorted(str(p) for p in (demo_test / "trouser").glob("*.png"))[:2]
    code, out, err = run("device", "predict", str(bundle), *images, "--top-k", "2", "--json")
    assert code == 0, err
    preds = [json.loads(line) for line in out.splitlines()]
    assert len(preds) == 2 and all(len(p["top_k"]) == 2 and 0 <= p["probability"] <= 1 for p in preds)
    code, out, _ = run("device", "info", str(bundle))
    assert code == 0 and "current head v0001" in out and "mobilenet_v2" in out
    code, out, _ = run("device", "verify", str(bundle))
    assert code == 0 and "golden vectors of extractor.onnx ok" in out


def test_missing_bundle(tmp_path: Path) -> None:
    code, _, err = run("device", "info", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "does not exist")


def test_tampered_bundle(bundle: Path, demo_test: Path) -> None:
    (bundle / "golden.npz").write_bytes(b"x" * (bundle / "golden.npz").stat().st_size)
    code, _, err = run("device", "predict", str(bundle), str(next(demo_test.glob("*/*.png"))))
    assert_one_line_error(code, err, "golden.npz", "sha256")


def test_predict_before_training(bundle: Path, demo_test: Path) -> None:
    code, _, err = run("device", "predict", str(bundle), str(next(demo_test.glob("*/*.png"))))
    assert_one_line_error(code, err, "no head yet", "edgetl device train")


@pytest.mark.parametrize("case", ["empty", "one-class", "corrupt"])
def test_bad_training_data(case: str, bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    expected = {"empty": "holds no images", "one-class": "1 class", "corrupt": "bad.jpg"}[case]
    if case == "one-class":
        make_folder(data, {"bag": 4}, demo_train)
    if case == "corrupt":
        make_folder(data, {"bag": 4, "coat": 4}, demo_train)
        (data / "bag" / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    code, _, err = run("device", "train", str(bundle), "--data", str(data), "--quiet")
    assert_one_line_error(code, err, expected)
    assert not (bundle / "state" / "current").exists()  # nothing half-written became current


def test_corrupt_image_at_predict(bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    assert run("device", "train", str(bundle), "--data", str(demo_train), "--quiet")[0] == 0
    bad = tmp_path / "frame.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    code, _, err = run("device", "predict", str(bundle), str(bad))
    assert_one_line_error(code, err, "frame.png")


def test_verbose_shows_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["-v", "device", "info", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_bad_flag_exits_2(bundle: Path) -> None:
    code, _, _ = run("device", "train", str(bundle), "--head", "forest", "--data", "x")
    assert code == 2


def test_fashion_mnist_converter_errors(tmp_path: Path) -> None:
    code, _, err = run("data", "fashion-mnist", "--out", str(tmp_path / "o"), "--source", str(tmp_path))
    assert_one_line_error(code, err, "dataset-fashion-mnist")


@pytest.mark.parametrize("head", ["ncm", "knn", "imprint"])
def test_other_heads_through_the_cli(head: str, bundle: Path, demo_train: Path, demo_test: Path) -> None:
    code, _, err = run("device", "train", str(bundle), "--data", str(demo_train), "--head", head, "--quiet")
    assert code == 0, err
    code, out, err = run("device", "evaluate", str(bundle), "--data", str(demo_test), "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] > 0.5
