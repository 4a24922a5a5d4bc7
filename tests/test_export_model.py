"""``edgetl device export-model``: the extractor + a device head as one standard graph, on real bundles.

Every head kind is trained on the real MobileNetV2 bundle, composed into one ONNX graph and compared with
``device predict``; the graph is then run by clients that know nothing of edgetl (plain onnxruntime in a process where
edgetl cannot be imported, OpenCV's DNN module, OpenVINO and its ``benchmark_app``)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.device import DeviceRuntime
from edgetl.errors import ExportValidationError, StateError
from edgetl.export_model import HEAD_SCORES, export_model
from edgetl.registry import sha256_file

from .conftest import HAS_TORCH, SMALL

KINDS = ("softmax", "ncm", "knn", "imprint")

#: a client with no edgetl: onnxruntime + Pillow, preprocessing read from the graph's own metadata
CLIENT = r"""
import json, sys
sys.modules["edgetl"] = None  # this client cannot import edgetl
import numpy as np, onnxruntime as ort
from PIL import Image
model, paths = sys.argv[1], sys.argv[2:]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
labels, pp, spec = json.loads(meta["labels"]), json.loads(meta["preprocessing"]), json.loads(meta["input"])
size, resize = pp["input_size"], pp["resize"]
batch = []
for path in paths:
    image = Image.open(path).convert("RGB")
    ratio = resize / min(image.size)
    w, h = max(size, round(image.width * ratio)), max(size, round(image.height * ratio))
    image = image.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    if spec["dtype"] == "float32":  # normalise here: (x / scale - mean) / std, channels first
        x = (pixels.astype(np.float32) / pp["scale"] - np.float32(pp["mean"])) / np.float32(pp["std"])
        pixels = x.transpose(2, 0, 1)
    batch.append(pixels)
probs = session.run(["probabilities"], {spec["name"]: np.stack(batch)})[0]
for path, row in zip(paths, probs):
    print(json.dumps({"path": path, "label": labels[int(row.argmax())], "probabilities": row.tolist()}))
