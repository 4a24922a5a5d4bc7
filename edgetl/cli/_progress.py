"""Progress bars for the library's progress callbacks (library code never prints).

Bars are drawn on stderr only when it is a terminal, so piped or logged output (CI, ``2> log``, a service) stays
clean; ``--quiet`` and ``--json`` turn them off too. ``EDGETL_PROGRESS=always`` draws them anyway (e.g. under a
pseudo-terminal that does not say so), ``EDGETL_PROGRESS=never`` never.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import click

ENV = "EDGETL_PROGRESS"


class _AsTerminal:
    """A text stream that says it is a terminal (click draws a bar only on one): for ``EDGETL_PROGRESS=always``."""

    def __init__(self, stream: IO[str]):
        self._stream = stream

    def isatty(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def wants_bars(stream: IO[str] | None = None) -> bool:
    """Whether progress bars go to ``stream`` (default stderr): ``EDGETL_PROGRESS`` always/never, else only when it
    is a terminal."""
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode in ("always", "1", "yes", "on"):
        return True
    if mode in ("never", "0", "no", "off"):
        return False
    stream = stream if stream is not None else click.get_text_stream("stderr")
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Yield a ``(stage, done, total)`` callback that draws one click progress bar per stage on stderr; it draws
    nothing unless ``enabled`` and :func:`wants_bars` (stderr is a terminal, or ``EDGETL_PROGRESS=always``)."""
    stream = click.get_text_stream("stderr")
    enabled = enabled and wants_bars(stream)
    if enabled and not stream.isatty():
        stream = _AsTerminal(stream)  # type: ignore[assignment]
    state: dict[str, Any] = {"stage": None, "bar": None, "done": 0}

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].render_finish()
            state["bar"] = None

    def update(stage: str, done: int, total: int) -> None:
        if not enabled or total <= 0:
            return
        if stage != state["stage"]:
            close()
            state.update(stage=stage, done=0,
                         bar=click.progressbar(length=total, label=stage.ljust(12), file=stream, show_pos=True,
                                                   show_percent=True))
            state["bar"].render_progress()
        if done > state["done"]:
            state["bar"].update(done - state["done"])
            state["done"] = done

    try:
        yield update
    finally:
        close()
