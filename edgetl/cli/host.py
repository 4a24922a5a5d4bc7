"""Host commands (need the ``host`` extra): ``edgetl finetune`` and ``edgetl export``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgetl.cli._progress import progress_bars


@click.command()
@click.option("--model", required=True, help="Registry backbone id (see `edgetl models list`).")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="ImageFolder to train on.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--freeze", type=click.Choice(["head", "partial", "none"]), default="head", show_default=True,
              help="head: train the classifier only; partial: also the last blocks; none: everything "
                   "(backbone at a tenth of --lr).")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Classifier learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=None, help="Input size (default: the registry's).")
@click.option("--val-split", type=click.FloatRange(0.0, 0.9), default=0.2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def finetune(model: str, data_dir: Path, out: Path, epochs: int, freeze: str, lr: float, batch_size: int,
             image_size: int | None, val_split: float, seed: int, quiet: bool) -> None:
    """Fine-tune a pretrained backbone on an ImageFolder and write a run folder."""
    from edgetl.host.finetune import FinetuneConfig
    from edgetl.host.finetune import finetune as run_finetune

    cfg = FinetuneConfig(model=model, epochs=epochs, freeze=freeze, lr=lr, batch_size=batch_size,
                         image_size=image_size, val_split=val_split, seed=seed)
    with progress_bars(not quiet) as progress:
        metrics = run_finetune(data_dir, out, cfg, progress)
    for record in metrics["history"]:
        val = f", val accuracy {record['val_accuracy']:.3f}" if "val_accuracy" in record else ""
        click.echo(f"epoch {record['epoch']}: train loss {record['train_loss']:.3f}, "
                   f"train accuracy {record['train_accuracy']:.3f}{val}")
    click.echo(f"wrote {out} ({metrics['seconds']} s)")


def _validation_images(folder: Path, limit: int) -> list[Path]:
    """Up to ``limit`` images spread evenly over an ImageFolder."""
    from edgetl.data import scan_image_folder

    paths = scan_image_folder(folder, min_classes=1).paths
    step = max(1, len(paths) // limit)
    return paths[::step][:limit]


@click.command()
@click.option("--model", default=None, help="Registry backbone id (pretrained extractor).")
@click.option("--run", "run_dir", default=None, type=click.Path(path_type=Path), help="Fine-tune run folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--val-data", type=click.Path(path_type=Path), default=None,
              help="ImageFolder of real images for the PyTorch parity check (default: the run's data, else the "
                   "embedded demo set).")
@click.option("--val-size", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=None, help="Input size (pretrained export only).")
@click.option("--opset", type=click.IntRange(min=13), default=17, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing bundle folder.")
def export(model: str | None, run_dir: Path | None, out: Path, val_data: Path | None, val_size: int,
           image_size: int | None, opset: int, force: bool) -> None:
    """Export the frozen feature extractor to ONNX, check it against PyTorch, and pack a bundle."""
    from edgetl.demo import demo_split
    from edgetl.host.export import export as run_export

    if val_data is None and run_dir is not None and (run_dir / "run.json").is_file():
        val_data = Path(json.loads((run_dir / "run.json").read_text())["data"])
    if val_data is None or not val_data.is_dir():
        val_data = demo_split("test")
    bundle = run_export(out, _validation_images(val_data, val_size), model=model, run=run_dir,
                        image_size=image_size, opset=opset, force=force)
    report = json.loads((bundle / "manifest.json").read_text())["extractors"][0]["report"]
    click.echo(f"exported {bundle}: ONNX vs PyTorch on {report['n_images']} images, max abs diff "
               f"{report['max_abs_diff']:.2e}, min cosine {report['min_cosine']:.6f}")
