"""``edgetl data``: converters into the ImageFolder layout."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def data() -> None:
    """Prepare data sets in the ImageFolder layout."""


@data.command("fashion-mnist")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output ImageFolder.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--per-class", type=click.IntRange(min=1), default=None, help="Images per class (default: all).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="Folder with the IDX files (default: Debian's /usr/share/datasets/fashion-mnist).")
def fashion_mnist(out: Path, split: str, per_class: int | None, seed: int, source: Path | None) -> None:
    """Convert Fashion-MNIST IDX files into OUT/<class>/*.png."""
    from edgetl.datasets import fashion_mnist as fm

    n = fm.write_image_folder(out, split, per_class, seed, source or fm.DEBIAN_DIR)
    click.echo(f"wrote {n} images of the {split} split to {out}")
