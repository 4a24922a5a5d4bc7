"""The bundle: the one artifact that travels from host to device.

A directory holding ``manifest.json`` and the files it lists (extractors, golden vectors, labels, initial head), each
with its sha256. Device state lives in ``state/``, outside what the manifest covers.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import BundleError, EdgeTLError
from edgetl.registry import Preprocessing, TextPreprocessing, parse_preprocessing, sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STATE_DIR = "state"

#: ranges of the manifest's numbers, checked on load: a value outside is a one-line BundleError naming the field
#: (instead of an overflow, a 30 GB buffer or pages of numpy warnings later on)
MAX_FEATURE_DIM = 1 << 16  # the multi-depth MobileNetV2 extractor has 1,992
MAX_INPUT_SIZE = 2048  # pixels per side of the model input (one image: 48 MB of float32)
MAX_CLASSES = 100_000
MAX_TEXT_LENGTH = 8192  # tokens
MAX_FILE_BYTES = 1 << 40
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _text(value: Any) -> str | None:
    """``value`` when it is a string, else None (typed views never raise on a field the schema check leaves open)."""
    return value if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


@dataclass(frozen=True)
class FileRecord:
    """The manifest's record of one bundle file (``files[name]``)."""

    sha256: str
    size: int

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        return cls(sha256_file(path), path.stat().st_size)

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class BackboneRecord:
    """Where the extractor came from (``backbone``): the registry id, ``pretrained`` or ``finetuned`` (with the run
    folder), the architecture and the sha256 of the pretrained weights."""

    id: str
    source: str
    architecture: str | None = None
    weights_sha256: str | None = None
    run: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneRecord:
        return cls(_text(d.get("id")) or "", _text(d.get("source")) or "", _text(d.get("architecture")),
                   _text(d.get("weights_sha256")), _text(d.get("run")))

    def to_dict(self) -> dict[str, Any]:
        run = {} if self.run is None else {"run": self.run}
        return {"id": self.id, "source": self.source, **run, "architecture": self.architecture,
                "weights_sha256": self.weights_sha256}


@dataclass(frozen=True)
class HeadRecord:
    """The bundle's initial head (``head``): its file, kind and where it came from."""

    file: str
    kind: str
    source: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadRecord:
        return cls(d["file"], d["kind"], _text(d.get("source")))

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "source": self.source}


@dataclass(frozen=True)
class GoldenFile:
    """The manifest's ``golden``: the ``.npz`` of reference inputs (array ``inputs``) and expected outputs."""

    file: str
    count: int
    inputs: str = "inputs"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": self.inputs, "count": self.count}


@dataclass(frozen=True)
class ReferenceFile:
    """The manifest's ``reference``: the ``.npz`` of held-out embeddings per extractor (key: its golden key)."""

    file: str
    count: int
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "count": self.count, "source": self.source}


@dataclass(frozen=True)
class GoldenCheck:
    """One extractor's golden-vector check (``extractors[i].golden``): ``key`` names the host's own output of the
    graph in the golden file; ``compare_to`` (reduced precision) names what the device's output is compared with
    (``pytorch``: the FP32 reference); ``tolerance`` holds ``max_abs`` and/or ``min_cosine``."""

    key: str
    tolerance: dict[str, float]
    compare_to: Any = None
    host_min_cosine: float | None = None

    @property
    def expected(self) -> Any:
        """The golden file's key of the outputs the device must reproduce."""
        return self.key if self.compare_to is None else self.compare_to

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GoldenCheck:
        return cls(d["key"], dict(d["tolerance"]), d.get("compare_to"), d.get("host_min_cosine"))

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.compare_to is None else {"compare_to": self.compare_to}
        if self.host_min_cosine is not None:
            extra["host_min_cosine"] = self.host_min_cosine
        return {"key": self.key, **extra, "tolerance": dict(self.tolerance)}


