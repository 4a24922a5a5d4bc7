"""Local data vs the host's reference embeddings: head update enough, or a backbone that fits the domain poorly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.device import DeviceRuntime
from edgetl.domain import DomainReference


def _clusters(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([c + 0.3 * rng.standard_normal((n, centres.shape[1])) for c in centres])


def test_domain_reference_on_synthetic_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 32)) * 2
    ref = DomainReference(_clusters(rng, centres, 40))
    same = ref.compare(_clusters(rng, centres, 20))
    other = ref.compare(_clusters(rng, rng.standard_normal((4, 32)) * 2, 20))
    assert not same["mismatch"] and "head update on the device is enough" in same["advice"]
    assert other["mismatch"] and "fine-tune the backbone on the host" in other["advice"]
    assert other["score"] > ref.threshold > same["score"]
    with pytest.raises(ValueError, match="reference embeddings"):
        DomainReference(np.zeros((2, 8)))


def test_train_reports_domain_match_and_mismatch(bundle: Path, demo_test: Path, tmp_path: Path) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    report = DeviceRuntime(bundle).train(demo_test)  # Fashion-MNIST, like the bundle's export images
    assert report.domain is not None and report.domain["mismatch"] is False
    assert report.domain["n_reference"] > 10

    photos = tmp_path / "photos"
    groups = {"colour": ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"),
              "grey": ("camera", "hubble_deep_field", "moon", "clock", "page")}
    for label, names in groups.items():
        (photos / label).mkdir(parents=True)
        for name in names:  # photos shipped with scikit-image
            Image.fromarray(getattr(skimage_data, name)()).save(photos / label / f"{name}.png")
    res = CliRunner().invoke(main, ["device", "train", str(bundle), "--data", str(photos), "--json", "--force"])
    assert res.exit_code == 0, res.stderr
    domain = json.loads(res.stdout)["domain"]
    assert domain["mismatch"] is True and domain["score"] > domain["threshold"]
    res = CliRunner().invoke(main, ["device", "train", str(bundle), "--data", str(photos), "--quiet", "--force"])
    assert "fine-tune the backbone on the host" in res.stdout


def test_bundle_without_reference_skips_the_check(bundle: Path, demo_test: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["reference"]
    del manifest["files"]["reference.npz"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert DeviceRuntime(bundle).train(demo_test).domain is None
