"""``edgetl device serve``: the operator's console (a page and a JSON API; needs the ``serve`` extra)."""

from __future__ import annotations

import secrets
import stat
from pathlib import Path
from typing import Any

import click

from edgetl.cli.device import _bundle_arg, _open, _runtime_options

MIN_TOKEN = 16


def read_token(path: Path) -> str:
    """The secret in ``path`` (surrounding whitespace stripped): at least 16 characters, one line."""
    from edgetl.errors import DataError

    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"--token-file {path} is not a regular file; pass a file holding the token")
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise DataError(f"cannot read --token-file {path} ({exc.strerror or exc}); check the path and its "
                        "permissions") from None
    except UnicodeDecodeError:
        raise DataError(f"--token-file {path} is not UTF-8 text; write the token as one line of text") from None
    if len(text) < MIN_TOKEN or any(c.isspace() for c in text):
        raise DataError(f"--token-file {path} must hold one token of at least {MIN_TOKEN} characters without spaces; "
                        "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE")
    if info.st_mode & 0o077:
        import logging

        logging.getLogger(__name__).warning("--token-file %s is readable by other users; chmod 600 it", path)
    return text


@click.command()
@_bundle_arg
@click.option("--inbox", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder images arrive in: its images are classified (an inbox watcher runs inside the console "
                   "unless `device watch` already runs on it) and feed the label queue.")
@click.option("--results", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The watcher's journal (default INBOX/_watch/results.jsonl).")
@click.option("--move-done", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the watcher moves processed images (as `device watch --move-done`).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --token-file.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="File holding the API token (default on loopback: a random token, printed at start).")
@click.option("--max-upload", type=click.IntRange(min=1), default=10 << 20, show_default=True,
              help="Largest request body (an uploaded image) in bytes.")
@click.option("--interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds between inbox scans.")
@click.option("--settle", type=click.FloatRange(min=0), default=None,
              help="Seconds an inbox file must stay unchanged before it is read (default: --interval).")
@click.option("--pool", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Most recent unlabelled images ranked in the label queue.")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Promote gate of training from labels (as `device train --tolerance`).")
@click.option("--wait", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds a state change waits for another writer to finish.")
@_runtime_options
def serve(bundle: Path, inbox: Path | None, results: Path | None, move_done: Path | None, host: str, port: int,
          token_file: Path | None, max_upload: int, interval: float, settle: float | None, pool: int,
          tolerance: float, wait: float, **opts: Any) -> None:
    """The operator's console: a page and a JSON API to see predictions, label what the device is unsure of (the
    label queue ranks by uncertainty and novelty), train through the promote gate, roll back, and /metrics for
    Prometheus. Binds to 127.0.0.1 unless told otherwise."""
    import os

    # concurrent requests are the console's parallelism: numpy's BLAS threads beside the runtime's own threads only
    # oversubscribe the cores (measured: a single-image novelty score took 114 ms instead of 6 ms right after an ONNX
    # Runtime call on 2 cores); set before numpy loads, and only where the user has not chosen
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from edgetl.errors import DataError, RuntimeMissingError

    try:
        import uvicorn

        from edgetl.serve.app import ServeSettings, create_app, is_loopback
        from edgetl.serve.console import Console
    except ImportError as exc:
        raise RuntimeMissingError(f"device serve needs the serve extra ({exc.name} is missing): pip install "
                                  "'edgetl[serve]'") from None
    if token_file is None and not is_loopback(host):
        raise DataError(f"--host {host} exposes the console beyond this machine; pass --token-file FILE (a secret of "
                        f"at least {MIN_TOKEN} characters), or keep the default --host 127.0.0.1")
    token = read_token(token_file) if token_file is not None else secrets.token_urlsafe(24)
    rt = _open(bundle, opts)
    console = Console(rt, inbox=inbox, results=results, move_done=move_done, pool=pool, lock_wait=wait,
                      tolerance=tolerance)
    watcher = _watcher(rt, inbox, results, move_done, interval, settle) if inbox is not None else None
    settings = ServeSettings(token=token, host=host, port=port, max_upload=max_upload)
    app = create_app(console, settings, watcher)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"edgetl console on http://{shown}:{port}/ (bundle {bundle}, head {rt.current_version() or 'none'})")
    if token_file is None:
        click.echo(f"open http://{shown}:{port}/#token={token}   (API: Authorization: Bearer {token})")
    else:
        click.echo(f"token: the content of {token_file}; open http://{shown}:{port}/#token=TOKEN")
    # at most 64 requests in flight (more get 503): memory stays bounded under a burst
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False, access_log=False,
                limit_concurrency=64, timeout_keep_alive=5)


def _watcher(rt: Any, inbox: Path, results: Path | None, move_done: Path | None, interval: float,
             settle: float | None) -> Any:
    """The inbox watcher the console runs in a thread; when another process already watches this inbox (its journal
    lock is held), the console only reads the journal."""
    import logging

    from edgetl.errors import StateError
    from edgetl.watch import InboxWatcher

    log = logging.getLogger(__name__)

    def run(stop: Any) -> str | None:
        try:
            watcher = InboxWatcher(rt, inbox, out=results, move_done=move_done, interval=interval, settle=settle)
        except StateError as exc:
            if "another watcher" not in str(exc):
                raise
            log.warning("%s; the console reads its journal", exc)
            return "external (another watcher writes the journal; the console reads it)"
        with watcher:
            watcher.run(stop)
        return None

    return run
