"""The export pipeline, one for every modality: export the frozen feature extractor in every format and precision
asked for, gate each graph on accuracy against PyTorch on real held-out inputs, and pack a bundle.

What differs between images and text — reading the labelled data, the PyTorch module, how a graph's inputs are
described, the manifest's backbone, preprocessing and initial head — comes from an
:class:`~edgetl.host.source.ExportSource` (:data:`SOURCES`); the graphs come from the one converter table
(:mod:`edgetl.host.convert`), and the gate (:mod:`edgetl.host.gate`) judges them. The FP32 ONNX graph is always
written: it is the reference every other graph is compared with, and the portable fallback on any device.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.bundle import Bundle, ExtractorEntry, FileRecord, GoldenFile, Manifest, ReferenceFile
from edgetl.data import ImageFolder, stratified_split
from edgetl.errors import BundleError, DataError
from edgetl.host.convert import ExportContext, converter
from edgetl.host.gate import Gate, GateLimits, QuantizationAccuracyError, golden_spec
from edgetl.host.image_export import ImageSource, export_onnx, fold_pads_into_convs, validate_onnx
from edgetl.host.source import GOLDEN_COUNT, REFERENCE_COUNT, ExportSource, Inputs, Progress
from edgetl.host.text_export import TextSource
from edgetl.registry import get_backbone

log = logging.getLogger(__name__)

#: modality (the registry entry's) → its source of the export pipeline
SOURCES: dict[str, type[ExportSource]] = {"image": ImageSource, "text": TextSource}


@dataclass(frozen=True)
class ExportOptions:
    """What every modality's export takes besides its source and data."""

    formats: Sequence[str] = ("onnx",)
    precisions: Sequence[str] = ("fp32",)
    calib_size: int = 64
    eval_size: int = 1000
    keep_failed: bool = False
    opset: int = 17
    force: bool = False
    seed: int = 0
    limits: GateLimits = field(default_factory=GateLimits)


def export(out: str | os.PathLike[str], calib: str | os.PathLike[str] | ImageFolder, *,
           model: str | None = None, run: str | os.PathLike[str] | None = None,
           formats: Sequence[str] = ("onnx",), precisions: Sequence[str] = ("fp32",), calib_size: int = 64,
           eval_size: int = 1000, max_drop: float = 1.0, keep_failed: bool = False, image_size: int | None = None,
           opset: int = 17, force: bool = False, seed: int = 0, features: str = "last",
           min_cosine: float = GateLimits.min_mean_cosine, min_agreement: float = GateLimits.min_agreement,
           progress: Progress | None = None) -> Path:
    """Export the frozen extractor of a registry backbone (``model``) or a fine-tuned ``run`` into a bundle at ``out``.

    ``calib``: labelled real inputs — an ImageFolder of images, or for a text encoder documents (a folder of ``.txt``
    files per class, or a ``text,label`` CSV). A stratified part (``calib_size``) calibrates the INT8 quantizers (text:
    dynamic INT8 calibrates nothing); the rest (up to ``eval_size``) is held out for the FP32 parity check and the gate
    (:mod:`edgetl.host.gate`): an FP16/INT8 graph passes when its mean cosine to PyTorch FP32 reaches ``min_cosine``,
    the FP32 reference head agrees with itself on its embeddings for at least ``min_agreement`` of the inputs, and a
    head retrained on its embeddings (5-fold, device softmax head) loses at most ``max_drop`` points. A failed graph is
    left out, the bundle is written with the graphs that passed and :class:`QuantizationAccuracyError` names what
    failed; with ``keep_failed`` the failed graphs are kept, marked failed, and nothing is raised.
    ``features`` (images): ``last`` (the pooled final features) or ``multi`` (those followed by the pooled output of
    every stage, described in the manifest's ``feature_groups``; the gate then holds for the whole vector and for the
    final features, and every group's drop is reported). Text encoders are exported to ONNX (FP32, INT8) only.
    Returns the bundle path.
    """
    modality = get_backbone(str(model)).modality if model is not None and run is None else "image"
    source = SOURCES[modality].open(model, run, image_size, features)
    options = ExportOptions(formats, precisions, calib_size, eval_size, keep_failed, opset, force, seed,
                            GateLimits(max_drop, min_cosine, min_agreement))
    return export_source(source, out, calib, options, progress)