"""


def _run_client(model: Path, paths: list[Path]) -> list[dict[str, Any]]:
    result = subprocess.run([sys.executable, "-c", CLIENT, str(model), *map(str, paths)], check=False, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _device_probs(rt: DeviceRuntime, paths: list[Path], labels: list[str]) -> tuple[list[str], np.ndarray]:
    """``device predict`` (top-k = every class) as labels and a probability matrix in label order."""
    results = rt.predict(paths, top_k=len(labels))
    probs = np.zeros((len(paths), len(labels)))
    for i, r in enumerate(results):
        for t in r["top_k"]:
            probs[i, labels.index(t["label"])] = t["probability"]
    return [r["label"] for r in results], probs


@pytest.fixture(scope="module")
def heads_bundle(_pretrained_bundle: Path, tmp_path_factory: pytest.TempPathFactory,
                 demo_train: Path) -> tuple[Path, dict[str, str]]:
    """The real bundle with one head of every kind trained on the demo images (the last one, imprint, current)."""
    path = Path(shutil.copytree(_pretrained_bundle, tmp_path_factory.mktemp("export-model") / "bundle"))
    rt = DeviceRuntime(path)
    versions = {kind: rt.train(demo_train, head=kind, force=True).version for kind in KINDS}
    return path, versions


@pytest.fixture()
def check_paths(demo_test: Path) -> list[Path]:
    return sorted(demo_test.glob("*/*.png"))[::5]  # 20 held-out images, two per class


def _head(bundle: Path, version: str) -> tuple[DeviceRuntime, list[str]]:
    """A runtime whose current head is ``version`` (in a copy of the bundle), and its labels."""
    rt = DeviceRuntime(bundle)
    rt.rollback(to=version)
    return rt, rt.load_current_head()[1]


@pytest.mark.parametrize("kind", KINDS)
def test_every_head_kind_matches_device_predict(kind: str, heads_bundle: tuple[Path, dict[str, str]],
                                                tmp_path: Path, check_paths: list[Path]) -> None:
    src, versions = heads_bundle
    bundle = Path(shutil.copytree(src, tmp_path / "b"))
    rt, labels = _head(bundle, versions[kind])
    out = tmp_path / f"{kind}.onnx"
    result = export_model(bundle, out, with_preprocessing=True, images=check_paths)
    assert result.files == [out] and out.is_file()
    assert result.head_version == versions[kind] and result.head_kind == kind
    assert result.check.top1_agreement == 1.0 and result.check.max_probability_diff <= 1e-4
    assert result.check.n_images == len(check_paths)
    # the graph, run by a client without edgetl, agrees with device predict on the same image files
    device_labels, device_probs = _device_probs(rt, check_paths, labels)
    client = _run_client(out, check_paths)
    assert [c["label"] for c in client] == device_labels
    assert np.abs(np.array([c["probabilities"] for c in client]) - device_probs).max() <= 1e-4


def test_float_input_graph_with_novelty_and_named_version(heads_bundle: tuple[Path, dict[str, str]],
                                                          tmp_path: Path, check_paths: list[Path]) -> None:
    """Without --with-preprocessing the graph takes the normalised NCHW floats (checked on the golden inputs too);
    --novelty adds the novelty score and the unknown flag; --version exports a head that is not current."""
    import onnxruntime as ort

    from edgetl.data import load_image
    from edgetl.preprocess import preprocess_batch

    src, versions = heads_bundle
    bundle = Path(shutil.copytree(src, tmp_path / "b"))
    out = tmp_path / "softmax.onnx"
    result = export_model(bundle, out, version=versions["softmax"], novelty=True, images=check_paths)
    assert result.check.n_golden == 2 and result.outputs == ["probabilities", "novelty", "unknown"]
    assert result.check.max_novelty_rel_diff is not None and result.check.max_novelty_rel_diff <= 1e-3
    rt = DeviceRuntime(bundle)
    head, _ = rt.versions.load(versions["softmax"])
    novelty = rt.novelty_model(versions["softmax"])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    x = preprocess_batch([load_image(p) for p in check_paths], rt.bundle.preprocessing)
    probs, score, unknown = session.run(None, {"images": x})
    X = rt.embed_arrays(x)
    temperature = rt.state.meta(versions["softmax"])["temperature"]
    from edgetl.novelty import calibrated_proba

    assert np.abs(probs - calibrated_proba(head, X, temperature)).max() <= 1e-4
    assert np.allclose(score, novelty.score(X), rtol=1e-3)
    assert (unknown == (novelty.score(X) > novelty.threshold)).all()


def test_metadata_describes_the_graph(heads_bundle: tuple[Path, dict[str, str]], tmp_path: Path,
                                      check_paths: list[Path]) -> None:
    import onnxruntime as ort

    src, versions = heads_bundle
    bundle = Path(shutil.copytree(src, tmp_path / "b"))
    out = tmp_path / "m.onnx"
    export_model(bundle, out, version=versions["knn"], with_preprocessing=True, images=check_paths)
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    manifest = json.loads((bundle / "manifest.json").read_text())
    classes = json.loads((bundle / "state" / "heads" / versions["knn"] / "meta.json").read_text())["classes"]
    assert json.loads(meta["labels"]) == classes
    assert json.loads(meta["preprocessing"]) == manifest["preprocessing"]
    assert meta["input_size"] == str(SMALL) and json.loads(meta["mean"]) == manifest["preprocessing"]["mean"]
    assert json.loads(meta["std"]) == manifest["preprocessing"]["std"]
    assert meta["channel_order"] == "RGB" and meta["layout"] == "NHWC" and meta["preprocessing_in_graph"] == "true"
    assert json.loads(meta["input"])["dtype"] == "uint8"
    assert meta["backbone_id"] == "mobilenet_v2"
    assert meta["backbone_weights_sha256"] == manifest["backbone"]["weights_sha256"]
    assert meta["head_version"] == versions["knn"] and meta["head_kind"] == "knn"
    assert meta["bundle_manifest_sha256"] == sha256_file(bundle / "manifest.json")
    assert meta["extractor_sha256"] == manifest["files"]["extractor.onnx"]["sha256"]
    from edgetl import __version__

    assert meta["edgetl_version"] == __version__


def test_a_wrong_graph_is_refused_and_nothing_written(heads_bundle: tuple[Path, dict[str, str]], tmp_path: Path,
                                                      check_paths: list[Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: a softmax head composed without its bias is a real, different graph; the check refuses it."""
    src, versions = heads_bundle
    bundle = Path(shutil.copytree(src, tmp_path / "b"))

    def no_bias(g: Any, head: Any, x: str) -> str:
        z = g.op("Div", g.op("Sub", x, g.const(head.mean_)), g.const(head.scale_))
        return g.op("MatMul", z, g.const(np.ascontiguousarray(head.coef_.T)))  # type: ignore[no-any-return]

    monkeypatch.setitem(HEAD_SCORES, "softmax", no_bias)
    out = tmp_path / "wrong.onnx"
    with pytest.raises(ExportValidationError, match="disagrees with device predict.*nothing written"):
        export_model(bundle, out, version=versions["softmax"], images=check_paths)
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_cli(heads_bundle: tuple[Path, dict[str, str]], tmp_path: Path, demo_test: Path) -> None:
    src, versions = heads_bundle
    bundle = Path(shutil.copytree(src, tmp_path / "b"))
    out = tmp_path / "cli.onnx"
    res = _cli("device", "export-model", str(bundle), "--out", str(out), "--images", str(demo_test / "bag"),
               "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["path"] == str(out) and data["head_version"] == versions["imprint"]  # the current head
    assert data["check"]["top1_agreement"] == 1.0 and data["check"]["n_images"] == 10
    res = _cli("device", "export-model", str(bundle), "--out", str(tmp_path / "x.onnx"), "--version", "v0999")
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "v0999" in res.output
    res = _cli("device", "export-model", str(bundle), "--out", str(tmp_path / "x.tflite"), "--format", "tflite")
    assert res.exit_code == 2  # not offered: no torch-free ONNX → TFLite converter
    res = _cli("device", "export-model", str(bundle), "--out", str(tmp_path / "missing" / "x.onnx"))
    assert res.exit_code == 1 and "does not exist" in res.output
    (tmp_path / "folder.onnx").mkdir()  # a folder where the file should go: refused before any work, nothing left
    res = _cli("device", "export-model", str(bundle), "--out", str(tmp_path / "folder.onnx"))
    assert res.exit_code == 1 and "is a folder" in res.output and "unexpected" not in res.output
    assert not list(tmp_path.glob(".folder.onnx*"))
    link = tmp_path / "link.onnx"  # a link at --out is replaced by the file, its target left alone
    target = tmp_path / "target.txt"
    target.write_text("keep")
    link.symlink_to(target)
    res = _cli("device", "export-model", str(bundle), "--out", str(link), "--images", str(demo_test / "bag"))
    assert res.exit_code == 0, res.output
    assert not link.is_symlink() and target.read_text() == "keep"


def test_no_head_is_one_line(bundle: Path, tmp_path: Path) -> None:
    res = _cli("device", "export-model", str(bundle), "--out", str(tmp_path / "x.onnx"))
    assert res.exit_code == 1 and res.output.startswith("error:") and "device train" in res.output
    with pytest.raises(StateError):
        export_model(bundle, tmp_path / "x.onnx")


def test_export_model_runs_without_torch(heads_bundle: tuple[Path, dict[str, str]], tmp_path: Path,
                                         demo_test: Path) -> None:
    src, _ = heads_bundle
    bundle = Path(shutil.copytree(src, tmp_path / "b"))
    code = f"""
import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None
from click.testing import CliRunner
from edgetl.cli import main
res = CliRunner().invoke(main, ["device", "export-model", {str(bundle)!r}, "--out", {str(tmp_path / 'n.onnx')!r},
                                "--with-preprocessing", "--images", {str(demo_test / 'coat')!r}])
assert res.exit_code == 0, res.output
loaded = [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in ('torch', 'torchvision')]
assert not loaded, loaded
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr + result.stdout


@pytest.mark.stream
def test_opencv_dnn_runs_the_graph(heads_bundle: tuple[Path, dict[str, str]], tmp_path: Path,
                                   check_paths: list[Path]) -> None:
    """OpenCV's DNN module reads the exported graph and agrees with device predict (every head kind in one graph
    each; OpenCV takes the uint8 pixels of the --with-preprocessing graph as a 4-D blob)."""
    cv2 = pytest.importorskip("cv2")
    from edgetl.data import load_image
    from edgetl.preprocess import crop_image

    src, versions = heads_bundle
    bundle = Path(shutil.copytree(src, tmp_path / "b"))
    for kind in KINDS:
        rt, labels = _head(bundle, versions[kind])
        out = tmp_path / f"{kind}.onnx"
        export_model(bundle, out, with_preprocessing=True, images=check_paths)
        net = cv2.dnn.readNetFromONNX(str(out))
        net.setInput(np.stack([crop_image(load_image(p), rt.bundle.preprocessing) for p in check_paths]))
        probs = net.forward("probabilities")
        device_labels, device_probs = _device_probs(rt, check_paths, labels)
        assert [labels[i] for i in probs.argmax(axis=1)] == device_labels, kind
        assert np.abs(probs - device_probs).max() <= 1e-4, kind


@pytest.mark.openvino
def test_openvino_ir_with_rt_info_and_benchmark_app(heads_bundle: tuple[Path, dict[str, str]], tmp_path: Path,
                                                     check_paths: list[Path]) -> None:
    ov = pytest.importorskip("openvino")
    from edgetl.data import load_image
    from edgetl.preprocess import crop_image

    src, versions = heads_bundle
    bundle = Path(shutil.copytree(src, tmp_path / "b"))
    rt, labels = _head(bundle, versions["ncm"])
    out = tmp_path / "ncm.xml"
    result = export_model(bundle, out, fmt="openvino", with_preprocessing=True, novelty=True, images=check_paths)
    assert result.files == [out, out.with_suffix(".bin")] and result.check.max_probability_diff <= 1e-4
    model = ov.Core().read_model(str(out))
    assert json.loads(model.get_rt_info(["model_info", "labels"]).astype(str)) == labels
    assert model.get_rt_info(["model_info", "head_kind"]).astype(str) == "ncm"
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    probs = compiled(np.stack([crop_image(load_image(p), rt.bundle.preprocessing) for p in check_paths]))[
        "probabilities"]
    device_labels, device_probs = _device_probs(rt, check_paths, labels)
    assert [labels[i] for i in probs.argmax(axis=1)] == device_labels
    assert np.abs(probs - device_probs).max() <= 1e-4
    app = Path(sys.executable).with_name("benchmark_app")
    if not app.is_file():
        pytest.skip("benchmark_app is not installed beside this Python (it ships in the openvino wheel)")
    res = subprocess.run([str(app), "-m", str(out), "-d", "CPU", "-niter", "20", "-nthreads", "1",
                          "-data_shape", f"[1,{SMALL},{SMALL},3]", "-hint", "none", "-api", "sync"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Throughput" in res.stdout


# ------------------------------------------------------------------ host: multi-depth and INT8 bundles (need torch)
@pytest.fixture(scope="module")
def multi_int8_bundle(tmp_path_factory: pytest.TempPathFactory, demo_train: Path) -> Path:
    if not HAS_TORCH:
        pytest.skip("needs the host extra (torch) to export a multi-depth FP32 + INT8 bundle")
    from edgetl.host.export import export

    out = tmp_path_factory.mktemp("em-multi") / "mnv2-multi"
    return export(out, demo_train, model="mobilenet_v2", image_size=SMALL, calib_size=20, eval_size=60,
                  features="multi", precisions=("fp32", "int8"), max_drop=5.0,
                  min_agreement=0.9)  # an INT8 graph is what is needed here, not the gate (tested elsewhere)


@pytest.mark.host
@pytest.mark.slow
@pytest.mark.parametrize(("precision", "kind"), [("fp32", "knn"), ("int8", "softmax")])
def test_multi_depth_heads_on_fp32_and_int8(precision: str, kind: str, multi_int8_bundle: Path, tmp_path: Path,
                                            demo_train: Path, check_paths: list[Path]) -> None:
    """Depth heads (features from every depth, selected and normalised per group) on the FP32 and the INT8 graph."""
    bundle = Path(shutil.copytree(multi_int8_bundle, tmp_path / "b"))
    rt = DeviceRuntime(bundle, backend="onnx", precision=precision)
    rt.train(demo_train, head=kind, features="multi", force=True)
    out = tmp_path / "m.onnx"
    result = export_model(bundle, out, with_preprocessing=True, novelty=True, images=check_paths)
    assert result.head_kind == f"depth/{kind}" and result.precision == precision
    assert result.check.max_probability_diff <= 1e-4 and result.check.top1_agreement == 1.0
    labels = rt.load_current_head()[1]
    device_labels, device_probs = _device_probs(rt, check_paths, labels)
    client = _run_client(out, check_paths)
    assert [c["label"] for c in client] == device_labels
    assert np.abs(np.array([c["probabilities"] for c in client]) - device_probs).max() <= 1e-4
    if precision == "int8" and importlib.util.find_spec("openvino") is not None:
        # OpenVINO runs the ONNX Runtime INT8 graph on its own int8 kernels: the looser, named limit applies
        res = export_model(bundle, tmp_path / "m.xml", fmt="openvino", images=check_paths)
        assert res.check.limit == 5e-2 and res.check.max_probability_diff <= 5e-2


def test_the_bundles_own_head(heads_bundle: tuple[Path, dict[str, str]], tmp_path: Path,
                              check_paths: list[Path]) -> None:
    """A bundle packed with a head (as `edgetl export --run` packs a fine-tuned classifier) and no device state:
    export-model composes that head with the FP32 graph."""
    from edgetl.bundle import file_entry

    src, versions = heads_bundle
    bundle = Path(shutil.copytree(src, tmp_path / "b", ignore=shutil.ignore_patterns("state")))
    head_dir = src / "state" / "heads" / versions["softmax"]
    shutil.copy(head_dir / "head.npz", bundle / "head.npz")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["labels"] = json.loads((head_dir / "meta.json").read_text())["classes"]
    manifest["head"] = {"file": "head.npz", "kind": "softmax", "source": "finetuned classifier"}
    manifest["files"]["head.npz"] = file_entry(bundle / "head.npz")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = export_model(bundle, tmp_path / "own.onnx", images=check_paths)
    assert result.head_version == "bundle" and result.precision == "fp32" and result.check.top1_agreement == 1.0
    rt = DeviceRuntime(bundle)
    device_labels, device_probs = _device_probs(rt, check_paths, manifest["labels"])
    client = _run_client(tmp_path / "own.onnx", check_paths)
    assert [c["label"] for c in client] == device_labels
    assert np.abs(np.array([c["probabilities"] for c in client]) - device_probs).max() <= 1e-4
