"""What one modality brings to the export pipeline (:mod:`edgetl.host.export`): an :class:`ExportSource`.

The pipeline is the same for every modality — split the labelled data, write the FP32 ONNX reference, gate every
graph of the one converter table (:mod:`edgetl.host.convert`) against PyTorch, write golden vectors and the
manifest. A source supplies what differs: reading the labelled data and turning it into model inputs, the PyTorch
module and its reference graph, how a graph's inputs are described, and its part of the manifest (backbone,
preprocessing, initial head, extra files). Images: :class:`edgetl.host.image_export.ImageSource`; text:
:class:`edgetl.host.text_export.TextSource`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetl.bundle import BackboneRecord, HeadRecord
from edgetl.data import ImageFolder
from edgetl.host.gate import Gate
from edgetl.runtime import FeatureExtractor

#: reference inputs (and their expected embeddings) kept in the bundle: the device's golden-vector check
GOLDEN_COUNT = 2
#: held-out embeddings kept in the bundle per extractor: the device compares its local data with them (edgetl.domain)
REFERENCE_COUNT = 256
#: ``progress(stage, done, total)``
Progress = Callable[[str, int, int], None]
OUTPUT_NAME = "embeddings"


@dataclass(frozen=True)
class Inputs:
    """A source's model inputs, ready for the gate and the converters."""

    module: torch.nn.Module  #: PyTorch extractor in eval mode, inputs → ``(N, D)``: what every graph is judged against
    held: np.ndarray  #: held-out inputs: the gate's, the golden vectors' and the reference embeddings'
    calib: np.ndarray  #: calibration inputs of the INT8 quantizers (empty where none calibrates)
    input_size: int  #: image side in pixels (0: token inputs have no fixed size)
    groups: list[dict[str, Any]] | None = None  #: a multi-depth embedding's feature groups (the gate judges each)


@dataclass(frozen=True)
class Extras:
    """A source's part of the manifest, after its files are written into the staging folder."""

    labels: list[str] | None = None
    head: HeadRecord | None = None
    feature_groups: list[dict[str, Any]] | None = None


class ExportSource(ABC):
    """One modality's part of the export (see the module docstring)."""

    modality: str  #: the manifest's ``modality`` and the converter table's first key
    items: str  #: what one input is called in messages and manifest keys ("images", "documents")
    purpose: str  #: what the held-out and calibration inputs are for, in the "too few inputs" message
    #: golden vectors: the host's output of the golden inputs run alone (as the device runs them) rather than their
    #: rows of the held-out batch (graphs whose output depends on the rest of the batch: dynamic INT8)
    golden_alone: bool = False

    @classmethod
    @abstractmethod
    def open(cls, model: str | None, run: str | os.PathLike[str] | None, image_size: int | None,
             features: str) -> ExportSource:
        """The source of :func:`edgetl.host.export.export`'s arguments (a registry ``model`` of this modality, or a
        fine-tuned ``run``); refuses the arguments that do not apply to it."""

    @abstractmethod
    def targets(self, formats: Sequence[str], precisions: Sequence[str]) -> list[tuple[str, str]]:
        """Every (format, precision) to write, FP32 ONNX first."""

    @abstractmethod
    def scan(self, calib: str | Path | ImageFolder) -> ImageFolder:
        """The labelled data set at ``calib``."""

    @abstractmethod
    def prepare(self, data: ImageFolder, held_idx: np.ndarray, calib_idx: np.ndarray) -> Inputs:
        """Build the PyTorch extractor and turn the held-out and calibration samples into its inputs."""

    @abstractmethod
    def write_reference(self, path: Path, opset: int) -> None:
        """Write the FP32 ONNX reference graph that the converters start from."""

    def reference_parity(self, path: Path, gate: Gate) -> dict[str, Any] | None:
        """The reference graph's parity with PyTorch on the held-out inputs (raising when out of tolerance), or None
        when the manifest records the FP32 graph's own gate figures instead."""
        return None

    @abstractmethod
    def open_extractor(self, fmt: str, path: Path, settings: dict[str, Any]) -> FeatureExtractor:
        """The device runtime's extractor of a converted graph (``settings``: what its converter returned)."""

    @abstractmethod
    def entry_io(self, settings: dict[str, Any], input_size: int) -> dict[str, Any]:
        """The graph's ``input_name`` (and ``input_names``), ``output_name``, ``layout`` and ``input_shape``."""

    def finish_report(self, report: dict[str, Any]) -> dict[str, Any]:
        """The gate's report of one graph, as the manifest records it."""
        return report

    @abstractmethod
    def backbone(self) -> BackboneRecord:
        """The manifest's ``backbone``."""

    @abstractmethod
    def preprocessing(self) -> dict[str, Any]:
        """The manifest's ``preprocessing``."""

    @abstractmethod
    def finish(self, staging: Path, feature_dim: int) -> Extras:
        """Write the source's own files (initial head, labels, tokenizer …) into ``staging``."""