@dataclass(frozen=True)
class ExtractorEntry:
    """One exported feature extractor graph in the bundle (``extractors[i]``)."""

    file: str
    format: str
    precision: str
    input_name: str
    output_name: str
    layout: str = "NCHW"
    report: dict[str, Any] = field(default_factory=dict)  #: the export gate's figures and verdict (``reason``)
    companions: list[str] = field(default_factory=list)  #: other files of the graph (OpenVINO ``.bin``)
    input_names: list[str] | None = None  #: every input, where the graph takes more than one (text: ids, mask)
    input_shape: list[Any] = field(default_factory=list)
    quantization: dict[str, Any] = field(default_factory=dict)  #: the converter's settings
    golden: GoldenCheck | None = None
    failed: bool = False  #: failed the export gate, kept with ``--keep-failed``
    _json: dict[str, Any] | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def raw(self) -> dict[str, Any]:
        """The entry as JSON: as read from the manifest (keys of other edgetl versions included), or as written."""
        return self._json if self._json is not None else self.to_dict()

    @property
    def reason(self) -> str | None:
        """The export gate's verdict in words (None in bundles without a gate report)."""
        return _text(self.report.get("reason"))

    @classmethod
    def from_dict(cls, e: dict[str, Any]) -> ExtractorEntry:
        names = e.get("input_names")
        entry = cls(e["file"], e["format"], e["precision"], e["input_name"], e["output_name"], e.get("layout", "NCHW"),
                    _dict(e.get("report")), list(e.get("companions", [])),
                    list(names) if isinstance(names, list) else None, _list(e.get("input_shape")),
                    _dict(e.get("quantization")),
                    GoldenCheck.from_dict(e["golden"]) if e.get("golden") is not None else None, bool(e.get("failed")))
        object.__setattr__(entry, "_json", e)
        return entry

    def to_dict(self) -> dict[str, Any]:
        names = {} if self.input_names is None else {"input_names": list(self.input_names)}
        entry = {"file": self.file, "format": self.format, "precision": self.precision,
                 "companions": list(self.companions), "input_name": self.input_name, **names,
                 "output_name": self.output_name, "layout": self.layout, "input_shape": list(self.input_shape),
                 "quantization": self.quantization, "report": self.report,
                 "golden": None if self.golden is None else self.golden.to_dict()}
        return entry | ({"failed": True} if self.failed else {})


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` as typed fields: the exporter builds one and writes it (:meth:`write`), the device reads it
    (``Bundle.manifest``). The JSON keys are those of the fields; ``modality`` is written for non-image bundles only
    and ``feature_groups`` for multi-depth extractors only (bundles written before either existed stay valid)."""

    backbone: BackboneRecord
    feature_dim: int
    preprocessing: dict[str, Any]  #: typed per modality by :meth:`Bundle.preprocessing` / ``text_preprocessing``
    extractors: list[ExtractorEntry]
    golden: GoldenFile | None = None
    reference: ReferenceFile | None = None
    validation: dict[str, Any] = field(default_factory=dict)  #: FP32 parity, calibration, gate limits
    labels: list[str] | None = None
    head: HeadRecord | None = None
    feature_groups: list[dict[str, Any]] | None = None  #: name, offset, size, layer of each multi-depth group
    files: dict[str, FileRecord] = field(default_factory=dict)
    modality: str = "image"
    schema_version: int = SCHEMA_VERSION
    edgetl_version: str | None = None
    created: str | None = None
    created_unix: float | None = None
    _json: dict[str, Any] | None = field(default=None, init=False, compare=False, repr=False)

    @classmethod
    def new(cls, **fields: Any) -> Manifest:
        """A manifest for a bundle made now, by this edgetl version."""
        from edgetl import __version__

        return cls(**fields, edgetl_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   created_unix=time.time())

    @property
    def raw(self) -> dict[str, Any]:
        """The manifest as JSON: as read (keys of other edgetl versions included), or as :meth:`write` writes it."""
        return self._json if self._json is not None else self.to_dict()

    @classmethod
    def from_dict(cls, m: dict[str, Any]) -> Manifest:
        """The typed view of a manifest that passed the schema check (:meth:`Bundle.load`)."""
        golden, reference, head = _dict(m.get("golden")), _dict(m.get("reference")), m.get("head")
        created_unix = m.get("created_unix")
        manifest = cls(
            BackboneRecord.from_dict(m["backbone"]), m["feature_dim"], m["preprocessing"],
            [ExtractorEntry.from_dict(e) for e in m["extractors"]],
            GoldenFile(golden["file"], _count(golden.get("count")), str(golden.get("inputs", "inputs")))
            if isinstance(golden.get("file"), str) else None,
            ReferenceFile(reference["file"], _count(reference.get("count")), _text(reference.get("source")) or "")
            if isinstance(reference.get("file"), str) else None,
            _dict(m.get("validation")), None if m.get("labels") is None else list(m["labels"]),
            None if head is None else HeadRecord.from_dict(head), m.get("feature_groups"),
            {name: FileRecord(e["sha256"], e["size"]) for name, e in m["files"].items()},
            str(m.get("modality", "image")), m["schema_version"], _text(m.get("edgetl_version")),
            _text(m.get("created")), None if created_unix is None else float(created_unix))
        object.__setattr__(manifest, "_json", m)
        return manifest

    def to_dict(self) -> dict[str, Any]:
        modality = {} if self.modality == "image" else {"modality": self.modality}
        groups = {} if self.feature_groups is None else {"feature_groups": self.feature_groups}
        return {"schema_version": self.schema_version, "edgetl_version": self.edgetl_version, **modality,
                "created": self.created, "created_unix": self.created_unix, "backbone": self.backbone.to_dict(),
                "feature_dim": self.feature_dim, "preprocessing": self.preprocessing,
                "extractors": [e.to_dict() for e in self.extractors],
                "golden": None if self.golden is None else self.golden.to_dict(),
                "reference": None if self.reference is None else self.reference.to_dict(),
                "validation": self.validation, "labels": self.labels,
                "head": None if self.head is None else self.head.to_dict(), **groups,
                "files": {name: f.to_dict() for name, f in self.files.items()}}

    def write(self, folder: Path) -> Path:
        """Write ``folder/manifest.json`` (indented JSON, keys in the order of :meth:`to_dict`)."""
        path = folder / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True)
class UnverifiedManifest:
    """What a manifest not yet checked (in an archive being installed, or of a possibly damaged installed bundle)
    says about itself: the files it lists (None when it lists none) and when it was made. Reading never raises."""

    listed: frozenset[str] | None
    created: Any = None
    created_unix: float = 0.0

    @classmethod
    def of(cls, data: Any) -> UnverifiedManifest:
        """The claims of ``data``, a parsed JSON value (anything but a JSON object claims nothing)."""
        if not isinstance(data, dict):
            return cls(None)
        files = data.get("files")
        try:
            created_unix = float(data.get("created_unix") or 0.0)
        except (TypeError, ValueError, OverflowError):
            created_unix = 0.0
        return cls(frozenset(files) if isinstance(files, dict) else None, data.get("created"), created_unix)


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle directory."""

    path: Path
    manifest: Manifest

    # ----------------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike[str], verify: bool = True,
             trust: str | os.PathLike[str] | None = None) -> Bundle:
        """Read ``path/manifest.json``; with ``verify`` check the schema and every listed file's size and sha256;
        with ``trust`` (a public key file) also require a valid signature of the manifest by that key."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise BundleError(f"bundle {path} does not exist or is not a directory; create one with `edgetl export`")
        try:
            raw = manifest_path.read_bytes()
            if trust is not None:
                from edgetl.signing import verify_signature

                verify_signature(path, raw, trust)
            manifest = json.loads(raw.decode("utf-8"))
        except FileNotFoundError as exc:
            raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing; re-export it with `edgetl export`") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise BundleError(f"bundle manifest {manifest_path} is corrupt ({type(exc).__name__}); copy the bundle "
                              "again") from exc
        where = f"bundle manifest in {path}"
        check_manifest(manifest, where)
        try:
            bundle = cls(path, Manifest.from_dict(manifest))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # the schema check should have said
            raise BundleError(f"{where} is malformed ({type(exc).__name__}: {exc}); re-export the bundle") from exc
        if verify:
            bundle.verify_files()
        return bundle

    def verify_files(self) -> None:
        """Every file the manifest lists exists with the recorded size and sha256 (tampering and truncation)."""
        for name, entry in self.manifest.files.items():
            target = self._member(name)
            if not target.is_file():
                raise BundleError(f"bundle file {name} is missing from {self.path}; copy the whole bundle again")
            if target.is_symlink():
                raise BundleError(f"bundle file {name} is a link; refusing it (copy the bundle without links)")
            size = target.stat().st_size
            if size != entry.size:
                raise BundleError(f"bundle file {name} has {size} bytes, expected {entry.size} (truncated or "
                                  "modified); copy the bundle again")
            if sha256_file(target) != entry.sha256:
                raise BundleError(f"bundle file {name} fails its sha256 check (tampered or corrupt); copy the bundle "
                                  "again from a trusted source")

    def _member(self, name: str) -> Path:
        try:
            target = (self.path / name).resolve()
        except (ValueError, OSError) as exc:
            raise BundleError(f"bundle manifest names an invalid file {name!r}; refusing it") from exc
        if self.path.resolve() not in target.parents:
            raise BundleError(f"bundle manifest names a file outside the bundle ({name!r}); refusing it")
        return target

    # ---------------------------------------------------------------------------------------------------- accessors
    @property
    def preprocessing(self) -> Preprocessing:
        if self.modality != "image":
            raise BundleError(f"bundle {self.path} holds a {self.modality} encoder; it takes no image preprocessing")
        return Preprocessing.from_dict(self.manifest.preprocessing)

    @property
    def modality(self) -> str:
        """``"image"`` (the default: bundles written before text existed) or ``"text"``."""
        return self.manifest.modality

    @property
    def text_preprocessing(self) -> TextPreprocessing:
        """Tokenizer file, max length, pooling and normalisation of a text bundle."""
        if self.modality != "text":
            raise BundleError(f"bundle {self.path} holds a {self.modality} extractor, not a text encoder")
        return TextPreprocessing.from_dict(self.manifest.preprocessing)

    @property
    def feature_dim(self) -> int:
        return self.manifest.feature_dim

    @property
    def feature_groups(self) -> list[dict[str, Any]] | None:
        """Groups of a multi-depth embedding (``name``, ``offset``, ``size``, ``layer``; the first is the pooled final
        features); None for a last-layer extractor."""
        return self.manifest.feature_groups

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels or [])

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    def extractors(self) -> list[ExtractorEntry]:
        return list(self.manifest.extractors)

    def extractor(self, fmt: str = "onnx", precision: str = "fp32") -> ExtractorEntry:
        for entry in self.extractors():
            if entry.format == fmt and entry.precision == precision:
                return entry
        have = ", ".join(f"{e.format}/{e.precision}" for e in self.extractors())
        raise BundleError(f"bundle {self.path} has no {fmt}/{precision} extractor (it has {have}); re-export with it")

    def sha256(self, name: str) -> str:
        return self.manifest.files[name].sha256

    def file(self, name: str) -> Path:
        return self._member(name)

    def golden(self, entry: ExtractorEntry) -> tuple[np.ndarray, np.ndarray, dict[str, float]] | None:
        """Reference inputs ``(K, 3, S, S)``, what the device's output of ``entry``'s graph is compared with ``(K, D)``
        and the tolerance. FP32 graphs: PyTorch's output. Reduced-precision graphs of current bundles name
        ``compare_to: pytorch`` (the FP32 reference, within a cosine bound measured at export); older bundles compare
        with the host's own output of the graph (``key``)."""
        meta, spec = self.manifest.golden, entry.golden
        if meta is None or spec is None:
            return None
        expected = spec.expected
        if not isinstance(expected, str):
            raise BundleError(f"golden vectors of {entry.file}: compare_to must be a key of {meta.file}; "
                              "re-export the bundle")
        inputs, outputs = self._arrays(meta.file, f"golden vectors of {entry.file}", meta.inputs, expected)
        return inputs, outputs, dict(spec.tolerance)

    def reference(self, entry: ExtractorEntry) -> np.ndarray | None:
        """The host's held-out embeddings ``(M, D)`` computed by ``entry``'s graph (None in bundles without them)."""
        meta, spec = self.manifest.reference, entry.golden
        if meta is None or spec is None:
            return None
        return self._arrays(meta.file, f"reference embeddings of {entry.file}", spec.key)[0].astype(np.float32)

    def _arrays(self, name: str, what: str, *keys: str) -> list[np.ndarray]:
        try:
            with np.load(self.file(name), allow_pickle=False) as data:
                return [data[k] for k in keys]
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{what} are unreadable ({exc}); re-export the bundle") from exc

def check_manifest(m: Any, where: str) -> None:
    """Structure and types of every field the device relies on (``m``: parsed ``manifest.json``); anything else is a
    :class:`BundleError` naming the field."""
    if not isinstance(m, dict):
        raise BundleError(f"{where} is not a JSON object; copy the bundle again")
    version = m.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{where} has no integer schema_version; it was not written by edgetl export")
    if version > SCHEMA_VERSION:
        raise BundleError(f"bundle schema_version {version} is newer than this edgetl understands ({SCHEMA_VERSION}); "
                          "upgrade edgetl on the device")
    for key, kind in (("backbone", dict), ("feature_dim", int), ("preprocessing", dict), ("extractors", list),
                      ("files", dict)):
        if not isinstance(m.get(key), kind):
            raise BundleError(f"{where} lacks a valid {key!r}; it was not written by edgetl export")
    _number(m["feature_dim"], "feature_dim", where, 1, MAX_FEATURE_DIM, integer=True)
    if not m["extractors"]:
        raise BundleError(f"{where} lists no extractor; re-export the bundle")
    for name, entry in m["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and
                isinstance(entry.get("size"), int)):
            raise BundleError(f"{where} has a malformed record for file {name!r}")
        _number(entry["size"], f"files[{name!r}].size", where, 0, MAX_FILE_BYTES, integer=True)
        if not _SHA256.fullmatch(entry["sha256"]):
            raise BundleError(f"{where}: files[{name!r}].sha256 is not 64 lowercase hex digits; copy the bundle "
                              "again")
    for e in m["extractors"]:
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in
                                              ("file", "format", "precision", "input_name", "output_name")):
            raise BundleError(f"{where} has a malformed extractor entry")
        companions = e.get("companions", [])
        if not isinstance(companions, list) or not all(isinstance(c, str) for c in companions):
            raise BundleError(f"{where} has a malformed extractor entry (companions)")
        for name in [e["file"], *companions]:
            if name not in m["files"]:
                raise BundleError(f"{where}: extractor file {name!r} is not covered by a sha256; re-export it")
    for optional, kind in (("labels", list), ("head", dict), ("golden", dict), ("reference", dict)):
        if m.get(optional) is not None and not isinstance(m[optional], kind):
            raise BundleError(f"{where} has a malformed {optional!r}")
    _check_values(m, where)
    _check_references(m, where)


def _check_references(m: dict[str, Any], where: str) -> None:
    """Every file the manifest refers to is covered by a sha256; preprocessing and feature groups are sound."""
    for ref in [(m.get(part) or {}).get("file") for part in ("head", "golden", "reference")]:
        if ref is not None and (not isinstance(ref, str) or ref not in m["files"]):
            raise BundleError(f"{where}: {ref!r} is not covered by a sha256; re-export the bundle")
    modality = str(m.get("modality", "image"))
    _check_preprocessing(modality, m["preprocessing"], where)
    try:
        pp = parse_preprocessing(modality, m["preprocessing"])
    except EdgeTLError as exc:
        raise BundleError(f"{where}: {exc}") from exc
    if isinstance(pp, TextPreprocessing) and pp.tokenizer not in m["files"]:
        raise BundleError(f"{where}: tokenizer {pp.tokenizer!r} is not covered by a sha256; re-export the bundle")
    if m.get("feature_groups") is not None and not _tiles(m["feature_groups"], m["feature_dim"]):
        raise BundleError(f"{where} has malformed feature_groups (they must tile the {m['feature_dim']} features "
                          "in order); re-export the bundle")


def _number(value: Any, field: str, where: str, low: float, high: float, integer: bool = False,
            above: bool = False) -> float:
    """``value`` if it is a finite number (an int when ``integer``; never a bool) in ``[low, high]`` (``(low, high]``
    when ``above``); else a one-line :class:`BundleError` naming ``field``."""
    kinds = int if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > low if above else value >= low) and value <= high
    if not ok:
        want = f"{'an integer' if integer else 'a finite number'} {'>' if above else '>='} {low:g} and <= {high:g}"
        shown = repr(value) if not isinstance(value, (int, float)) or abs(value) < 1e15 else f"{value:.3g}"
        raise BundleError(f"{where}: {field} is {shown[:40]}, expected {want}; the manifest is corrupt or was not "
                          "written by edgetl export — re-export the bundle")
    return float(value)


def _check_preprocessing(modality: str, pp: dict[str, Any], where: str) -> None:
    """Ranges of the preprocessing numbers (types and required keys are checked by :func:`parse_preprocessing`)."""
    if modality == "text":
        if "max_length" in pp:
            _number(pp["max_length"], "preprocessing.max_length", where, 2, MAX_TEXT_LENGTH, integer=True)
        return
    for key in ("input_size", "resize"):
        if key in pp:
            _number(pp[key], f"preprocessing.{key}", where, 1, MAX_INPUT_SIZE * (2 if key == "resize" else 1),
                    integer=True)
    if "scale" in pp:
        _number(pp["scale"], "preprocessing.scale", where, 0, 1e6, above=True)
    for key, low, high, above in (("mean", -1e6, 1e6, False), ("std", 1e-6, 1e6, False)):
        values = pp.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != 3:
            raise BundleError(f"{where}: preprocessing.{key} is {str(values)[:40]}, expected 3 numbers (one per "
                              "channel); re-export the bundle")
        for i, v in enumerate(values):
            _number(v, f"preprocessing.{key}[{i}]", where, low, high, above=above)
    for key, allowed in (("channels", ("RGB", "BGR")), ("layout", ("NCHW", "NHWC")),
                         ("interpolation", ("bilinear", "bicubic", "nearest"))):
        if key in pp and pp[key] not in allowed:
            raise BundleError(f"{where}: preprocessing.{key} is {str(pp[key])[:40]!r}, expected one of "
                              f"{', '.join(allowed)}; re-export the bundle")


def _check_values(m: dict[str, Any], where: str) -> None:
    """Ranges and element types of the optional fields the device reads."""
    labels = m.get("labels")
    if labels is not None and (len(labels) > MAX_CLASSES or
                               not all(isinstance(name, str) and name for name in labels)):
        raise BundleError(f"{where}: labels must be at most {MAX_CLASSES} non-empty strings; re-export the bundle")
    if m.get("created_unix") is not None:
        _number(m["created_unix"], "created_unix", where, 0, 1e11)
    head = m.get("head")
    if head is not None and not (isinstance(head.get("file"), str) and isinstance(head.get("kind"), str)):
        raise BundleError(f"{where}: head needs a file and a kind (strings); re-export the bundle")
    for i, e in enumerate(m["extractors"]):
        golden = e.get("golden")
        if golden is None:
            continue
        if not (isinstance(golden, dict) and isinstance(golden.get("key"), str) and
                isinstance(golden.get("tolerance"), dict)):
            raise BundleError(f"{where}: extractors[{i}].golden needs a key and a tolerance; re-export the bundle")
        for name, limit in golden["tolerance"].items():
            _number(limit, f"extractors[{i}].golden.tolerance.{name}", where, 0, 1e6)


def _tiles(groups: Any, dim: int) -> bool:
    """Feature groups cover ``[0, dim)`` in order, without gaps or overlaps."""
    if not isinstance(groups, list) or not groups:
        return False
    offset = 0
    for g in groups:
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or g.get("offset") != offset or \
                not isinstance(g.get("size"), int) or g["size"] < 1:
            return False
        offset += g["size"]
    return offset == dim


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest's record of one file, as JSON (:class:`FileRecord`)."""
    return FileRecord.of(path).to_dict()
