"""The bundle: the one artifact that travels from host to device.

A directory holding ``manifest.json`` and the files it lists (extractors, golden vectors, labels, initial head), each
with its sha256. Device state lives in ``state/``, outside what the manifest covers.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ExtractorEntry:
    """One exported feature extractor graph in the bundle."""

    file: str
    format: str
    precision: str
    input_name: str
    output_name: str
    layout: str
    report: dict[str, Any]
    raw: dict[str, Any]


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle directory."""

    path: Path
    manifest: dict[str, Any]

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
        bundle = cls(path, manifest)
        bundle._check_schema()
        if verify:
            bundle.verify_files()
        return bundle

    def _check_schema(self) -> None:
        """Structure and types of every field the device relies on; anything else is a :class:`BundleError`."""
        m = self.manifest
        where = f"bundle manifest in {self.path}"
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
        for ref in [(m.get(part) or {}).get("file") for part in ("head", "golden", "reference")]:
            if ref is not None and (not isinstance(ref, str) or ref not in m["files"]):
                raise BundleError(f"{where}: {ref!r} is not covered by a sha256; re-export the bundle")
        _check_preprocessing(self.modality, m["preprocessing"], where)
        try:
            pp = parse_preprocessing(self.modality, m["preprocessing"])
        except EdgeTLError as exc:
            raise BundleError(f"{where}: {exc}") from exc
        if isinstance(pp, TextPreprocessing) and pp.tokenizer not in m["files"]:
            raise BundleError(f"{where}: tokenizer {pp.tokenizer!r} is not covered by a sha256; re-export the bundle")
        if m.get("feature_groups") is not None and not _tiles(m["feature_groups"], m["feature_dim"]):
            raise BundleError(f"{where} has malformed feature_groups (they must tile the {m['feature_dim']} features "
                              "in order); re-export the bundle")

    def verify_files(self) -> None:
        """Every file the manifest lists exists with the recorded size and sha256 (tampering and truncation)."""
        for name, entry in self.manifest["files"].items():
            target = self._member(name)
            if not target.is_file():
                raise BundleError(f"bundle file {name} is missing from {self.path}; copy the whole bundle again")
            if target.is_symlink():
                raise BundleError(f"bundle file {name} is a link; refusing it (copy the bundle without links)")
            size = target.stat().st_size
            if size != entry["size"]:
                raise BundleError(f"bundle file {name} has {size} bytes, expected {entry['size']} (truncated or "
                                  "modified); copy the bundle again")
            if sha256_file(target) != entry["sha256"]:
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
        return Preprocessing.from_dict(self.manifest["preprocessing"])

    @property
    def modality(self) -> str:
        """``"image"`` (the default: bundles written before text existed) or ``"text"``."""
        return str(self.manifest.get("modality", "image"))

    @property
    def text_preprocessing(self) -> TextPreprocessing:
        """Tokenizer file, max length, pooling and normalisation of a text bundle."""
        if self.modality != "text":
            raise BundleError(f"bundle {self.path} holds a {self.modality} extractor, not a text encoder")
        return TextPreprocessing.from_dict(self.manifest["preprocessing"])

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["feature_dim"])

    @property
    def feature_groups(self) -> list[dict[str, Any]] | None:
        """Groups of a multi-depth embedding (``name``, ``offset``, ``size``, ``layer``; the first is the pooled final
        features); None for a last-layer extractor."""
        return self.manifest.get("feature_groups")

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.get("labels") or [])

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    def extractors(self) -> list[ExtractorEntry]:
        return [ExtractorEntry(e["file"], e["format"], e["precision"], e["input_name"], e["output_name"],
                               e.get("layout", "NCHW"), e.get("report", {}), e) for e in self.manifest["extractors"]]

    def extractor(self, fmt: str = "onnx", precision: str = "fp32") -> ExtractorEntry:
        for entry in self.extractors():
            if entry.format == fmt and entry.precision == precision:
                return entry
        have = ", ".join(f"{e.format}/{e.precision}" for e in self.extractors())
        raise BundleError(f"bundle {self.path} has no {fmt}/{precision} extractor (it has {have}); re-export with it")

    def sha256(self, name: str) -> str:
        return str(self.manifest["files"][name]["sha256"])

    def file(self, name: str) -> Path:
        return self._member(name)

    def golden(self, entry: ExtractorEntry) -> tuple[np.ndarray, np.ndarray, dict[str, float]] | None:
        """Reference inputs ``(K, 3, S, S)``, what the device's output of ``entry``'s graph is compared with ``(K, D)``
        and the tolerance. FP32 graphs: PyTorch's output. Reduced-precision graphs of current bundles name
        ``compare_to: pytorch`` (the FP32 reference, within a cosine bound measured at export); older bundles compare
        with the host's own output of the graph (``key``)."""
        meta, spec = self.manifest.get("golden"), entry.raw.get("golden")
        if not meta or not spec:
            return None
        expected = spec.get("compare_to", spec["key"])
        if not isinstance(expected, str):
            raise BundleError(f"golden vectors of {entry.file}: compare_to must be a key of {meta['file']}; "
                              "re-export the bundle")
        inputs, outputs = self._arrays(meta["file"], f"golden vectors of {entry.file}",
                                       meta.get("inputs", "inputs"), expected)
        return inputs, outputs, dict(spec["tolerance"])

    def reference(self, entry: ExtractorEntry) -> np.ndarray | None:
        """The host's held-out embeddings ``(M, D)`` computed by ``entry``'s graph (None in bundles without them)."""
        meta, spec = self.manifest.get("reference"), entry.raw.get("golden")
        if not meta or not spec:
            return None
        return self._arrays(meta["file"], f"reference embeddings of {entry.file}", spec["key"])[0].astype(np.float32)

    def _arrays(self, name: str, what: str, *keys: str) -> list[np.ndarray]:
        try:
            with np.load(self.file(name), allow_pickle=False) as data:
                return [data[k] for k in keys]
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{what} are unreadable ({exc}); re-export the bundle") from exc

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
    if labels is not None:
        if len(labels) > MAX_CLASSES or not all(isinstance(name, str) and name for name in labels):
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
    """The manifest's record of one file."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}
