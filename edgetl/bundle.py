"""The bundle: the one artifact that travels from host to device.

A directory holding ``manifest.json`` and the files it lists (extractors, golden vectors, labels, initial head), each
with its sha256. Device state lives in ``state/``, outside what the manifest covers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import BundleError
from edgetl.registry import Preprocessing, sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STATE_DIR = "state"


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
    def load(cls, path: str | os.PathLike[str], verify: bool = True) -> Bundle:
        """Read ``path/manifest.json``; with ``verify`` check the schema and every listed file's size and sha256."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise BundleError(f"bundle {path} does not exist or is not a directory; create one with `edgetl export`")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing; re-export it with `edgetl export`") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"bundle manifest {manifest_path} is corrupt ({exc}); copy the bundle again") from exc
        bundle = cls(path, manifest)
        bundle._check_schema()
        if verify:
            bundle.verify_files()
        return bundle

    def _check_schema(self) -> None:
        m = self.manifest
        if not isinstance(m, dict):
            raise BundleError(f"bundle manifest in {self.path} is not a JSON object")
        version = m.get("schema_version")
        if not isinstance(version, int):
            raise BundleError(f"bundle manifest in {self.path} has no integer schema_version")
        if version > SCHEMA_VERSION:
            raise BundleError(f"bundle schema_version {version} is newer than this edgetl understands ({SCHEMA_VERSION}); "
                              "upgrade edgetl on the device")
        for key in ("backbone", "feature_dim", "preprocessing", "extractors", "files"):
            if key not in m:
                raise BundleError(f"bundle manifest in {self.path} lacks {key!r}; it was not written by edgetl export")
        if not m["extractors"]:
            raise BundleError(f"bundle {self.path} lists no extractor")

    def verify_files(self) -> None:
        """Every file the manifest lists exists with the recorded size and sha256 (tampering and truncation)."""
        for name, entry in self.manifest["files"].items():
            target = self._member(name)
            if not target.is_file():
                raise BundleError(f"bundle file {name} is missing from {self.path}; copy the whole bundle again")
            size = target.stat().st_size
            if size != entry["size"]:
                raise BundleError(f"bundle file {name} has {size} bytes, expected {entry['size']} (truncated or "
                                  "modified); copy the bundle again")
            if sha256_file(target) != entry["sha256"]:
                raise BundleError(f"bundle file {name} fails its sha256 check (tampered or corrupt); copy the bundle "
                                  "again from a trusted source")

    def _member(self, name: str) -> Path:
        target = (self.path / name).resolve()
        if self.path.resolve() not in target.parents:
            raise BundleError(f"bundle manifest names a file outside the bundle ({name!r}); refusing it")
        return target

    # ---------------------------------------------------------------------------------------------------- accessors
    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest["preprocessing"])

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["feature_dim"])

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
        """Reference inputs ``(K, 3, S, S)``, the host's output of ``entry``'s graph ``(K, D)`` and the tolerance."""
        meta, spec = self.manifest.get("golden"), entry.raw.get("golden")
        if not meta or not spec:
            return None
        try:
            with np.load(self.file(meta["file"]), allow_pickle=False) as data:
                return data[meta.get("inputs", "inputs")], data[spec["key"]], dict(spec["tolerance"])
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"golden vectors of {entry.file} are unreadable ({exc}); re-export the bundle") from exc


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest's record of one file."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}
