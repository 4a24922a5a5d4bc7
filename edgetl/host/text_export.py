"""The text modality of the export pipeline: a sentence encoder (registry ``modality = "text"``) exported as token
ids + attention mask → mean-pooled, L2-normalised embedding, ONNX only (FP32, and INT8 by ONNX Runtime dynamic
quantization: the converter table's ``text`` rows), gated against PyTorch like images, with the ``tokenizer.json``
packed beside it; see :class:`TextSource`.

Inputs travel packed as int64 ``(N, 2, L)`` (ids, mask; :func:`edgetl.text.pack`), so the gate, the golden vectors and
the device's embedding store handle text exactly like images.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetl.bundle import BackboneRecord
from edgetl.data import ImageFolder
from edgetl.errors import DataError, RegistryError
from edgetl.host.convert import available
from edgetl.host.source import OUTPUT_NAME, ExportSource, Extras, Inputs
from edgetl.registry import BackboneSpec, TextPreprocessing, get_backbone, resolve_weights
from edgetl.runtime import FeatureExtractor, load_extractor
from edgetl.runtime.onnx_text import TEXT_INPUTS
from edgetl.text import load_tokenizer, read_text, scan_text_data, tokenize


class TextSource(ExportSource):
    """A registry sentence encoder; the labelled documents only judge the graphs (dynamic INT8 calibrates nothing)."""

    modality, items, purpose = "text", "documents", "check the graphs"
    #: dynamic INT8 quantizes activations per batch, so an embedding moves slightly (cosine ~0.99) with the other
    #: documents of its batch: the golden vectors are the golden inputs alone, as the device will run them
    golden_alone = True

    def __init__(self, spec: BackboneSpec):
        if not isinstance(spec.preprocessing, TextPreprocessing):
            raise RegistryError(f"{spec.id} is an {spec.modality} backbone; export it with edgetl.host.export.export")
        self.spec, self.pp = spec, spec.preprocessing

    @classmethod
    def open(cls, model: str | None, run: str | os.PathLike[str] | None, image_size: int | None,
             features: str) -> TextSource:
        if image_size is not None or features != "last":
            raise DataError(f"{model} is a text encoder; drop --image-size and --features")
        return cls(get_backbone(str(model)))

    def targets(self, formats: Sequence[str], precisions: Sequence[str]) -> list[tuple[str, str]]:
        return text_targets(formats, precisions)

    def scan(self, calib: str | Path | ImageFolder) -> ImageFolder:
        return scan_text_data(calib)

    def prepare(self, data: ImageFolder, held_idx: np.ndarray, calib_idx: np.ndarray) -> Inputs:
        self.tokenizer_file = model_folder(self.spec) / self.pp.tokenizer
        if not self.tokenizer_file.is_file():
            raise RegistryError(f"{self.spec.id}: tokenizer {self.tokenizer_file} is missing; reinstall "
                                f"{self.spec.offline.pip if self.spec.offline else self.spec.weights_url}")
        tokenizer = load_tokenizer(self.tokenizer_file, self.pp.max_length)
        # one padded array (longest document of the set); masked pooling makes the padding irrelevant. Dynamic INT8
        # needs no calibration set; the split keeps the held-out set as the image export's
        held = tokenize(tokenizer, [read_text(data.samples[int(i)].path) for i in held_idx])
        self.encoder = build_encoder(self.spec)
        return Inputs(Packed(self.encoder).eval(), held, held[:0], 0)

    def write_reference(self, path: Path, opset: int) -> None:
        export_text_onnx(self.encoder, path, opset)

    def open_extractor(self, fmt: str, path: Path, settings: dict[str, Any]) -> FeatureExtractor:
        return load_extractor(fmt, path, modality="text")

    def entry_io(self, settings: dict[str, Any], input_size: int) -> dict[str, Any]:
        return {"input_name": TEXT_INPUTS[0], "input_names": list(TEXT_INPUTS), "output_name": OUTPUT_NAME,
                "layout": "NL", "input_shape": ["batch", "tokens"]}

    def finish_report(self, report: dict[str, Any]) -> dict[str, Any]:
        report["n_documents"] = report.pop("n_images")
        return report

    def backbone(self) -> BackboneRecord:
        return BackboneRecord(self.spec.id, "pretrained", self.spec.architecture, self.spec.weights_sha256)

    def preprocessing(self) -> dict[str, Any]:
        return self.pp.to_dict()

    def finish(self, staging: Path, feature_dim: int) -> Extras:
        """The tokenizer travels with the bundle."""
        shutil.copyfile(self.tokenizer_file, staging / self.pp.tokenizer)
        return Extras()


def text_targets(formats: Sequence[str], precisions: Sequence[str]) -> list[tuple[str, str]]:
    """FP32 and every precision asked for, as (format, precision) rows of the converter table's ``text`` rows;
    anything else is a :class:`DataError`."""
    rows = available("text")
    bad = sorted(set(formats) - {f for f, _ in rows})
    if bad:
        raise DataError(f"text encoders are exported to ONNX only (asked for {', '.join(bad)}); drop --format or "
                        "use --format onnx")
    wanted = ["fp32", *precisions]
    have = sorted({p for _, p in rows})
    unknown = sorted(set(wanted) - set(have))
    if unknown:
        raise DataError(f"text encoders are exported in {' and '.join(have)} (asked for {', '.join(unknown)})")
    return [("onnx", p) for p in dict.fromkeys(wanted)]


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


__all__ = ["Packed", "SentenceEncoder", "TextSource", "build_encoder", "export_text_onnx", "model_folder",
           "text_targets"]
