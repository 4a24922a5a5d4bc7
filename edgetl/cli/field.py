"""``edgetl device watch`` and ``edgetl device stream``: run unattended (no torch needed).

SIGTERM and SIGINT (systemd stop, Ctrl-C) finish the batch in progress, flush the results and exit 0.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import click

from edgetl.cli.device import _bundle_arg, _open, _runtime_options


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM / SIGINT for the duration of the block (previous handlers restored after)."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@click.command()
@_bundle_arg
@click.argument("inbox", type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Results journal, one JSON line per image [default: INBOX/_watch/results.jsonl].")
@click.option("--move-done", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Move each processed image into this folder (sub-paths kept).")
@click.option("--interval", type=click.FloatRange(min=0.01), default=2.0, show_default=True,
              help="Seconds between polls of an idle inbox.")
@click.option("--settle", type=click.FloatRange(min=0), default=None,
              help="Seconds a file's size and mtime must hold still before it is read [default: --interval]; 0 for "
                   "writers that rename complete files into place.")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=None,
              help="Images embedded per batch [default: the profile's].")
@click.option("--learn-every", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="Seconds between checks of INBOX/_label/<class>/ for new labelled images (retrain through the "
                   "promote gate); 0 checks every poll.")
@click.option("--no-learn", is_flag=True, help="Never retrain from INBOX/_label.")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Promote gate for field learning.")
@click.option("--once", is_flag=True, help="Process what is ready now (waiting --settle once), then exit.")
@click.option("--quiet", is_flag=True, help="No per-batch progress lines on stderr.")
@_runtime_options
def watch(bundle: Path, inbox: Path, out: Path | None, move_done: Path | None, interval: float, settle: float | None,
          batch_size: int | None, learn_every: float, no_learn: bool, tolerance: float, once: bool, quiet: bool,
          **opts: Any) -> None:
    """Classify every image that lands in INBOX, exactly once, even across restarts and kill -9.

    Files are read once complete (size and mtime still for --settle seconds); dotfiles and *.part / *.tmp are
    ignored; links are never followed; unreadable images go to INBOX/_failed/ with a .reason file (with --settle > 0
    after a second try one settle window later). SIGTERM / SIGINT: finish the batch, flush, exit 0."""
    from edgetl.watch import InboxWatcher

    last = [0.0]

    def events(event: dict[str, Any]) -> None:
        if quiet:
            return
        if event["event"] == "batch":
            if time.monotonic() - last[0] < 5.0:  # one progress line every 5 s at most
                return
            last[0] = time.monotonic()
            click.echo(f"{event['processed']} images ({event['failed']} set aside), head {event['head_version']}, "
                       f"{event['images_per_s'] or 0:.1f} images/s", err=True)
        elif event["event"] == "learn":
            outcome = "promoted" if event.get("promoted") else "kept as a candidate"
            what = event.get("error") or f"{event['version']} {outcome}: {event['reason']}"
            click.echo(f"field learning on {event['n']} labelled images: {what}", err=True)

    rt = _open(bundle, opts)
    with _stop_on_signals() as stop, InboxWatcher(
            rt, inbox, out=out, move_done=move_done, interval=interval, settle=settle, batch_size=batch_size,
            learn_every=None if no_learn else learn_every, tolerance=tolerance, events=events) as watcher:
        if not quiet:
            click.echo(f"watching {inbox} -> {watcher.out} (head {watcher.head.version}; {watcher.journal.lines} "
                       "images already recorded); SIGTERM/Ctrl-C stops cleanly", err=True)
        if once:
            watcher.process_once(stop)
            if watcher.settle > 0 and not stop.is_set():
                stop.wait(watcher.settle)
                watcher.process_once(stop)
            if not no_learn and not stop.is_set():
                watcher.learn_once()
        else:
            watcher.run(stop)
        stats = watcher.stats.as_dict()
    retried = f", {stats['retried']} retried after a failed read" if stats["retried"] else ""
    click.echo(f"processed {stats['processed']} images ({stats['failed']} set aside{retried}) in "
               f"{stats['elapsed_s']:.1f} s"
               f"{' (stopped by signal)' if stop.is_set() else ''}", err=True)


@click.command()
@_bundle_arg
@click.option("--camera", type=click.IntRange(min=0), default=None, help="Camera index (/dev/videoN).")
@click.option("--video", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Video file.")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Classify one frame in N (frames 0, N, 2N, ...).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Append JSON lines here [default: stdout].")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop after this many predictions.")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=None,
              help="Frames per batch [default: the profile's for a video, 1 for a camera].")
@_runtime_options
def stream(bundle: Path, camera: int | None, video: Path | None, every: int, out: Path | None,
           max_frames: int | None, batch_size: int | None, **opts: Any) -> None:
    """Classify frames from a camera or a video file (OpenCV: pip install 'edgetl[stream]'); one JSON line per
    sampled frame. SIGTERM / SIGINT: finish the batch, flush, exit 0."""
    from edgetl.stream import stream_predictions

    if (camera is None) == (video is None):
        raise click.UsageError("pass exactly one of --camera INDEX or --video FILE")
    rt = _open(bundle, opts)
    n = 0
    with _stop_on_signals() as stop, _output(out) as fh:
        for row in stream_predictions(rt, camera=camera, video=video, every=every, batch_size=batch_size,
                                      max_frames=max_frames, stop_event=stop):
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
            n += 1
            fh.flush()
    click.echo(f"{n} frames classified{' (stopped by signal)' if stop.is_set() else ''}", err=True)


@contextlib.contextmanager
def _output(out: Path | None) -> Iterator[TextIO]:
    if out is None:
        yield click.get_text_stream("stdout")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as fh:
        yield fh


__all__ = ["stream", "watch"]
