"""Option choices read from the dispatch tables, never typed twice.

Each table lives with the code it dispatches to (the runtimes, the heads, the fleet, the export formats); most of
those modules import numpy, which the CLI must not load at start-up (``edgetl --help`` stays fast on a Pi). So a
:class:`TableChoice` reads its table the first time click needs it: to check a value, to print ``--help``, or to
complete a word.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import click


class TableChoice(click.Choice):  # type: ignore[type-arg]
    """A :class:`click.Choice` whose choices come from ``load()``, called once, when first needed."""

    def __init__(self, load: Callable[[], Iterable[str]], case_sensitive: bool = True) -> None:
        self._load = load
        self._loaded: tuple[str, ...] | None = None
        self.case_sensitive = case_sensitive

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        if self._loaded is None:
            self._loaded = tuple(self._load())
        return self._loaded

    @choices.setter
    def choices(self, value: Iterable[str]) -> None:
        self._loaded = tuple(value)


# ------------------------------------------------------------------------------------------ the tables, by name
def backends() -> list[str]:
    """Inference runtimes, i.e. the graph formats a bundle holds (:data:`edgetl.runtime.BACKENDS`)."""
    from edgetl.runtime import BACKENDS

    return list(BACKENDS)


def runtime_extras() -> list[str]:
    """The pip extra that installs each runtime (:data:`edgetl.runtime.BACKENDS`), once each."""
    from edgetl.runtime import BACKENDS

    return list(dict.fromkeys(extra for *_, extra in BACKENDS.values()))


def precisions() -> list[str]:
    """Extractor precisions (:data:`edgetl.profiles.PRECISIONS`)."""
    from edgetl.profiles import PRECISIONS

    return list(PRECISIONS)


#: the name ``export --quantize`` gives FP32 (no quantization)
NO_QUANTIZATION = "none"


def quantizations() -> list[str]:
    """``export --quantize``: the precisions, FP32 spelled :data:`NO_QUANTIZATION`."""
    return [NO_QUANTIZATION if p == "fp32" else p for p in precisions()]


def trainable_heads() -> list[str]:
    """Head kinds ``device train --head`` fits (:data:`edgetl.heads.HEADS`); a depth head wraps one of them and is
    chosen by ``--features``, not by name."""
    from edgetl.heads import HEADS, DepthHead

    return [kind for kind, cls in HEADS.items() if not issubclass(cls, DepthHead)]


def fleet_heads() -> list[str]:
    """Heads a fleet trains (:data:`edgetl.fleet.app.HEAD_KINDS`)."""
    from edgetl.fleet.app import HEAD_KINDS

    return list(HEAD_KINDS)


def fleet_strategies() -> list[str]:
    """Softmax fleet strategies (:data:`edgetl.fleet.app.SOFTMAX_STRATEGIES`)."""
    from edgetl.fleet.app import SOFTMAX_STRATEGIES

    return list(SOFTMAX_STRATEGIES)


def fleet_drills() -> list[str]:
    """Faults a staging device can rehearse (:data:`edgetl.fleet.app.DRILLS`)."""
    from edgetl.fleet.app import DRILLS

    return list(DRILLS)


def export_model_formats() -> list[str]:
    """Formats ``device export-model`` writes (:data:`edgetl.export_model.FORMATS`)."""
    from edgetl.export_model import FORMATS

    return list(FORMATS)


__all__ = ["NO_QUANTIZATION", "TableChoice", "backends", "export_model_formats", "fleet_drills",
           "fleet_heads", "fleet_strategies", "precisions", "quantizations", "runtime_extras", "trainable_heads"]
