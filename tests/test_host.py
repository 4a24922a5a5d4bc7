"""Host side with the real pretrained weights: ImageNet sanity, ONNX parity, fine-tune → export → device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import HAS_TORCH, make_folder

pytestmark = [pytest.mark.host, pytest.mark.skipif(not HAS_TORCH, reason="needs the host extra (torch)")]

BACKBONES = ["mobilenet_v2", "efficientnet_lite0"]


@pytest.mark.parametrize("name", BACKBONES)
def test_pretrained_model_sees_a_cat(name: str) -> None:
    import skimage.data
    import torch

    from edgetl.host.backbone import build_backbone
    from edgetl.preprocess import preprocess_image
    from edgetl.registry import get_backbone

    spec = get_backbone(name)
    model = build_backbone(spec)
    x = torch.from_numpy(preprocess_image(skimage.data.chelsea(), spec.preprocessing))[None]
    with torch.no_grad():
        top = int(model(x).argmax())
    assert 281 <= top <= 285, f"{name} says ImageNet class {top} for scikit-image's cat"


@pytest.mark.parametrize("name", BACKBONES)
def test_onnx_parity_on_real_images(name: str, tmp_path: Path, demo_test: Path) -> None:
    import skimage.data
    from PIL import Image

    from edgetl.bundle import Bundle
    from edgetl.data import scan_image_folder
    from edgetl.device import DeviceRuntime
    from edgetl.host.export import export

    data = make_folder(tmp_path / "data", {c: 4 for c in scan_image_folder(demo_test).classes}, demo_test)
    (data / "photo").mkdir()
    for i, image in enumerate([skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.coffee(),
                               skimage.data.rocket()]):
        Image.fromarray(image).save(data / "photo" / f"photo{i}.png")
    bundle = Bundle.load(export(tmp_path / "b", data, model=name, calib_size=11))
    report = bundle.manifest.validation
    assert report["n_images"] == 44 - 11  # every held-out image, the photos among them
    assert report["max_abs_diff"] < 1e-3 and report["min_cosine"] > 0.9999
    assert bundle.manifest.extractors[0].report["passed"]
    # the device's own runtime reproduces the host's golden embeddings
    assert DeviceRuntime(bundle.path).verify()["max_abs_diff"] < 1e-3


def test_export_out_of_tolerance_is_a_typed_error(tmp_path: Path) -> None:
    import torch

    from edgetl.errors import ExportValidationError
    from edgetl.host.export import export_onnx, validate_onnx
    from edgetl.preprocess import preprocess_batch
    from edgetl.registry import get_backbone

    pp = get_backbone("mobilenet_v2").preprocessing.with_size(32)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    export_onnx(net, tmp_path / "x.onnx", 32)
    batch = preprocess_batch([np.full((8, 8, 3), 128, np.uint8)] * 2, pp)
    with torch.no_grad():
        net[0].weight.mul_(1.5)  # PyTorch model now differs from the exported graph
    with pytest.raises(ExportValidationError, match="max abs diff"):
        validate_onnx(net, tmp_path / "x.onnx", batch)


def test_export_refuses_existing_folder(tmp_path: Path, demo_test: Path) -> None:
    from edgetl.errors import BundleError
    from edgetl.host.export import export

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(BundleError, match="--force"):
        export(tmp_path / "b", demo_test, model="mobilenet_v2")
    assert (tmp_path / "b" / "keep.txt").exists()


@pytest.mark.parametrize("freeze", ["head", "partial", "none"])
def test_freeze_modes_train_the_right_parameters(freeze: str) -> None:
    from edgetl.host.backbone import build_backbone
    from edgetl.host.finetune import FinetuneConfig, _param_groups
    from edgetl.registry import get_backbone

    model = build_backbone(get_backbone("mobilenet_v2"), pretrained=False)
    model.replace_classifier(3)
    groups = _param_groups(model, FinetuneConfig(model="mobilenet_v2", freeze=freeze, lr=1e-2))
    trainable = sum(p.numel() for p in model.features.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.features.parameters())
    assert {"head": trainable == 0, "partial": 0 < trainable < total, "none": trainable == total}[freeze]
    if freeze != "head":
        # the last blocks learn at a tenth of the head's rate, the whole backbone at a hundredth
        assert groups[1]["lr"] == pytest.approx({"partial": 1e-3, "none": 1e-4}[freeze])


def test_linear_probe_starts_the_classifier_from_the_frozen_features_head(demo_train: Path) -> None:
    """LP-FT: before the backbone trains, the classifier equals the softmax head fitted on the frozen features."""
    import torch

    from edgetl.data import scan_image_folder
    from edgetl.heads import SoftmaxHead
    from edgetl.host.backbone import build_backbone
    from edgetl.host.finetune import _Images, _linear_probe
    from edgetl.registry import get_backbone

    spec = get_backbone("mobilenet_v2")
    pp = spec.preprocessing.with_size(64)
    folder = scan_image_folder(demo_train)
    idx = np.arange(0, len(folder), 3)
    model = build_backbone(spec)
    model.replace_classifier(len(folder.classes))
    _linear_probe(model, folder, idx, pp, torch.device("cpu"), 0, 32)
    with torch.no_grad():
        X = torch.stack([_Images(folder, idx, pp, False, 0)[i][0] for i in range(len(idx))])
        feats = model.features(X).numpy()
        logits = model(X).numpy()
    expected = SoftmaxHead(seed=0).fit(feats, folder.labels[idx]).decision_function(feats)
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)
    assert (logits.argmax(1) == folder.labels[idx]).mean() > 0.8  # a trained head, not a random one


def test_finetune_export_device_end_to_end(tmp_path: Path, demo_train: Path, demo_test: Path) -> None:
    """Real Fashion-MNIST images: fine-tune one short epoch → export → device train → evaluate, via the CLI."""
    from click.testing import CliRunner

    from edgetl.cli import main

    runner = CliRunner()
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    res = runner.invoke(main, ["finetune", "--model", "mobilenet_v2", "--data", str(demo_train), "--out", str(run),
                               "--epochs", "1", "--freeze", "partial", "--image-size", "64", "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and 0 <= metrics["history"][0]["val_accuracy"] <= 1
    assert {"model.safetensors", "run.json", "metrics.json"} <= {p.name for p in run.iterdir()}
    res = runner.invoke(main, ["export", "--run", str(run), "--out", str(bundle)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backbone"]["source"] == "finetuned" and len(manifest["labels"]) == 10
    # the fine-tuned classifier is the bundle's initial head: the device can predict before training
    res = runner.invoke(main, ["device", "evaluate", str(bundle), "--data", str(demo_test), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["head_version"] == "bundle"
    res = runner.invoke(main, ["device", "train", str(bundle), "--data", str(demo_train), "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["device", "evaluate", str(bundle), "--data", str(demo_test), "--json"])
    result = json.loads(res.stdout)
    assert result["head_version"] == "v0001" and result["n"] == 100 and result["accuracy"] > 0.5
