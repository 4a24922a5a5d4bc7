"""``edgetl device``: everything that runs on the device (numpy + one inference runtime; never torch)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from edgetl.cli._progress import progress_bars

_bundle_arg = click.argument("bundle", type=click.Path(path_type=Path))


def _runtime_options(f: Any) -> Any:
    f = click.option("--backend", type=click.Choice(["onnx"]), default="onnx", show_default=True,
                     help="Inference runtime.")(f)
    f = click.option("--threads", type=click.IntRange(min=1), default=None, help="Runtime threads (default: all).")(f)
    return f


def _open(bundle: Path, backend: str, threads: int | None) -> Any:
    from edgetl.device import DeviceRuntime

    return DeviceRuntime(bundle, backend=backend, threads=threads)


@click.group()
def device() -> None:
    """Device side: train a head on local data, predict, evaluate (no torch needed)."""


@device.command()
@_bundle_arg
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="ImageFolder of local data.")
@click.option("--head", type=click.Choice(["softmax"]), default="softmax", show_default=True)
@click.option("--val-split", type=click.FloatRange(0.0, 0.9), default=0.2, show_default=True,
              help="Held-out fraction for the reported accuracy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_runtime_options
def train(bundle: Path, data_dir: Path, head: str, val_split: float, seed: int, as_json: bool, quiet: bool,
          backend: str, threads: int | None) -> None:
    """Embed local images (cached) and train a new head version."""
    rt = _open(bundle, backend, threads)
    with progress_bars(not (quiet or as_json)) as progress:
        report = rt.train(data_dir, head=head, val_split=val_split, seed=seed, progress=progress)
    if as_json:
        click.echo(json.dumps(asdict(report)))
        return
    acc = "n/a" if report.val_accuracy is None else f"{report.val_accuracy:.3f}"
    click.echo(f"trained {report.head} head {report.version} on {report.n_train} images of {len(report.classes)} "
               f"classes in {report.fit_seconds:.2f} s; held-out accuracy {acc} on {report.n_val} images "
               f"({report.cached} embeddings from the cache)")


@device.command()
@_bundle_arg
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_runtime_options
def predict(bundle: Path, paths: tuple[Path, ...], top_k: int, as_json: bool, backend: str,
            threads: int | None) -> None:
    """Classify image files with the current head."""
    results = _open(bundle, backend, threads).predict(list(paths), top_k=top_k)
    for r in results:
        if as_json:
            click.echo(json.dumps(r))
        else:
            ranked = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"])
            click.echo(f"{r['path']}: {ranked}")


@device.command()
@_bundle_arg
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Labelled ImageFolder.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_runtime_options
def evaluate(bundle: Path, data_dir: Path, as_json: bool, quiet: bool, backend: str, threads: int | None) -> None:
    """Accuracy of the current head on labelled images."""
    rt = _open(bundle, backend, threads)
    with progress_bars(not (quiet or as_json)) as progress:
        result = rt.evaluate(data_dir, progress=progress)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"accuracy {result['accuracy']:.4f} on {result['n']} images (head {result['head_version']})")
    for name, acc in result["per_class_accuracy"].items():
        click.echo(f"  {name:<20} {acc:.3f}")


@device.command()
@_bundle_arg
@click.option("--json", "as_json", is_flag=True)
def info(bundle: Path, as_json: bool) -> None:
    """Show what a bundle holds and which head is current (files are verified first)."""
    from edgetl.device import DeviceRuntime

    data = DeviceRuntime(bundle).info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    b = data["backbone"]
    pp = data["preprocessing"]
    click.echo(f"bundle       {data['bundle']} (schema {data['schema_version']}, edgetl {data['edgetl_version']})")
    click.echo(f"backbone     {b['id']} ({b['source']}), {data['feature_dim']}-d embeddings, {pp['input_size']} px")
    for e in data["extractors"]:
        r = e.get("report", {})
        click.echo(f"extractor    {e['file']}: {e['format']}/{e['precision']}, max abs diff vs PyTorch "
                   f"{r.get('max_abs_diff', float('nan')):.2e} on {r.get('n_images', 0)} images")
    click.echo(f"labels       {', '.join(data['labels'] or []) or '(none: train a head on the device)'}")
    click.echo(f"current head {data['current_head'] or '(none)'}")


@device.command()
@_bundle_arg
@_runtime_options
def verify(bundle: Path, backend: str, threads: int | None) -> None:
    """Check every file's sha256 and run the golden vectors through this device's runtime."""
    result = _open(bundle, backend, threads).verify()
    if result["golden"] == "absent":
        click.echo(f"{bundle}: files ok; no golden vectors packed")
    else:
        click.echo(f"{bundle}: files ok; golden vectors ok on {backend} (max abs diff {result['max_abs_diff']:.2e}, "
                   f"min cosine {result['min_cosine']:.6f})")
