"""Export the frozen feature extractor to ONNX, validate it against PyTorch on real images and pack a bundle."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetl import __version__
from edgetl.bundle import MANIFEST, SCHEMA_VERSION, Bundle, file_entry
from edgetl.data import load_image
from edgetl.errors import BundleError, DataError, ExportValidationError
from edgetl.heads import SoftmaxHead
from edgetl.metrics import compare_embeddings
from edgetl.host.backbone import Backbone, build_backbone
from edgetl.host.finetune import load_run
from edgetl.preprocess import preprocess_batch
from edgetl.registry import BackboneSpec, Preprocessing, get_backbone

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
#: FP32 parity: a graph must match PyTorch within these on every validation image
FP32_TOLERANCE = {"max_abs": 1e-3, "min_cosine": 0.9999}
GOLDEN_COUNT = 2


def export_onnx(features: torch.nn.Module, path: Path, input_size: int, opset: int = 17) -> None:
    """Write the extractor ``(N, 3, S, S) → (N, D)`` as ONNX with a dynamic batch dimension."""
    import warnings

    dummy = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(features.eval(), (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                          dynamo=False, do_constant_folding=True)


def _onnx_embed(path: Path, batch: np.ndarray) -> np.ndarray:
    from edgetl.runtime.onnx import OnnxExtractor

    return OnnxExtractor(path).embed(batch)


def validate_onnx(features: torch.nn.Module, path: Path, batch: np.ndarray,
                  tolerance: dict[str, float] = FP32_TOLERANCE) -> dict[str, Any]:
    """Run PyTorch and ONNX Runtime on the same real images; raise :class:`ExportValidationError` when they differ."""
    with torch.no_grad():
        reference = features.eval()(torch.from_numpy(batch)).numpy()
    report = compare_embeddings(reference, _onnx_embed(path, batch)) | {"n_images": int(len(batch))}
    if report["max_abs_diff"] > tolerance["max_abs"] or report["min_cosine"] < tolerance["min_cosine"]:
        raise ExportValidationError(
            f"ONNX extractor differs from PyTorch: max abs diff {report['max_abs_diff']:.2e} (limit "
            f"{tolerance['max_abs']:.0e}), min cosine {report['min_cosine']:.6f} (limit {tolerance['min_cosine']}); "
            "check the opset and the model's export support")
    report["reference"] = reference  # popped by the caller; kept for the golden vectors
    return report


def _source(model: str | None, run: str | os.PathLike[str] | None, image_size: int | None
            ) -> tuple[Backbone, BackboneSpec, Preprocessing, list[str] | None, dict[str, Any]]:
    if (model is None) == (run is None):
        raise DataError("give exactly one of --model NAME (pretrained) or --run RUN (fine-tuned)")
    if run is not None:
        backbone, spec, pp, classes = load_run(run)
        if image_size not in (None, pp.input_size):
            raise DataError(f"run {run} was trained at {pp.input_size} px; export it at that size (drop --image-size)")
        return backbone, spec, pp, classes, {"id": spec.id, "source": "finetuned", "run": str(run)}
    spec = get_backbone(str(model))
    pp = spec.preprocessing if image_size in (None, spec.preprocessing.input_size) else \
        spec.preprocessing.with_size(int(image_size))  # type: ignore[arg-type]
    return build_backbone(spec), spec, pp, None, {"id": spec.id, "source": "pretrained"}


def export(out: str | os.PathLike[str], validation_images: Sequence[str | os.PathLike[str]], *,
           model: str | None = None, run: str | os.PathLike[str] | None = None, image_size: int | None = None,
           opset: int = 17, force: bool = False) -> Path:
    """Export the frozen extractor of a registry backbone (``model``) or a fine-tuned ``run`` into a bundle at ``out``.

    ``validation_images``: real images (at least 2) on which the ONNX graph must match PyTorch. Returns the bundle path.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise BundleError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    if len(validation_images) < GOLDEN_COUNT:
        raise DataError(f"export needs at least {GOLDEN_COUNT} real validation images, found {len(validation_images)}")
    backbone, spec, pp, classes, source = _source(model, run, image_size)
    batch = preprocess_batch([load_image(p) for p in validation_images], pp)

    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    extractor_file = staging / "extractor.onnx"
    start = time.perf_counter()
    export_onnx(backbone.features, extractor_file, pp.input_size, opset)
    report = validate_onnx(backbone.features, extractor_file, batch)
    reference = report.pop("reference")
    report["export_seconds"] = round(time.perf_counter() - start, 2)
    np.savez(staging / "golden.npz", inputs=batch[:GOLDEN_COUNT], embeddings=reference[:GOLDEN_COUNT])

    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "edgetl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backbone": source | {"architecture": spec.architecture, "weights_sha256": spec.weights_sha256},
        "feature_dim": spec.feature_dim, "preprocessing": pp.to_dict(),
        "extractors": [{"file": "extractor.onnx", "format": "onnx", "precision": "fp32", "opset": opset,
                        "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "layout": "NCHW",
                        "input_shape": ["batch", 3, pp.input_size, pp.input_size],
                        "output_shape": ["batch", spec.feature_dim], "report": report}],
        "golden": {"file": "golden.npz", "tolerance": FP32_TOLERANCE},
        "labels": classes, "head": None,
    }
    if classes is not None:
        head = SoftmaxHead.from_linear(backbone.classifier.weight.detach().numpy(),
                                       backbone.classifier.bias.detach().numpy())
        head.save(staging / "head.npz")
        (staging / "labels.json").write_text(json.dumps(classes) + "\n", encoding="utf-8")
        manifest["head"] = {"file": "head.npz", "kind": head.kind, "source": "finetuned classifier"}
    manifest["files"] = {p.name: file_entry(p) for p in sorted(staging.iterdir()) if p.is_file()}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    Bundle.load(staging)  # the bundle we ship must pass the device's own checks

    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    log.info("exported %s to %s (max abs diff %.2e)", spec.id, out, report["max_abs_diff"])
    return out
