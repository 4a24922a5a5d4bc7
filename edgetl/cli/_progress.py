"""Progress bars for the library's progress callbacks (library code never prints)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Yield a ``(stage, done, total)`` callback that draws one click progress bar per stage on stderr."""
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
                         bar=click.progressbar(length=total, label=stage.ljust(12), file=click.get_text_stream("stderr")))
            state["bar"].render_progress()
        if done > state["done"]:
            state["bar"].update(done - state["done"])
            state["done"] = done

    try:
        yield update
    finally:
        close()
