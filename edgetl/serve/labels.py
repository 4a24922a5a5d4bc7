"""The operator's labels: class names checked before they are used, the append-only ``labels.jsonl`` beside the
watcher's journal, and what they say about the heads (the confusion of the operator's label and the head's
prediction at the time)."""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl.errors import DataError

#: a class name an operator may give: starts with a letter or digit, then letters, digits, space, ``_ . + -``; at most
#: 64 characters; no path separator, no leading dot or underscore (the inbox's ``_label/<class>/`` layout and
#: :func:`edgetl.data.scan_image_folder` skip those), no trailing dot or space
LABEL_PATTERN = re.compile(r"[^\W_][\w .+\-]{0,63}")
LABELS_FILE = "labels.jsonl"


def check_label(name: object, known: list[str] | tuple[str, ...] = ()) -> str:
    """``name`` if it is a class the head knows or a valid new class name; else a one-line :class:`DataError`."""
    if isinstance(name, str) and name in known:
        return name
    if not isinstance(name, str) or not LABEL_PATTERN.fullmatch(name) or name.endswith((" ", ".")):
        shown = repr(name)[:80]
        raise DataError(f"{shown} is not a class name; use 1-64 letters, digits, spaces or _ . + - starting with a "
                        "letter or digit (no / \\ or leading dot)")
    return name


@dataclass(frozen=True)
class LabelRecord:
    """An operator's answer: image (content hash), class, and what the head in use said before the answer."""

    key: str
    file: str
    label: str
    predicted: str | None
    head_version: str | None
    time: str


@dataclass(frozen=True)
class LabelledImage:
    """A label whose image is still readable, and where it is now."""

    record: LabelRecord
    path: Path


@dataclass
class Agreement:
    """How often one head version's prediction matched the operator's label."""

    n: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def public(self) -> dict[str, float | int]:
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy}


@dataclass(frozen=True)
class Confusion:
    """Operator's label (rows) × the head's prediction at the time (columns), and the agreement per head version."""

    classes: list[str]
    matrix: npt.NDArray[np.int64]  #: (C, C) counts
    per_version: dict[str, Agreement]

    def public(self) -> dict[str, Any]:
        return {"classes": self.classes, "matrix": self.matrix.tolist(), "n": int(self.matrix.sum()),
                "per_version": {v: a.public() for v, a in self.per_version.items()},
                "basis": "the operator's labels vs what the head in use predicted before each label"}


class LabelBook:
    """The labels given so far, by image key, kept in ``path`` (JSON lines, appended and fsynced one by one; None:
    labelling is off)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._labels: dict[str, LabelRecord] = {}
        self._load()

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            lines = self.path.read_bytes().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                rec = json.loads(line)
                self._labels[rec["key"]] = LabelRecord(**{k: rec.get(k) for k in LabelRecord.__dataclass_fields__})
            except (ValueError, KeyError, TypeError):
                continue

    def __contains__(self, key: object) -> bool:
        return key in self._labels

    def records(self) -> list[LabelRecord]:
        with self._lock:
            return list(self._labels.values())

    def add(self, record: LabelRecord) -> None:
        """Append ``record`` to the file (never through a link) and remember it; a later label of the same image
        replaces the earlier one."""
        if self.path is None:
            raise DataError("labelling needs an inbox; start the console with --inbox DIR")
        line = (json.dumps(asdict(record)) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._labels[record.key] = record

    def confusion(self) -> Confusion:
        """Over every label given: what the device got wrong before a person corrected it."""
        records = self.records()
        classes = sorted({r.label for r in records} | {r.predicted for r in records if r.predicted})
        index = {c: k for k, c in enumerate(classes)}
        matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
        per_version: dict[str, Agreement] = {}
        for r in records:
            if r.predicted:
                matrix[index[r.label], index[r.predicted]] += 1
            if r.head_version and r.predicted:
                a = per_version.setdefault(r.head_version, Agreement())
                a.n += 1
                a.correct += int(r.predicted == r.label)
        return Confusion(classes, matrix, per_version)


__all__ = ["LABELS_FILE", "LABEL_PATTERN", "Agreement", "Confusion", "LabelBook", "LabelRecord", "LabelledImage",
           "check_label"]
