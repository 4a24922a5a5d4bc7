"""The manifest as typed fields (``edgetl.bundle.Manifest``): what the exporter writes, what the device reads. No torch:
the committed device bundle is the real manifest these tests read."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from edgetl.bundle import (
    MANIFEST,
    BackboneRecord,
    Bundle,
    ExtractorEntry,
    FileRecord,
    GoldenCheck,
    GoldenFile,
    HeadRecord,
    Manifest,
    UnverifiedManifest,
)
from edgetl.errors import BundleError
from tests.conftest import DEVICE_BUNDLE


def _raw(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))


def test_typed_view_writes_back_the_same_json() -> None:
    """An exported manifest read into the dataclasses and written again is the same JSON, key order included."""
    raw = _raw(DEVICE_BUNDLE)
    manifest = Bundle.load(DEVICE_BUNDLE).manifest
    assert json.dumps(manifest.to_dict(), indent=2) == json.dumps(raw, indent=2)
    assert manifest.raw == raw  # the JSON as read


def test_typed_fields_of_a_real_bundle() -> None:
    b = Bundle.load(DEVICE_BUNDLE)
    m = b.manifest
    assert m.schema_version == 1 and m.modality == "image" and m.feature_dim == b.feature_dim == 1280
    assert m.backbone.id == "mobilenet_v2" and m.backbone.source == "pretrained" and m.backbone.run is None
    assert m.head is None and m.labels is None and m.feature_groups is None
    assert isinstance(m.created_unix, float) and isinstance(m.created, str)
    assert m.golden == GoldenFile("golden.npz", 2) and m.reference is not None and m.reference.file == "reference.npz"
    entry = m.extractors[0]
    assert (entry.format, entry.precision, entry.layout, entry.failed) == ("onnx", "fp32", "NCHW", False)
    assert entry.golden == GoldenCheck("pytorch", {"max_abs": 1e-3, "min_cosine": 0.9999})
    assert entry.golden.expected == "pytorch" and entry.reason and entry.report["passed"]
    assert entry.raw == _raw(DEVICE_BUNDLE)["extractors"][0]
    assert m.files[entry.file] == FileRecord.of(DEVICE_BUNDLE / entry.file)
    assert b.preprocessing.input_size == m.preprocessing["input_size"] == 64


def test_a_built_manifest_round_trips(tmp_path: Path) -> None:
    """What the exporter does: build the dataclasses, write, and load the bundle back with the device's checks."""
    bundle = Path(shutil.copytree(DEVICE_BUNDLE, tmp_path / "b"))
    loaded = Bundle.load(bundle).manifest
    entry = loaded.extractors[0]
    built = Manifest.new(
        backbone=BackboneRecord("mobilenet_v2", "finetuned", "torchvision.mobilenet_v2", "ab" * 32, run="/runs/r1"),
        feature_dim=loaded.feature_dim, preprocessing=loaded.preprocessing,
        extractors=[ExtractorEntry(entry.file, "onnx", "fp32", "images", "embeddings",
                                   input_shape=["batch", 3, 64, 64], report={"passed": True, "reason": "ok"},
                                   golden=entry.golden),
                    replace(entry, failed=True)],
        golden=loaded.golden, reference=loaded.reference, validation={"n_images": 60}, labels=["a", "b"],
        head=HeadRecord("golden.npz", "softmax", "finetuned classifier"), files=loaded.files)
    built.write(bundle)
    raw = _raw(bundle)
    assert list(raw)[:4] == ["schema_version", "edgetl_version", "created", "created_unix"]  # no "modality": image
    assert "feature_groups" not in raw and list(raw)[-1] == "files"
    assert list(raw["backbone"]) == ["id", "source", "run", "architecture", "weights_sha256"]
    assert raw["extractors"][1]["failed"] is True and "failed" not in raw["extractors"][0]
    assert "input_names" not in raw["extractors"][0]
    again = Bundle.load(bundle).manifest
    assert again == built and again.extractors[1].failed and again.head == built.head
    text = replace(built, modality="text", feature_groups=[{"name": "last", "offset": 0, "size": 1280}])
    assert list(text.to_dict())[2] == "modality" and text.to_dict()["feature_groups"][0]["size"] == 1280


def test_old_keys_and_open_fields_stay_readable(tmp_path: Path) -> None:
    """Fields the schema check leaves open never make the typed view raise; keys it does not know stay in ``raw``."""
    bundle = Path(shutil.copytree(DEVICE_BUNDLE, tmp_path / "b"))
    raw = _raw(bundle)
    raw["backbone"] = {"id": 7}
    raw["extractors"][0] |= {"report": [1], "input_shape": 3, "future_key": 1}
    raw["golden"] = {"count": 2}  # no file: no golden vectors
    raw["reference"] = None
    raw["validation"] = "?"
    del raw["created_unix"]
    (bundle / MANIFEST).write_text(json.dumps(raw))
    b = Bundle.load(bundle)
    m = b.manifest
    assert m.backbone.id == "" and m.created_unix is None and m.golden is None and m.validation == {}
    entry = m.extractors[0]
    assert entry.report == {} and entry.input_shape == [] and entry.raw["future_key"] == 1 and entry.reason is None
    assert b.golden(entry) is None and b.reference(entry) is None
    raw["schema_version"] = 99
    (bundle / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="newer than this edgetl understands"):
        Bundle.load(bundle)


@pytest.mark.parametrize("data", [None, [], "x", {}, {"files": []}, {"created_unix": "soon"},
                                  {"created_unix": 10 ** 400, "files": {}}, {"created_unix": [1], "created": 3}])
def test_unverified_manifest_never_raises(data: object) -> None:
    claims = UnverifiedManifest.of(data)
    assert claims.created_unix == 0.0
    assert claims.listed == (frozenset() if isinstance(data, dict) and data.get("files") == {} else None)


def test_unverified_manifest_reads_what_a_bundle_claims() -> None:
    claims = UnverifiedManifest.of(_raw(DEVICE_BUNDLE))
    assert claims.listed == frozenset(Bundle.load(DEVICE_BUNDLE).manifest.files)
    assert claims.created_unix > 1.6e9 and isinstance(claims.created, str)
