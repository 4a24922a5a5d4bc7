"""Text on the device (numpy + ``tokenizers`` + ONNX Runtime, never torch or transformers): tokenizer loading, text
data sets and the text loader :class:`edgetl.device.DeviceRuntime` embeds documents with.

Text data comes in two layouts, read into the same :class:`~edgetl.data.ImageFolder` structure the heads and the
store already use (its samples are files or :class:`TextRecord` rows):

- a folder with one sub-folder per class holding ``.txt`` files (UTF-8, one document per file), or
- a CSV file with a header naming a ``text`` and a ``label`` column (one document per row).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl.data import ImageFolder, Sample, open_input, scan_class_folders
from edgetl.errors import DataError, RuntimeMissingError

TEXT_SUFFIXES = frozenset({".txt"})
CSV_SUFFIXES = frozenset({".csv"})
#: larger documents are refused before they are read (the encoder sees max_length tokens anyway)
MAX_TEXT_BYTES = 10_000_000


@dataclass(frozen=True)
class TextRecord:
    """One document that is not a file of its own (a CSV row, or a string an application passes in)."""

    text: str
    source: str = "<text>"

    def __str__(self) -> str:
        return self.source


TextItem = Path | TextRecord


# ------------------------------------------------------------------------------------------------------- reading
def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8 or remove "
                        "it") from exc


def read_text(item: TextItem | str | os.PathLike[str]) -> str:
    """The document of a ``.txt`` file or a :class:`TextRecord`; an empty, blank, undecodable, oversized or missing
    file raises :class:`DataError` naming it."""
    if isinstance(item, TextRecord):
        text = item.text
    else:
        path = Path(item)
        try:
            with open_input(path, "text file", ".txt files") as fh:  # a regular file, opened without blocking (never a FIFO)
                size = os.fstat(fh.fileno()).st_size
                if size > MAX_TEXT_BYTES:
                    raise DataError(f"text file {path} has {size} bytes, more than the limit of {MAX_TEXT_BYTES}; "
                                    "split it into documents")
                raw = fh.read()
            text = _decode(raw, f"text file {path}")
        except FileNotFoundError as exc:
            raise DataError(f"text file {path} does not exist") from exc
        except IsADirectoryError as exc:
            raise DataError(f"{path} is a folder, not a text file; pass .txt files") from exc
        except OSError as exc:
            raise DataError(f"cannot read text file {path} ({exc.strerror or exc}); check it") from exc
    if not text.strip():
        raise DataError(f"document {item} is empty; remove it or give it some text")
    return text


def text_key(item: TextItem) -> str:
    """The embedding store's key: sha256 of the file's bytes, or of a record's UTF-8 text."""
    if isinstance(item, TextRecord):
        return hashlib.sha256(item.text.encode("utf-8")).hexdigest()
    from edgetl.store import content_hash

    return content_hash(item)


