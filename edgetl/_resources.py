"""Locate the data registries (models/, devices/) in a source checkout and in a non-editable install alike."""

from __future__ import annotations

import os
from importlib import util
from pathlib import Path


def registry_dir(kind: str) -> Path:
    """Return the folder of the ``kind`` registry ("models" or "devices").

    Order: ``$EDGETL_<KIND>_DIR``; the package's bundled copy (``edgetl/_registry/<kind>``, installed from the
    top-level folder by pyproject's package-dir mapping); the top-level folder of a source checkout.
    """
    override = os.environ.get(f"EDGETL_{kind.upper()}_DIR")
    if override:
        return Path(override)
    try:
        spec = util.find_spec(f"edgetl._registry.{kind}")
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location)
        if path.is_dir() and any(path.glob("*.toml")):
            return path
    return Path(__file__).resolve().parent.parent / kind
