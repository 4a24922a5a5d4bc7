"""What a bundle's inputs are: one loader per modality, chosen from the bundle's manifest at one point
(:func:`make_loader`). A loader scans labelled data, lists unlabelled data, keys items for the embedding store and turns
items into the extractor's input array; :class:`edgetl.device.DeviceRuntime` does the rest the same for every modality.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgetl.data import ImageFolder, list_images, load_image, scan_image_folder
from edgetl.errors import BundleError


class Loader(Protocol):
    modality: str
    noun: str  #: what one item is called in messages ("images", "documents")

    def scan(self, data: str | os.PathLike[str] | ImageFolder, min_classes: int = 2) -> ImageFolder: ...

    def list(self, root: str | os.PathLike[str]) -> list[Any]: ...

    def key(self, item: Any) -> str: ...

    def inputs(self, items: Sequence[Any]) -> np.ndarray: ...


class ImageLoader:
    """Image files → preprocessed ``(N, 3, S, S)`` float32 with the bundle's preprocessing."""

    modality = "image"
    noun = "images"

    def __init__(self, bundle: Any):
        self.pp = bundle.preprocessing

    def scan(self, data: str | os.PathLike[str] | ImageFolder, min_classes: int = 2) -> ImageFolder:
        return data if isinstance(data, ImageFolder) else scan_image_folder(data, min_classes=min_classes)

    def list(self, root: str | os.PathLike[str]) -> list[Path]:
        return list_images(root)

    def key(self, item: str | os.PathLike[str]) -> str:
        from edgetl.store import content_hash

        return content_hash(item)

    def inputs(self, items: Sequence[str | os.PathLike[str]]) -> np.ndarray:
        from edgetl.preprocess import preprocess_batch

        return preprocess_batch([load_image(p) for p in items], self.pp)


#: modality → "module:class" of its loader (imported lazily: text needs the tokenizers package)
LOADERS: dict[str, str] = {"image": "edgetl.modality:ImageLoader", "text": "edgetl.text:TextLoader"}


def make_loader(bundle: Any) -> Loader:
    """The loader for ``bundle.modality``."""
    target = LOADERS.get(bundle.modality)
    if target is None:
        raise BundleError(f"bundle {bundle.path} has modality {bundle.modality!r}; this edgetl knows "
                          f"{', '.join(LOADERS)}: upgrade edgetl on the device")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(bundle)  # type: ignore[no-any-return]


__all__ = ["LOADERS", "ImageLoader", "Loader", "make_loader"]
