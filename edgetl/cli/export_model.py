"""``edgetl device export-model``: the extractor and a head as one standard graph (see :mod:`edgetl.export_model`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgetl.cli._choices import TableChoice, export_model_formats, precisions


@click.command("export-model")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output file: NAME.onnx, or NAME.xml for OpenVINO (NAME.bin is written beside it).")
@click.option("--format", "fmt", type=TableChoice(export_model_formats), default="onnx", show_default=True,
              help="onnx: one self-contained .onnx file; openvino: an FP32 IR converted from it. (TFLite is not "
                   "offered: it cannot be made without TensorFlow or torch.)")
@click.option("--version", "version", default=None, help="Head version to export (default: the current one).")
@click.option("--with-preprocessing", is_flag=True,
              help="The graph takes uint8 RGB pixels (N, S, S, 3), resized and centre-cropped, and normalises them.")
@click.option("--novelty", is_flag=True, help="Also output the novelty score and unknown flag (N,).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Held-out images to check the graph on (default: 40 embedded demo images) besides the golden "
                   "inputs.")
@click.option("--precision", type=TableChoice(precisions), default=None,
              help="Which ONNX extractor (default: the one the head was trained on).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Runtime threads for the check.")
@click.option("--trust", type=click.Path(path_type=Path), default=None, envvar="EDGETL_TRUST",
              help="Public key (KEY.pub): refuse an unsigned or badly signed bundle [env EDGETL_TRUST].")
@click.option("--sign", "sign", type=click.Path(path_type=Path), default=None,
              help="ECDSA private key (edgetl keys generate --type ecdsa-p256): also write an OpenSSF model-signing "
                   "signature OUT.sig (ONNX only).")
@click.option("--json", "as_json", is_flag=True)
def export_model(bundle: Path, out: Path, fmt: str, version: str | None, with_preprocessing: bool, novelty: bool,
                 images: Path | None, precision: str | None, threads: int | None, trust: Path | None,
                 sign: Path | None, as_json: bool) -> None:
    """Write the frozen extractor + a head as ONE standard graph giving calibrated probabilities (checked against
    device predict before it is written; labels and preprocessing in its metadata)."""
    from edgetl.cli.device import _trust_option
    from edgetl.export_model import export_model as run

    result = run(bundle, out, fmt=fmt, version=version, with_preprocessing=with_preprocessing, novelty=novelty,
                 images=images, precision=precision, threads=threads, trust=_trust_option(trust), sign=sign)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    c = result.check
    (name, shape), = result.inputs.items()
    click.echo(f"wrote {', '.join(str(f) for f in result.files)}: {result.extractor} ({result.precision}) + "
               f"{result.head_kind} head {result.head_version} -> {', '.join(result.outputs)}; input {name} "
               f"{shape}")
    golden = f"{c.n_golden} golden inputs and " if c.n_golden else ""
    novelty = f"; novelty within {c.max_novelty_rel_diff:.1e} (relative)" if c.max_novelty_rel_diff is not None else ""
    click.echo(f"checked with {c.runtime} against device predict on {golden}{c.n_images} held-out images: top-1 "
               f"agreement {c.top1_agreement:.3f}, max probability difference {c.max_probability_diff:.1e} (limit "
               f"{c.limit:.0e}){novelty}")
    if result.signature is not None:
        click.echo(f"signed: {result.signature} (OpenSSF model signing; verify: model_signing verify key {out} "
                   f"--signature {result.signature} --public_key KEY.pub)")