def _is_text(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in TEXT_SUFFIXES and not path.name.startswith(".")


def read_csv(path: str | os.PathLike[str], min_classes: int = 2, labelled: bool = True) -> ImageFolder:
    """A CSV with a header holding ``text`` and (when ``labelled``) ``label`` columns → a labelled set of
    :class:`TextRecord` rows, classes sorted by name. Blank rows, a missing column, undecodable bytes, an empty
    document or fewer than ``min_classes`` classes raise :class:`DataError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file {path} does not exist; pass a CSV with 'text' and 'label' columns")
    if path.stat().st_size > 50 * MAX_TEXT_BYTES:
        raise DataError(f"CSV file {path} is larger than {50 * MAX_TEXT_BYTES} bytes; split it")
    content = _decode(path.read_bytes(), f"CSV file {path}")
    try:
        reader = csv.reader(io.StringIO(content, newline=""))
        header = next(reader, None)
        if header is None:
            raise DataError(f"CSV file {path} is empty; expected a header line 'text,label' and one row per document")
        columns = [h.strip().lower() for h in header]
        needed = ("text", "label") if labelled else ("text",)
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"CSV file {path} has columns {header} but no {' or '.join(repr(m) for m in missing)} "
                            "column; write a header line 'text,label'")
        ti = columns.index("text")
        li = columns.index("label") if "label" in columns else None
        rows: list[tuple[str, str, int]] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line = reader.line_num
            if len(row) <= max(ti, li or 0):
                raise DataError(f"{path}:{line} has {len(row)} fields, fewer than the header's {len(header)}; fix the "
                                "row (quote text that holds commas)")
            text, label = row[ti], (row[li].strip() if li is not None else "")
            if not text.strip():
                raise DataError(f"{path}:{line} has an empty text; remove the row or give it some text")
            if labelled and not label:
                raise DataError(f"{path}:{line} has no label; give every row a label")
            rows.append((text, label, line))
    except csv.Error as exc:
        raise DataError(f"CSV file {path} is malformed ({exc}); check its quoting") from exc
    if not rows:
        raise DataError(f"CSV file {path} holds no documents; expected one row per document under 'text,label'")
    classes = sorted({label for _, label, _ in rows}) if labelled else [""]
    if labelled and len(classes) < min_classes:
        raise DataError(f"CSV file {path} has {len(classes)} class ({', '.join(classes)}); a classifier needs at "
                        f"least {min_classes} classes — add rows with other labels")
    index = {c: i for i, c in enumerate(classes)}
    samples = tuple(Sample(TextRecord(text, f"{path}:{line}"), index[label] if labelled else 0)  # type: ignore[arg-type]
                    for text, label, line in rows)
    return ImageFolder(path, tuple(classes), samples)


def list_texts(root: str | os.PathLike[str]) -> list[TextItem]:
    """Every document under ``root``: its ``.txt`` files (recursively, sorted, hidden skipped), or every row of a
    CSV file (its ``text`` column); empty when ``root`` is neither."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() in CSV_SUFFIXES:
        return [s.path for s in read_csv(root, labelled=False).samples]
    return sorted(p for p in root.rglob("*") if _is_text(p)) if root.is_dir() else []


def scan_text_data(root: str | os.PathLike[str] | ImageFolder, min_classes: int = 2) -> ImageFolder:
    """A labelled text set from a folder (``root/<class>/<doc>.txt``) or a CSV file (``text,label``)."""
    if isinstance(root, ImageFolder):
        return root
    root = Path(root)
    if root.is_file() and root.suffix.lower() in CSV_SUFFIXES:
        return read_csv(root, min_classes)
    if not root.is_dir():
        raise DataError(f"text data {root} does not exist; pass a folder with one sub-folder of .txt files per class, "
                        "or a CSV file with 'text,label' columns")
    return scan_class_folders(root, min_classes, _is_text, "documents",
                              f"{root}/<class>/<document>.txt, or a CSV file with 'text,label' columns",
                              "text data folder")


# ----------------------------------------------------------------------------------------------------- tokenizing
def load_tokenizer(path: str | os.PathLike[str], max_length: int) -> Any:
    """A ``tokenizers.Tokenizer`` from a Hugging Face ``tokenizer.json``, truncating to ``max_length`` tokens and
    padding each batch to its longest document (pad id from the file, else 0)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise RuntimeMissingError("the tokenizers package is not installed; install the text extra: "
                                  "pip install 'edgetl[text]'") from exc
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        from edgetl.errors import BundleError

        raise BundleError(f"tokenizer {path} is unreadable ({str(exc).splitlines()[0] if str(exc) else exc}); "
                          "re-export the bundle") from exc
    padding = tokenizer.padding or {}
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=int(padding.get("pad_id", 0)), pad_token=str(padding.get("pad_token", "[PAD]")))
    return tokenizer


def pack(ids: npt.ArrayLike, mask: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Token ids ``(N, L)`` and attention mask ``(N, L)`` → the text extractor's input ``(N, 2, L)`` int64."""
    return np.stack([np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64)], axis=1)


def tokenize(tokenizer: Any, texts: Sequence[str]) -> npt.NDArray[np.int64]:
    """Documents → packed tokens ``(N, 2, L)``, ``L`` the longest document of the batch (at most max_length)."""
    if not texts:
        return np.zeros((0, 2, 1), dtype=np.int64)
    encodings = tokenizer.encode_batch(list(texts))
    return pack([e.ids for e in encodings], [e.attention_mask for e in encodings])


class TextLoader:
    """How a text bundle's documents become encoder inputs: the device's one dispatch point for text (see
    :mod:`edgetl.modality`)."""

    modality = "text"
    noun = "documents"

    def __init__(self, bundle: Any):
        pp = bundle.text_preprocessing
        self.tokenizer = load_tokenizer(bundle.file(pp.tokenizer), pp.max_length)

    def scan(self, data: str | os.PathLike[str] | ImageFolder, min_classes: int = 2) -> ImageFolder:
        return scan_text_data(data, min_classes)

    def list(self, root: str | os.PathLike[str]) -> list[TextItem]:
        return list_texts(root)

    def key(self, item: TextItem) -> str:
        return text_key(item)

    def inputs(self, items: Sequence[TextItem | str | os.PathLike[str]]) -> npt.NDArray[np.int64]:
        """Files or records → packed tokens ``(N, 2, L)``."""
        return tokenize(self.tokenizer, [read_text(i) for i in items])

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.int64]:
        """Strings → packed tokens ``(N, 2, L)``."""
        return tokenize(self.tokenizer, texts)


__all__ = ["TextItem", "TextLoader", "TextRecord", "list_texts", "load_tokenizer", "pack", "read_csv", "read_text",
           "scan_text_data", "text_key", "tokenize"]
