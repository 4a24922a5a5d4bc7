"""The embedded demo data set: 400 Fashion-MNIST images (MIT licence) shipped inside the package, so the quick start
and the default validation of an export need no download."""

from __future__ import annotations

from pathlib import Path

DEMO_ROOT = Path(__file__).resolve().parent / "demo_data" / "fashion-mnist-mini"


def demo_split(split: str) -> Path:
    """``train`` (30 images per class) or ``test`` (10 per class) of the embedded demo set."""
    return DEMO_ROOT / split