def export_text(out: str | os.PathLike[str], calib: str | os.PathLike[str] | ImageFolder, *, model: str,
                formats: Sequence[str] = ("onnx",), precisions: Sequence[str] = ("fp32",), calib_size: int = 64,
                eval_size: int = 1000, keep_failed: bool = False, opset: int = 17, force: bool = False, seed: int = 0,
                limits: GateLimits | None = None, progress: Progress | None = None) -> Path:
    """Export the registry text encoder ``model`` into a bundle at ``out``: :func:`export` of a text model, with the
    gate's ``limits`` given as one :class:`GateLimits`."""
    options = ExportOptions(formats, precisions, calib_size, eval_size, keep_failed, opset, force, seed,
                            limits or GateLimits())
    return export_source(TextSource(get_backbone(model)), out, calib, options, progress)


def export_source(source: ExportSource, out: str | os.PathLike[str], calib: str | os.PathLike[str] | ImageFolder,
                  options: ExportOptions, progress: Progress | None = None) -> Path:
    """The pipeline: split ``calib``, write and gate every graph of ``source``, write the bundle at ``out``."""
    progress = progress or (lambda stage, done, total: None)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not options.force:
        raise BundleError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    targets = source.targets(options.formats, options.precisions)
    data = source.scan(calib)
    held_idx, calib_idx = _split(source, data, options)
    inputs = source.prepare(data, held_idx, calib_idx)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="edgetl-export-") as scratch:
        graphs = _graphs(source, inputs, data.labels[held_idx], targets, options, staging, Path(scratch), progress)
    np.savez(staging / "golden.npz", **graphs.golden)
    np.savez(staging / "reference.npz", **graphs.reference)
    feature_dim = int(graphs.gate.ref_held.shape[1])
    extras = source.finish(staging, feature_dim)
    items = source.items
    manifest = Manifest.new(
        modality=source.modality, backbone=source.backbone(), feature_dim=feature_dim,
        preprocessing=source.preprocessing(), extractors=graphs.entries,
        golden=GoldenFile("golden.npz", GOLDEN_COUNT),
        reference=ReferenceFile("reference.npz", int(min(len(held_idx), REFERENCE_COUNT)),
                                f"held-out export {items}, embedded by each extractor (key: its golden key)"),
        validation=(graphs.parity or {}) | {f"calibration_{items}": len(calib_idx), "data": str(data.root),
                                    "max_drop_points": options.limits.max_drop, "gate": options.limits.to_dict()},
        labels=extras.labels, head=extras.head, feature_groups=extras.feature_groups)
    place_bundle(staging, out, manifest)
    log.info("exported %s to %s: %s", manifest.backbone.id, out,
             ", ".join(f"{e.format}/{e.precision}" for e in graphs.entries))
    if not options.keep_failed:
        refuse_failed(graphs.failures, out, items)
    return out


