"""Host commands (need the ``host`` extra): ``edgetl finetune`` and ``edgetl export``."""

from __future__ import annotations

from pathlib import Path

import click

from edgetl.cli._choices import NO_QUANTIZATION, TableChoice, backends, quantizations
from edgetl.cli._progress import progress_bars


def _precisions(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """``--quantize none`` is FP32."""
    return tuple("fp32" if p == NO_QUANTIZATION else p for p in value)


@click.command()
@click.option("--model", required=True, help="Registry backbone id (see `edgetl models list`).")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="ImageFolder to train on.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--freeze", type=click.Choice(["head", "partial", "none"]), default="head", show_default=True,
              help="head: train the classifier only; partial: also the last blocks; none: everything "
                   "(backbone at a tenth of --lr for partial, a hundredth for none; the classifier starts from the "
                   "linear probe).")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Classifier learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=None, help="Input size (default: the registry's).")
@click.option("--val-split", type=click.FloatRange(0.0, 0.9), default=0.2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt (written after every epoch).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def finetune(model: str, data_dir: Path, out: Path, epochs: int, freeze: str, lr: float, batch_size: int,
             image_size: int | None, val_split: float, seed: int, resume: bool, quiet: bool) -> None:
    """Fine-tune a pretrained backbone on an ImageFolder and write a run folder (runs unchanged under
    `torchrun --nproc-per-node N`: rank 0 writes and reports)."""
    import os

    from edgetl.host.finetune import FinetuneConfig
    from edgetl.host.finetune import finetune as run_finetune

    cfg = FinetuneConfig(model=model, epochs=epochs, freeze=freeze, lr=lr, batch_size=batch_size,
                         image_size=image_size, val_split=val_split, seed=seed)
    rank0 = os.environ.get("RANK", "0") == "0"
    with progress_bars(not quiet and rank0) as progress:
        metrics = run_finetune(data_dir, out, cfg, progress, resume=resume)
    if not rank0:
        return
    for record in metrics["history"]:
        val = f", val accuracy {record['val_accuracy']:.3f}" if "val_accuracy" in record else ""
        click.echo(f"epoch {record['epoch']}: train loss {record['train_loss']:.3f}, "
                   f"train accuracy {record['train_accuracy']:.3f}{val}")
    click.echo(f"wrote {out} ({metrics['seconds']} s)")


@click.command()
@click.option("--model", default=None, help="Registry backbone id (pretrained extractor).")
@click.option("--run", "run_dir", default=None, type=click.Path(path_type=Path), help="Fine-tune run folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--format", "formats", multiple=True, type=TableChoice(backends),
              help="Graph format; repeat for several (default: onnx, or the --profile's backends).")
@click.option("--quantize", "precisions", multiple=True, type=TableChoice(quantizations), callback=_precisions,
              help="Precision; repeat for several (default: none = FP32, or the --profile's precision).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Labelled ImageFolder of real images (for a text encoder: a folder of .txt files per class or a "
                   "text,label CSV): calibration + held-out accuracy gate (default: the run's training data, else "
                   "the embedded demo set).")
@click.option("--calib-size", type=click.IntRange(min=2), default=64, show_default=True,
              help="Images used to calibrate INT8; the rest are held out for the gate.")
@click.option("--max-drop", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Largest accuracy drop (points) a reduced-precision graph may show against PyTorch FP32.")
@click.option("--min-cosine", type=click.FloatRange(-1, 1), default=0.97, show_default=True,
              help="Smallest mean cosine of a reduced-precision graph's embeddings to PyTorch FP32 (held-out images).")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Smallest top-1 agreement of the FP32 reference head on a reduced-precision graph's embeddings.")
@click.option("--keep-failed", is_flag=True,
              help="Keep graphs that fail the gate, marked failed (exit 0); without it they are left out and export "
                   "exits 1 naming them.")
@click.option("--profile", default=None, help="Device profile (devices/*.toml) choosing default formats/precision.")
@click.option("--image-size", type=click.IntRange(min=32), default=None, help="Input size (pretrained export only).")
@click.option("--opset", type=click.IntRange(min=13), default=17, show_default=True)
@click.option("--features", type=click.Choice(["last", "multi"]), default="last", show_default=True,
              help="last: the pooled final features; multi: also the pooled output of every stage (Head2Toe-style "
                   "multi-depth features for `device train --features multi|auto`).")
@click.option("--force", is_flag=True, help="Replace an existing bundle folder.")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), default=None,
              help="Ed25519 private key (edgetl keys generate) to sign the bundle with.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(model: str | None, run_dir: Path | None, out: Path, formats: tuple[str, ...], precisions: tuple[str, ...],
           calib: Path | None, calib_size: int, max_drop: float, min_cosine: float, min_agreement: float,
           keep_failed: bool, profile: str | None,
           image_size: int | None, opset: int, features: str, force: bool, sign_key: Path | None, quiet: bool) -> None:
    """Export the frozen feature extractor (ONNX FP32 reference + every format/precision asked for), gate each graph
    on accuracy against PyTorch, and pack a bundle."""
    from edgetl.cli._tables import extractor_table
    from edgetl.export_job import export_bundle

    with progress_bars(not quiet) as progress:
        result = export_bundle(out, model=model, run=run_dir, formats=formats, precisions=precisions, calib=calib,
                               profile=profile, sign_key=sign_key, calib_size=calib_size, max_drop=max_drop,
                               min_cosine=min_cosine, min_agreement=min_agreement, keep_failed=keep_failed,
                               image_size=image_size, opset=opset, force=force, features=features, progress=progress)
    click.echo(f"exported {result.bundle} ({result.backbone}, {result.input_size})")
    click.echo(extractor_table(result.extractors))
    if sign_key is not None:
        click.echo(f"signed with {sign_key} ({result.signature})")
    if result.refused is not None:
        raise result.refused
