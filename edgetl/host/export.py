"""Export the frozen feature extractor in every format and precision asked for, gate each graph on accuracy against
PyTorch on real held-out images, and pack a bundle.

The FP32 ONNX graph is always written: it is the reference every other graph is compared with, and the portable
fallback on any device.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetl import __version__
from edgetl.bundle import MANIFEST, SCHEMA_VERSION, Bundle, file_entry
from edgetl.data import ImageFolder, load_image, scan_image_folder, stratified_split
from edgetl.errors import BundleError, DataError, ExportValidationError
from edgetl.heads import DepthHead, SoftmaxHead
from edgetl.host.backbone import Backbone, MultiDepth, build_backbone, feature_groups
from edgetl.host.convert import ExportContext, converter
from edgetl.host.finetune import load_run
from edgetl.host.gate import FP32_TOLERANCE, Gate, GateLimits, embed_batches, golden_spec
from edgetl.metrics import compare_embeddings
from edgetl.preprocess import preprocess_batch
from edgetl.registry import BackboneSpec, Preprocessing, get_backbone
from edgetl.runtime import load_extractor

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
GOLDEN_COUNT = 2
#: held-out embeddings kept in the bundle per extractor: the device compares its local data with them (edgetl.domain)
REFERENCE_COUNT = 256
Progress = Callable[[str, int, int], None]


class QuantizationAccuracyError(ExportValidationError):
    """A reduced-precision graph failed the gate; ``report`` holds the per-graph figures and ``bundle`` the bundle
    written with the graphs that passed (None when nothing was written)."""

    def __init__(self, message: str, report: list[dict[str, Any]], bundle: Path | None = None):
        super().__init__(message)
        self.report = report
        self.bundle = bundle


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
        {"n_images": int(len(batch))}
    if report["max_abs_diff"] > tolerance["max_abs"] or report["min_cosine"] < tolerance["min_cosine"]:
        raise ExportValidationError(
            f"ONNX extractor differs from PyTorch: max abs diff {report['max_abs_diff']:.2e} (limit "
            f"{tolerance['max_abs']:.0e}), min cosine {report['min_cosine']:.6f} (limit {tolerance['min_cosine']}); "
            "check the opset and the model's export support")
    return report


def _feature_module(backbone: Backbone, spec: BackboneSpec, features: str, input_size: int
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


def _targets(formats: Sequence[str], precisions: Sequence[str]) -> list[tuple[str, str]]:
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


def export(out: str | os.PathLike[str], calib: str | os.PathLike[str] | ImageFolder, *,
           model: str | None = None, run: str | os.PathLike[str] | None = None,
           formats: Sequence[str] = ("onnx",), precisions: Sequence[str] = ("fp32",), calib_size: int = 64,
           eval_size: int = 1000, max_drop: float = 1.0, keep_failed: bool = False, image_size: int | None = None,
           opset: int = 17, force: bool = False, seed: int = 0, features: str = "last",
           min_cosine: float = GateLimits.min_mean_cosine, min_agreement: float = GateLimits.min_agreement,
           progress: Progress | None = None) -> Path:
    """Export the frozen extractor of a registry backbone (``model``) or a fine-tuned ``run`` into a bundle at ``out``.

    ``calib``: a labelled ImageFolder of real images. A stratified part (``calib_size`` images) calibrates the INT8
    quantizers; the rest (up to ``eval_size``) is held out for the FP32 parity check and the gate
    (:mod:`edgetl.host.gate`): an FP16/INT8 graph passes when its mean cosine to PyTorch FP32 reaches ``min_cosine``,
    the FP32 reference head agrees with itself on its embeddings for at least ``min_agreement`` of the images, and a
    head retrained on its embeddings (5-fold, device softmax head) loses at most ``max_drop`` points. A failed graph is
    left out, the bundle is written with the graphs that passed and :class:`QuantizationAccuracyError` names what
    failed; with ``keep_failed`` the failed graphs are kept, marked failed, and nothing is raised.
    ``features``: ``last`` (the pooled final features) or ``multi`` (those followed by the pooled output of every
    stage, described in the manifest's ``feature_groups``; the gate then holds for the whole vector and for the final
    features, and every group's drop is reported). Returns the bundle path.
    """
    if model is not None and run is None and get_backbone(str(model)).modality == "text":
        if image_size is not None or features != "last":
            raise DataError(f"{model} is a text encoder; drop --image-size and --features")
        from edgetl.host.text_export import export_text

        return export_text(out, calib, model=str(model), formats=formats, precisions=precisions,
                           calib_size=calib_size, eval_size=eval_size, keep_failed=keep_failed,
                           limits=GateLimits(max_drop, min_cosine, min_agreement),
                           opset=opset, force=force, seed=seed, progress=progress)
    progress = progress or (lambda stage, done, total: None)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise BundleError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    folder = calib if isinstance(calib, ImageFolder) else scan_image_folder(calib)
    held_idx, calib_idx = stratified_split(folder.labels, min(0.5, calib_size / len(folder)), seed)
    held_idx = held_idx[np.random.default_rng(seed).permutation(len(held_idx))[:eval_size]]
    if len(held_idx) < 10 or len(calib_idx) < 2:
        raise DataError(f"{folder.root} has {len(folder)} images; export needs at least 20 real labelled images to "
                        "calibrate and check the graphs")
    backbone, spec, pp, classes, source = _source(model, run, image_size)
    targets = _targets(formats, precisions)

    def load(indices: np.ndarray) -> np.ndarray:
        return preprocess_batch([load_image(folder.samples[int(i)].path) for i in indices], pp)

    calib_images, held_images = load(calib_idx), load(held_idx)
    features_module, groups = _feature_module(backbone, spec, features, pp.input_size)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="edgetl-export-") as scratch:
        reference_onnx = Path(scratch) / "reference.onnx"
        export_onnx(features_module, reference_onnx, pp.input_size, opset)
        gate = Gate(features_module, held_images, folder.labels[held_idx], seed, groups,
                    GateLimits(max_drop, min_cosine, min_agreement))
        parity = validate_onnx(features_module, reference_onnx, held_images, reference=gate.ref_held)
        ctx = ExportContext(features_module, reference_onnx, pp.input_size, calib_images, Path(scratch))
        golden = {"inputs": held_images[:GOLDEN_COUNT], "pytorch": gate.ref_held[:GOLDEN_COUNT]}
        reference = {"labels": folder.labels[held_idx][:REFERENCE_COUNT],
                     "pytorch": gate.ref_held[:REFERENCE_COUNT].astype(np.float16)}
        entries, failures = [], []
        for i, (fmt, prec) in enumerate(targets):
            progress("export", i, len(targets))
            entry, emb = _convert_one(ctx, staging, fmt, prec, gate)
            if not entry["report"]["passed"]:
                failures.append(entry)
                if not keep_failed:
                    discard_graph(staging, entry)
                    continue
            golden.setdefault(entry["golden"]["key"], emb[:GOLDEN_COUNT])
            reference.setdefault(entry["golden"]["key"], emb[:REFERENCE_COUNT].astype(np.float16))
            entries.append(entry)
        progress("export", len(targets), len(targets))
    np.savez(staging / "golden.npz", **golden)
    np.savez(staging / "reference.npz", **reference)

    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "edgetl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "created_unix": time.time(),
        "backbone": source | {"architecture": spec.architecture, "weights_sha256": spec.weights_sha256},
        "feature_dim": int(gate.ref_held.shape[1]), "preprocessing": pp.to_dict(),
        "extractors": entries,
        "golden": {"file": "golden.npz", "inputs": "inputs", "count": GOLDEN_COUNT},
        "reference": {"file": "reference.npz", "count": int(min(len(held_idx), REFERENCE_COUNT)),
                      "source": "held-out export images, embedded by each extractor (key: its golden key)"},
        "validation": parity | {"calibration_images": int(len(calib_idx)), "data": str(folder.root),
                                "max_drop_points": max_drop, "gate": gate.limits.to_dict()},
        "labels": classes, "head": None,
    }
    if classes is not None:
        head = SoftmaxHead.from_linear(backbone.classifier.weight.detach().numpy(),
                                       backbone.classifier.bias.detach().numpy())
        if groups is not None:  # the classifier reads the final features: the first group of the multi-depth vector
            head = DepthHead.around(head, 0, groups[0]["size"], manifest["feature_dim"])
        head.save(staging / "head.npz")
        (staging / "labels.json").write_text(json.dumps(classes) + "\n", encoding="utf-8")
        manifest["head"] = {"file": "head.npz", "kind": head.kind, "source": "finetuned classifier"}
    if groups is not None:
        manifest["feature_groups"] = groups
    place_bundle(staging, out, manifest)
    log.info("exported %s to %s: %s", spec.id, out, ", ".join(f"{e['format']}/{e['precision']}" for e in entries))
    if not keep_failed:
        refuse_failed(failures, out, "images")
    return out


def discard_graph(staging: Path, entry: dict[str, Any]) -> None:
    """Remove a failed graph's files from the staging folder (the bundle lists every file there)."""
    for name in [entry["file"], *entry.get("companions", [])]:
        (staging / name).unlink(missing_ok=True)


def refuse_failed(failures: list[dict[str, Any]], bundle: Path, items: str) -> None:
    """Graphs failed the gate and were left out of ``bundle``: raise :class:`QuantizationAccuracyError` naming them."""
    if not failures:
        return
    worst = "; ".join(f"{e['format']}/{e['precision']} failed: {e['report']['reason']}" for e in failures)
    raise QuantizationAccuracyError(f"export wrote {bundle} without the failed graphs ({worst}); give more --calib "
                                    f"{items}, or pass --keep-failed to keep them marked failed",
                                    [e["report"] | {"format": e["format"], "precision": e["precision"]}
                                     for e in failures], bundle)


def place_bundle(staging: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Record every staged file's sha256 in the manifest, check the bundle as the device will, and move it to ``out``
    (replacing what was there)."""
    manifest["files"] = {p.name: file_entry(p) for p in sorted(staging.iterdir()) if p.is_file()}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    Bundle.load(staging)  # the bundle we ship must pass the device's own checks
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


def _convert_one(ctx: ExportContext, staging: Path, fmt: str, prec: str, gate: Gate
                 ) -> tuple[dict[str, Any], np.ndarray]:
    """Write one graph into ``staging``, measure and judge it with the device runtime; return its manifest entry and
    its embeddings of the held-out images."""
    fn, filename = converter(fmt, prec)
    start = time.perf_counter()
    settings = fn(ctx, staging / filename)
    seconds = time.perf_counter() - start
    companions = list(settings.pop("companions", []))
    extractor = load_extractor(fmt, staging / filename, entry={"layout": settings.get("layout", "NCHW")})
    report, held_embeddings = gate.measure(extractor)
    size = sum((staging / f).stat().st_size for f in [filename, *companions])
    report = gate.judge(report | {"size_bytes": size, "convert_seconds": round(seconds, 2)}, prec)
    golden = golden_spec(prec, filename.replace(".", "_"), gate.ref_held[:GOLDEN_COUNT],
                         held_embeddings[:GOLDEN_COUNT])
    entry = {"file": filename, "format": fmt, "precision": prec, "companions": companions,
             "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "layout": settings.get("layout", "NCHW"),
             "input_shape": ["batch", 3, ctx.input_size, ctx.input_size], "quantization": settings, "report": report,
             "golden": golden}
    if not report["passed"]:
        entry["failed"] = True
    return entry, held_embeddings
