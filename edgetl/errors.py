"""Exception hierarchy. Every error edgetl raises on purpose is an :class:`EdgeTLError`.

Each subclass also inherits the matching built-in, so ``except ValueError`` keeps working for callers that do not know
edgetl. Messages say what was expected, what was found and how to fix it, on one line.
"""

from __future__ import annotations


class EdgeTLError(Exception):
    """Root of every error edgetl raises deliberately; the CLI turns it into one line and exit code 1."""


class RegistryError(EdgeTLError, ValueError):
    """A registry entry (models/*.toml, devices/*.toml) is missing, unknown or malformed."""


class WeightsError(EdgeTLError, FileNotFoundError):
    """Pretrained weights are missing or do not match their recorded sha256."""


class DataError(EdgeTLError, ValueError):
    """A data set folder or an input image is empty, unreadable or unusable."""


class BundleError(EdgeTLError, ValueError):
    """A bundle is missing, malformed, tampered with or truncated."""


class ExportValidationError(EdgeTLError, ValueError):
    """An exported graph does not compute what the PyTorch model computes, within tolerance."""


class RuntimeMissingError(EdgeTLError, ImportError):
    """An inference runtime (or the host extra) is not installed."""


class NotFittedError(EdgeTLError, ValueError):
    """A head was used before it was fitted, or no head has been trained on the device yet."""


class StateError(EdgeTLError, RuntimeError):
    """The device state (head versions, store) is inconsistent or locked."""


def one_line(exc: BaseException) -> str:
    """The first non-empty line of a third-party exception's message (the type name when it has none): runtimes and
    quantizers raise multi-line messages with C++ traces; edgetl's own messages stay one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
