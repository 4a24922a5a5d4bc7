"""The ``edgetl`` command line: a thin layer over the Python API.

Errors edgetl raises on purpose (:class:`~edgetl.errors.EdgeTLError`) become one line on stderr and exit code 1;
``-v`` adds the traceback. Host commands import torch inside their bodies, so device commands never load it.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import click

from edgetl import __version__


class _Root(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        from edgetl.errors import EdgeTLError

        try:
            return super().invoke(ctx)
        except EdgeTLError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # noqa: BLE001 - an unexpected failure still gets one line, not a traceback
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            first = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(f"error: unexpected {type(exc).__name__}: {first} (run with -v for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress and show tracebacks on errors.")
@click.version_option(__version__, prog_name="edgetl")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """edgetl: on-device transfer learning (host: fine-tune and export; device: train a head and predict)."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from edgetl.cli import bundle, data, device, fleet, host, models

    main.add_command(models.models)
    main.add_command(bundle.bundle)
    main.add_command(bundle.keys)
    main.add_command(data.data)
    main.add_command(host.finetune)
    main.add_command(host.export)
    main.add_command(device.device)
    main.add_command(fleet.fleet)
    from edgetl.cli import field, kit

    device.device.add_command(field.watch)
    device.device.add_command(field.stream)
    bundle.bundle.add_command(kit.kit)


_register()
