"""One ``edgetl export`` request, from its options to a (signed) bundle.

What the command decides before and after the export pipeline (:func:`edgetl.host.export.export`) runs: the graph
formats and precisions (asked for, else the device profile's backends and precision, else ONNX FP32), the labelled
calibration images (asked for, else the fine-tune run's training data named in its ``run.json``, else the embedded
demo set), the signature, and what the finished bundle holds. Torch is imported only when the export runs, so this
module loads on a device too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgetl.bundle import Manifest

#: what an export writes when neither the options nor a profile say
DEFAULT_FORMATS = ("onnx",)
DEFAULT_PRECISIONS = ("fp32",)


def export_targets(formats: Sequence[str] = (), precisions: Sequence[str] = (),
                   profile: str | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The formats and precisions to export: those asked for; where none are, the device ``profile``'s backends and
    its precision; else :data:`DEFAULT_FORMATS` / :data:`DEFAULT_PRECISIONS`. An unknown profile is an error even
    when both are given."""
    if profile:
        from edgetl.profiles import get_profile

        prof = get_profile(profile)
        formats = formats or prof.backends
        precisions = precisions or (prof.precision,)
    return tuple(formats) or DEFAULT_FORMATS, tuple(precisions) or DEFAULT_PRECISIONS


def run_training_data(run: str | os.PathLike[str]) -> Path | None:
    """The ImageFolder a fine-tune ``run`` was trained on (``run.json``'s ``data``), None without a ``run.json``."""
    path = Path(run) / "run.json"
    if not path.is_file():
        return None
    return Path(json.loads(path.read_text())["data"])


def calibration_data(calib: str | os.PathLike[str] | None = None,
                     run: str | os.PathLike[str] | None = None) -> Path:
    """The labelled images that calibrate and gate the export: ``calib``; without it, the ``run``'s training data;
    where that is not there (anymore), the embedded demo training split. A text encoder's ``calib`` may be a
    ``text,label`` CSV file."""
    found = Path(calib) if calib is not None else None
    if found is None and run is not None:
        found = run_training_data(run)
    if found is None or not found.exists():
        from edgetl.demo import demo_split

        return demo_split("train")
    return found


@dataclass(frozen=True)
class ExportResult:
    """A written bundle: its folder, its manifest, the signature file (when signed) and, when some reduced-precision
    graphs failed the gate, the refusal to raise once the bundle (holding the graphs that passed) is finished."""

    bundle: Path
    manifest: Manifest
    signature: Path | None = None
    refused: Exception | None = None

    @property
    def backbone(self) -> str:
        return self.manifest.backbone.id

    @property
    def input_size(self) -> str:
        """``64 px`` for an image encoder, ``128 tokens`` for a text encoder."""
        pp = self.manifest.preprocessing
        return f"{pp['input_size']} px" if "input_size" in pp else f"{pp['max_length']} tokens"

    @property
    def extractors(self) -> list[dict[str, Any]]:
        return [e.raw for e in self.manifest.extractors]


def export_bundle(out: str | os.PathLike[str], *, model: str | None = None, run: str | os.PathLike[str] | None = None,
                  formats: Sequence[str] = (), precisions: Sequence[str] = (), calib: str | os.PathLike[str] | None = None,
                  profile: str | None = None, sign_key: str | os.PathLike[str] | None = None,
                  **options: Any) -> ExportResult:
    """Export ``model`` (a registry backbone) or a fine-tune ``run`` to the bundle ``out`` for :func:`export_targets`
    (``formats``, ``precisions``, ``profile``), calibrated on :func:`calibration_data`, then sign it with
    ``sign_key``. ``options`` go to :func:`edgetl.host.export.export` (gate limits, ``keep_failed``, ``image_size``,
    ``opset``, ``force``, ``features``, ``progress`` …). A gate refusal that still wrote a bundle comes back as
    :attr:`ExportResult.refused` (the bundle is signed all the same); any other failure is raised."""
    from edgetl.host.export import QuantizationAccuracyError
    from edgetl.host.export import export as run_export

    formats, precisions = export_targets(formats, precisions, profile)
    calib_path = calibration_data(calib, run)
    refused: QuantizationAccuracyError | None = None
    try:
        bundle = run_export(out, calib_path, model=model, run=run, formats=formats, precisions=precisions, **options)
    except QuantizationAccuracyError as exc:
        if exc.bundle is None:
            raise
        bundle, refused = exc.bundle, exc
    signature = None
    if sign_key is not None:
        from edgetl.signing import sign_bundle

        signature = sign_bundle(bundle, sign_key)
    from edgetl.bundle import Bundle

    return ExportResult(Path(bundle), Bundle.load(bundle, verify=False).manifest, signature, refused)


__all__ = ["DEFAULT_FORMATS", "DEFAULT_PRECISIONS", "ExportResult", "calibration_data", "export_bundle",
           "export_targets", "run_training_data"]
