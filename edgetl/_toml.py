"""Write TOML, the format of the files people read and edit (:mod:`tomllib` reads them back).

The standard library reads TOML but does not write it; this writes the structures edgetl needs: nested tables of
strings, integers, floats, booleans and arrays of those. A table holding only tables gets no header of its own
(``[tool.flwr.app]``, not ``[tool]`` then ``[tool.flwr]``), as a person would write it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from edgetl.errors import DataError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def string(text: str) -> str:
    """``text`` as a TOML basic string: quotes, backslashes and control characters escaped, everything else as is
    (UTF-8). A lone surrogate (an undecodable byte of a file name) has no TOML spelling: :class:`DataError`."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise DataError(f"{text!r} holds an undecodable character (U+{code:04X}) that TOML cannot represent; "
                            "rename the file or folder")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def key(name: str) -> str:
    """A key: bare where TOML allows it (letters, digits, ``_``, ``-``), quoted otherwise."""
    return name if _BARE_KEY.match(name) else string(name)


def value(v: Any) -> str:
    """One value: a string, bool, int, float (``inf``/``nan`` included) or an array of those."""
    if isinstance(v, str):
        return string(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, Sequence) and not isinstance(v, (bytes, bytearray)):
        return "[" + ", ".join(value(item) for item in v) + "]"
    raise DataError(f"cannot write {type(v).__name__} {v!r} as a TOML value; use a string, number, bool or array")


def _tables(table: Mapping[str, Any], path: tuple[str, ...]) -> list[str]:
    """The text of ``table`` (at ``path``) and of every table under it, one chunk per header."""
    scalars = [f"{key(k)} = {value(v)}\n" for k, v in table.items() if not isinstance(v, Mapping)]
    subtables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    chunks = []
    if path and (scalars or not subtables):
        chunks.append(f"[{'.'.join(key(p) for p in path)}]\n" + "".join(scalars))
    elif scalars:  # the root's own keys come before any header
        chunks.append("".join(scalars))
    for name, sub in subtables:
        chunks += _tables(sub, (*path, name))
    return chunks


def dumps(doc: Mapping[str, Any], header: str = "") -> str:
    """``doc`` as TOML text: its keys, then one ``[table]`` per nested mapping, a blank line between tables.
    ``header``: comment lines written first (each gets ``# ``)."""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + "\n".join(_tables(doc, ()))


__all__ = ["dumps", "key", "string", "value"]
