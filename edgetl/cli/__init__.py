"""The ``edgetl`` command line: a thin layer over the Python API.

Errors edgetl raises on purpose (:class:`~edgetl.errors.EdgeTLError`) become one line on stderr and exit code 1;
``-v`` adds the traceback. Host commands import torch inside their bodies, so device commands never load it.
"""

from __future__ import annotations

import logging
import sys
import traceback
import unicodedata
from typing import Any

import click

from edgetl import __version__

#: characters shown escaped in messages: controls (newline, carriage return, escape …), line and paragraph
#: separators, lone surrogates (undecodable bytes of a file name) and the bidirectional overrides that reorder text
_ESCAPED_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def one_line(text: str) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``, ``\\u202e`` …), so that a message naming
    a user's file is always exactly one line and cannot forge another ``error:`` line or recolour the terminal."""
    return "".join(ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   if unicodedata.category(ch) in _ESCAPED_CATEGORIES or ch in _BIDI else ch for ch in text)


class _Root(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        from edgetl.errors import EdgeTLError

        try:
            return super().invoke(ctx)
        except EdgeTLError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            click.echo(f"error: {one_line(str(exc))}", err=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # noqa: BLE001 - an unexpected failure still gets one line, not a traceback
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            text = one_line(str(exc))
            text = text if len(text) <= 300 else text[:300] + "…"
            click.echo(f"error: unexpected {type(exc).__name__}: {text} (run with -v for the traceback)", err=True)
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
    from edgetl.cli import export_model, field, kit, serve

    device.device.add_command(field.watch)
    device.device.add_command(field.stream)
    device.device.add_command(serve.serve)  # the operator's console
    device.device.add_command(export_model.export_model)
    bundle.bundle.add_command(kit.kit)


_register()
