"""``edgetl models``: the backbone registry."""

from __future__ import annotations

import json

import click


@click.group()
def models() -> None:
    """Backbone registry (models/*.toml)."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_models(as_json: bool) -> None:
    """Show the registered backbones and whether their weights are installed and verified."""
    from edgetl.errors import WeightsError
    from edgetl.registry import list_backbones, resolve_weights

    rows = []
    for spec in list_backbones():
        try:
            status = f"ok ({resolve_weights(spec)})"
        except WeightsError as exc:
            status = f"missing: {exc}"
        rows.append({"id": spec.id, "architecture": spec.architecture, "feature_dim": spec.feature_dim,
                     "modality": spec.modality, "input_size": getattr(spec.preprocessing, "input_size", None),
                     "max_length": getattr(spec.preprocessing, "max_length", None), "description": spec.description,
                     "weights_sha256": spec.weights_sha256, "url": spec.weights_url,
                     "offline": spec.offline.pip if spec.offline else None, "weights": status})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        size = f"{r['input_size']} px" if r["input_size"] else f"{r['max_length']} tokens"
        click.echo(f"{r['id']:<20} {r['feature_dim']:>5}-d  {size}  {r['description']}")
        click.echo(f"{'':<20} weights: {r['weights']}")