def _split(source: ExportSource, data: ImageFolder, options: ExportOptions) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, calibration) indices: a stratified split, the held-out part cut to ``eval_size`` at random."""
    held_idx, calib_idx = stratified_split(data.labels, min(0.5, options.calib_size / len(data)), options.seed)
    held_idx = held_idx[np.random.default_rng(options.seed).permutation(len(held_idx))[:options.eval_size]]
    if len(held_idx) < 10 or len(calib_idx) < 2:
        raise DataError(f"{data.root} has {len(data)} {source.items}; export needs at least 20 real labelled "
                        f"{source.items} to {source.purpose}")
    return held_idx, calib_idx


@dataclass
class _Graphs:
    """What converting and gating every target gave: the entries kept, the failures, the FP32 parity figures and
    the golden / reference arrays (key → array) of the graphs kept."""

    gate: Gate
    golden: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    parity: dict[str, Any] | None = None
    entries: list[ExtractorEntry] = field(default_factory=list)
    failures: list[ExtractorEntry] = field(default_factory=list)


def _graphs(source: ExportSource, inputs: Inputs, labels: np.ndarray, targets: list[tuple[str, str]],
            options: ExportOptions, staging: Path, scratch: Path, progress: Progress) -> _Graphs:
    """Write the reference graph, then convert, measure and judge every target into ``staging``."""
    reference_onnx = scratch / "reference.onnx"
    source.write_reference(reference_onnx, options.opset)
    gate = Gate(inputs.module, inputs.held, labels, options.seed, inputs.groups, options.limits)
    graphs = _Graphs(gate, {"inputs": inputs.held[:GOLDEN_COUNT], "pytorch": gate.ref_held[:GOLDEN_COUNT]},
                     {"labels": labels[:REFERENCE_COUNT], "pytorch": gate.ref_held[:REFERENCE_COUNT].astype(np.float16)},
                     source.reference_parity(reference_onnx, gate))
    ctx = ExportContext(inputs.module, reference_onnx, inputs.input_size, inputs.calib, scratch)
    for i, (fmt, prec) in enumerate(targets):
        progress("export", i, len(targets))
        entry, key, embeddings, golden_out = _convert_one(source, ctx, staging, fmt, prec, gate)
        if graphs.parity is None and prec == "fp32":  # the source's parity is the FP32 graph's own figures
            graphs.parity = {k: entry.report[k] for k in ("max_abs_diff", "min_cosine")} | \
                {f"n_{source.items}": len(inputs.held)}
        if entry.failed:
            graphs.failures.append(entry)
            if not options.keep_failed:
                discard_graph(staging, entry)
                continue
        graphs.golden.setdefault(key, golden_out)
        graphs.reference.setdefault(key, embeddings[:REFERENCE_COUNT].astype(np.float16))
        graphs.entries.append(entry)
    progress("export", len(targets), len(targets))
    return graphs


def _convert_one(source: ExportSource, ctx: ExportContext, staging: Path, fmt: str, prec: str, gate: Gate
                 ) -> tuple[ExtractorEntry, str, np.ndarray, np.ndarray]:
    """Write one graph into ``staging``, measure and judge it with the device runtime; return its manifest entry,
    the key of its arrays in the golden and reference files, its embeddings of the held-out inputs and its golden
    vectors."""
    fn, filename = converter(fmt, prec, source.modality)
    start = time.perf_counter()
    settings = fn(ctx, staging / filename)
    seconds = time.perf_counter() - start
    companions = list(settings.pop("companions", []))
    extractor = source.open_extractor(fmt, staging / filename, settings)
    report, held_embeddings = gate.measure(extractor)
    size = sum((staging / f).stat().st_size for f in [filename, *companions])
    report = source.finish_report(gate.judge(report | {"size_bytes": size, "convert_seconds": round(seconds, 2)},
                                             prec))
    golden_out = extractor.embed(gate.held[:GOLDEN_COUNT]) if source.golden_alone else \
        held_embeddings[:GOLDEN_COUNT]
    golden = golden_spec(prec, filename.replace(".", "_"), gate.ref_held[:GOLDEN_COUNT], golden_out)
    entry = ExtractorEntry(file=filename, format=fmt, precision=prec, companions=companions,
                           **source.entry_io(settings, ctx.input_size), quantization=settings, report=report,
                           golden=golden, failed=not report["passed"])
    return entry, golden.key, held_embeddings, golden_out


def discard_graph(staging: Path, entry: ExtractorEntry) -> None:
    """Remove a failed graph's files from the staging folder (the bundle lists every file there)."""
    for name in [entry.file, *entry.companions]:
        (staging / name).unlink(missing_ok=True)


def refuse_failed(failures: list[ExtractorEntry], bundle: Path, items: str) -> None:
    """Graphs failed the gate and were left out of ``bundle``: raise :class:`QuantizationAccuracyError` naming them."""
    if not failures:
        return
    worst = "; ".join(f"{e.format}/{e.precision} failed: {e.reason}" for e in failures)
    raise QuantizationAccuracyError(f"export wrote {bundle} without the failed graphs ({worst}); give more --calib "
                                    f"{items}, or pass --keep-failed to keep them marked failed",
                                    [e.report | {"format": e.format, "precision": e.precision} for e in failures],
                                    bundle)


def place_bundle(staging: Path, out: Path, manifest: Manifest) -> None:
    """Record every staged file's sha256 in the manifest, check the bundle as the device will, and move it to ``out``
    (replacing what was there)."""
    manifest = replace(manifest, files={p.name: FileRecord.of(p) for p in sorted(staging.iterdir()) if p.is_file()})
    manifest.write(staging)
    Bundle.load(staging)  # the bundle we ship must pass the device's own checks
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


__all__ = ["SOURCES", "ExportOptions", "QuantizationAccuracyError", "export", "export_onnx", "export_source",
           "export_text", "fold_pads_into_convs", "place_bundle", "validate_onnx"]
