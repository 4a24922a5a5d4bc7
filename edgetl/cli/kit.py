"""``edgetl bundle kit``: a field kit (packed bundle + offline wheelhouse + install script) for a device profile."""

from __future__ import annotations

from pathlib import Path

import click

from edgetl.cli._choices import TableChoice, runtime_extras


@click.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--profile", required=True, help="Device profile the kit is for (edgetl models/devices: devices/*.toml).")
@click.option("--extra", type=TableChoice(runtime_extras), default=None,
              help="Runtime extra [default: the profile's first backend the bundle has an extractor for].")
@click.option("--python", "python", default=None,
              help="Python version on the device, e.g. 3.11 [default: the one the profile names, else this one].")
@click.option("--platform", "platforms", multiple=True,
              help="pip platform tag, repeatable [default: manylinux 2.28 and older tags for the profile's arch].")
@click.option("--wheel", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="Prebuilt edgetl wheel [default: built from this checkout].")
@click.option("--archive", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the whole kit as one .tar.")
def kit(bundle_dir: Path, out: Path, profile: str, extra: str | None, python: str | None,
        platforms: tuple[str, ...], wheel: Path | None, archive: Path | None) -> None:
    """Write OUT: BUNDLE_DIR packed, every wheel edgetl[EXTRA] needs on PROFILE's platform, and install.sh that
    installs them on the device with `pip install --no-index --find-links` (no network there)."""
    from edgetl.kit import build_kit

    meta = build_kit(bundle_dir, out, profile, extra=extra, python=python, platforms=platforms or None, wheel=wheel,
                     archive=archive, progress=lambda msg: click.echo(msg, err=True))
    click.echo(f"wrote {out}: {len(meta['wheels'])} wheels for edgetl[{meta['extra']}] on {meta['profile']} "
               f"(CPython {meta['python']}, {meta['platforms'][0] if meta['platforms'] else 'this platform'}), "
               f"{meta['bytes'] / 1e6:.1f} MB{f'; archive {archive}' if archive else ''}")
    click.echo(f"on the device: sh {out.name}/install.sh")
