"""The image modality of the export pipeline: a registry backbone (pretrained) or a fine-tuned run, the pooled
features of its last stage (or, ``multi``, of every stage), exported to ONNX as ``images (N, 3, S, S) → embeddings
(N, D)``; see :class:`ImageSource`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetl.bundle import BackboneRecord, HeadRecord
from edgetl.data import ImageFolder, load_image, scan_image_folder
from edgetl.errors import DataError, ExportValidationError
from edgetl.heads import DepthHead, SoftmaxHead
from edgetl.host.backbone import Backbone, MultiDepth, build_backbone, feature_groups
from edgetl.host.finetune import load_run
from edgetl.host.gate import FP32_TOLERANCE, Gate, embed_batches
from edgetl.host.source import OUTPUT_NAME, ExportSource, Extras, Inputs
from edgetl.metrics import compare_embeddings
from edgetl.preprocess import preprocess_batch
from edgetl.registry import BackboneSpec, Preprocessing, get_backbone
from edgetl.runtime import FeatureExtractor, load_extractor

log = logging.getLogger(__name__)

INPUT_NAME = "images"


class ImageSource(ExportSource):
    """Images: a registry backbone (``model``, at ``image_size``) or a fine-tuned ``run`` (whose classifier becomes
    the bundle's initial head); ``features`` ``last`` or ``multi``. Nothing is loaded until :meth:`prepare`."""

    modality, items, purpose = "image", "images", "calibrate and check the graphs"

    def __init__(self, model: str | None = None, run: str | os.PathLike[str] | None = None,
                 image_size: int | None = None, features: str = "last"):
        self.model, self.run, self.image_size, self.features = model, run, image_size, features

    @classmethod
    def open(cls, model: str | None, run: str | os.PathLike[str] | None, image_size: int | None,
             features: str) -> ImageSource:
        return cls(model, run, image_size, features)

    def targets(self, formats: Sequence[str], precisions: Sequence[str]) -> list[tuple[str, str]]:
        return image_targets(formats, precisions)

    def scan(self, calib: str | Path | ImageFolder) -> ImageFolder:
        return calib if isinstance(calib, ImageFolder) else scan_image_folder(calib)

    def prepare(self, data: ImageFolder, held_idx: np.ndarray, calib_idx: np.ndarray) -> Inputs:
        self.network, self.spec, self.pp, self.classes, self.record = open_network(self.model, self.run,
                                                                                   self.image_size)

        def load(indices: np.ndarray) -> np.ndarray:
            return preprocess_batch([load_image(data.samples[int(i)].path) for i in indices], self.pp)

        calib, held = load(calib_idx), load(held_idx)
        self.module, self.groups = feature_module(self.network, self.spec, self.features, self.pp.input_size)
        return Inputs(self.module, held, calib, self.pp.input_size, self.groups)

    def write_reference(self, path: Path, opset: int) -> None:
        export_onnx(self.module, path, self.pp.input_size, opset)

    def reference_parity(self, path: Path, gate: Gate) -> dict[str, Any]:
        return validate_onnx(self.module, path, gate.held, reference=gate.ref_held)

    def open_extractor(self, fmt: str, path: Path, settings: dict[str, Any]) -> FeatureExtractor:
        return load_extractor(fmt, path, entry={"layout": settings.get("layout", "NCHW")})

    def entry_io(self, settings: dict[str, Any], input_size: int) -> dict[str, Any]:
        return {"input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "layout": settings.get("layout", "NCHW"),
                "input_shape": ["batch", 3, input_size, input_size]}

    def backbone(self) -> BackboneRecord:
        return self.record

    def preprocessing(self) -> dict[str, Any]:
        return self.pp.to_dict()

    def finish(self, staging: Path, feature_dim: int) -> Extras:
        """A fine-tuned run's classifier becomes the initial head (``head.npz``, ``labels.json``)."""
        if self.classes is None:
            return Extras(feature_groups=self.groups)
        head = SoftmaxHead.from_linear(self.network.classifier.weight.detach().numpy(),
                                       self.network.classifier.bias.detach().numpy())
        if self.groups is not None:  # the classifier reads the final features: the first group of the multi-depth vector
            head = DepthHead.around(head, 0, self.groups[0]["size"], feature_dim)
        head.save(staging / "head.npz")
        (staging / "labels.json").write_text(json.dumps(self.classes) + "\n", encoding="utf-8")
        return Extras(self.classes, HeadRecord("head.npz", head.kind, "finetuned classifier"), self.groups)


def export_onnx(features: torch.nn.Module, path: Path, input_size: int, opset: int = 17) -> None:
    """Write the extractor ``(N, 3, S, S) → (N, D)`` as ONNX with a dynamic batch dimension."""
    import warnings

    dummy = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(features.eval(), (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    import onnx

    from edgetl.host.onnx_quant import portable_optimize

    portable_optimize(path, path)  # constant-fold the shape arithmetic; standard ONNX ops only
    model = onnx.load(str(path))
    fold_pads_into_convs(model)
    used_domains = {node.domain for node in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used_domains]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def fold_pads_into_convs(model: Any) -> int:
    """Fold constant zero ``Pad`` nodes (spatial pads only) into the ``Conv`` they feed, as its ``pads`` attribute.

    TensorFlow-style SAME padding exports as Pad → Conv; a separate Pad blocks runtime fusions (ONNX Runtime runs the
    QDQ convolution of an INT8 graph in float behind it). Returns the number of Pad nodes removed."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    removed = []
    for pad in graph.node:
        if pad.op_type != "Pad" or len(pad.input) < 2 or pad.input[1] not in consts:
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        value = consts.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else None
        pads = consts[pad.input[1]].astype(int).tolist()
        users = consumers.get(pad.output[0], [])
        if mode != b"constant" or (value is not None and float(value) != 0.0) or len(pads) != 8 or \
                any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0 or not users or \
                any(u.op_type != "Conv" or u.input[0] != pad.output[0] for u in users):
            continue
        top, left, bottom, right = pads[2], pads[3], pads[6], pads[7]
        for conv in users:
            old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
            kept = [a for a in conv.attribute if a.name not in ("pads", "auto_pad")]
            del conv.attribute[:]
            conv.attribute.extend(kept)
            conv.attribute.append(helper.make_attribute("pads", [old[0] + top, old[1] + left, old[2] + bottom,
                                                                 old[3] + right]))
            conv.input[0] = pad.input[0]
        removed.append(pad)
    for pad in removed:
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return len(removed)


def validate_onnx(features: torch.nn.Module, path: Path, batch: np.ndarray,
                  tolerance: dict[str, float] = FP32_TOLERANCE, reference: np.ndarray | None = None) -> dict[str, Any]:
    """Run PyTorch (unless its ``reference`` output is given) and ONNX Runtime on the same real images; raise
    :class:`ExportValidationError` when they differ."""
    if reference is None:
        with torch.no_grad():
            reference = embed_batches(lambda b: features.eval()(torch.from_numpy(b)).numpy(), batch)
    report = compare_embeddings(reference, embed_batches(load_extractor("onnx", path).embed, batch)) | \
        {"n_images": len(batch)}
    if report["max_abs_diff"] > tolerance["max_abs"] or report["min_cosine"] < tolerance["min_cosine"]:
        raise ExportValidationError(
            f"ONNX extractor differs from PyTorch: max abs diff {report['max_abs_diff']:.2e} (limit "
            f"{tolerance['max_abs']:.0e}), min cosine {report['min_cosine']:.6f} (limit {tolerance['min_cosine']}); "
            "check the opset and the model's export support")
    return report


def feature_module(backbone: Backbone, spec: BackboneSpec, features: str, input_size: int
                    ) -> tuple[torch.nn.Module, list[dict[str, Any]] | None]:
    """The module to export for ``features`` (``last`` | ``multi``) and, for ``multi``, its feature groups."""
    if features == "last":
        return backbone.features.eval(), None
    if features != "multi":
        raise DataError(f"unknown --features {features!r}; use last or multi")
    if not spec.feature_taps:
        raise DataError(f"registry entry {spec.id} names no feature_taps; multi-depth export needs them")
    groups = feature_groups(backbone, spec, spec.feature_taps, input_size)
    return MultiDepth(backbone, spec.feature_taps).eval(), groups


def open_network(model: str | None, run: str | os.PathLike[str] | None, image_size: int | None
                 ) -> tuple[Backbone, BackboneSpec, Preprocessing, list[str] | None, BackboneRecord]:
    """The network to export, its registry entry, preprocessing, classes (a fine-tuned run's; None for a pretrained
    backbone) and the manifest's record of where it came from."""
    if (model is None) == (run is None):
        raise DataError("give exactly one of --model NAME (pretrained) or --run RUN (fine-tuned)")
    if run is not None:
        backbone, spec, pp, classes = load_run(run)
        if image_size not in (None, pp.input_size):
            raise DataError(f"run {run} was trained at {pp.input_size} px; export it at that size (drop --image-size)")
        return backbone, spec, pp, classes, BackboneRecord(spec.id, "finetuned", spec.architecture,
                                                           spec.weights_sha256, run=str(run))
    spec = get_backbone(str(model))
    pp = spec.preprocessing if image_size in (None, spec.preprocessing.input_size) else \
        spec.preprocessing.with_size(int(image_size))  # type: ignore[arg-type]
    return build_backbone(spec), spec, pp, None, BackboneRecord(spec.id, "pretrained", spec.architecture,
                                                                spec.weights_sha256)


def image_targets(formats: Sequence[str], precisions: Sequence[str]) -> list[tuple[str, str]]:
    """Every (format, precision) asked for, FP32 ONNX first; tflite has no fp16 graph (skipped with a warning)."""
    targets = [("onnx", "fp32")]
    for fmt in formats:
        for prec in precisions:
            if (fmt, prec) == ("tflite", "fp16"):
                log.warning("tflite/fp16 is not exported (no fp16 path in ai-edge-quantizer for this model); skipped")
                continue
            if (fmt, prec) not in targets:
                targets.append((fmt, prec))
    return targets


__all__ = ["INPUT_NAME", "ImageSource", "export_onnx", "feature_module", "fold_pads_into_convs", "image_targets",
           "open_network", "validate_onnx"]
