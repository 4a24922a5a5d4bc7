"""On-device embedding store: a cache of embeddings keyed by the image's content hash, one SQLite file per extractor
sha256 (``store/<sha256[:16]>.sqlite``) so that embeddings of different extractors (FP32 vs INT8, old vs new bundle)
never mix.

SQLite from the standard library, in WAL mode: every :meth:`EmbeddingStore.save` is one transaction that *inserts*
(never rewrites the whole file), readers run concurrently with a writer, and two processes that both add embeddings
(``device train`` and a ``device drift`` started meanwhile) both keep theirs — the store merges, it is never
overwritten by a stale copy. Embeddings are float32 blobs (little-endian). Deleting (:meth:`retain`, the per-class
budget) is done by writers that hold the device's writer lock. A store of the earlier format (``<sha16>.npz``, float16)
is migrated on first open and its file removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
import numpy.typing as npt

from edgetl.errors import StateError

log = logging.getLogger(__name__)

SUFFIX = ".sqlite"
LEGACY_SUFFIX = ".npz"
BUSY_TIMEOUT_S = 60.0  #: how long a transaction waits for another process's write transaction
_CHUNK = 500  #: keys per SELECT ... IN (...) (below SQLite's default limit of 999 variables)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, vec BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def content_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (renaming or moving an image keeps its cached embedding)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def store_path(folder: Path, extractor_sha256: str) -> Path:
    """The store file of one extractor."""
    return folder / f"{extractor_sha256[:16]}{SUFFIX}"


class EmbeddingStore:
    """Embeddings of one extractor in ``folder/<extractor sha256[:16]>.sqlite``.

    :meth:`put` buffers in memory; :meth:`save` writes the buffer in one transaction (insert or replace: rows other
    processes added meanwhile are kept). :meth:`get` sees saved rows of every process and this object's buffer.
    Use it as a context manager (or call :meth:`close`). ``StateError`` when the file cannot be opened or written."""

    def __init__(self, folder: Path, extractor_sha256: str):
        self.folder = Path(folder)
        self.path = store_path(self.folder, extractor_sha256)
        self.legacy_path = self.folder / f"{extractor_sha256[:16]}{LEGACY_SUFFIX}"
        self._pending: dict[str, bytes] = {}
        self._db = self._connect()
        if self.legacy_path.is_file():
            self._migrate()

    # ------------------------------------------------------------------------------------------------- plumbing
    def _connect(self) -> sqlite3.Connection:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            db = self._open()
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise StateError(self._error("open", exc)) from exc
            # a damaged cache is only a cache: set it aside (never deleted) and start again; images are re-embedded
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
            log.warning("embedding store %s is damaged (%s); moved to %s, starting an empty one", self.path, exc, aside)
            try:
                os.replace(self.path, aside)
                for extra in ("-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(f"{self.path}{extra}", f"{aside}{extra}")
                db = self._open()
            except (OSError, sqlite3.Error) as exc2:
                raise StateError(self._error("open", exc2)) from exc2
        except OSError as exc:
            raise StateError(self._error("open", exc)) from exc
        return db

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            # 16 KiB pages hold three 1280-d float32 rows each (the default 4 KiB spills every row onto overflow pages:
            # 2.4x slower to fill, 2x slower to read); only effective when the file is created
            db.execute("PRAGMA page_size=16384")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a committed embedding survives a power cut (heads rely on it)
            db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM embeddings LIMIT 1").fetchone()  # a damaged file fails here
        except BaseException:
            db.close()
            raise
        return db

    def _error(self, what: str, exc: BaseException) -> str:
        return (f"cannot {what} the embedding store {self.path} ({type(exc).__name__}: {exc}); free space or fix "
                "permissions of the bundle's state/ folder")

    def _migrate(self) -> None:
        """Import ``<sha16>.npz`` (the earlier whole-file format, float16) and remove it. Idempotent: rows already in
        the database win (they are newer), so two processes migrating at once do no harm."""
        try:
            with np.load(self.legacy_path, allow_pickle=False) as data:
                keys, emb = data["keys"], data["embeddings"]
            rows = [(str(k), np.asarray(e, dtype="<f4").tobytes()) for k, e in zip(keys, emb)]
        except FileNotFoundError:
            return  # another process migrated it meanwhile
        except (OSError, ValueError, KeyError, EOFError) as exc:
            log.warning("old embedding store %s is unreadable (%s); not migrated (images are re-embedded)",
                        self.legacy_path, exc)
            rows = []
        try:
            with self._transaction():
                self._db.executemany("INSERT OR IGNORE INTO embeddings (key, vec) VALUES (?, ?)", rows)
                self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('migrated_from', ?)",
                                 (self.legacy_path.name,))
            aside = self.legacy_path.with_name(self.legacy_path.name + ".migrated")
            os.replace(self.legacy_path, aside)
            aside.unlink(missing_ok=True)
            log.info("migrated %d embeddings from %s to %s", len(rows), self.legacy_path, self.path)
        except FileNotFoundError:
            return
        except (OSError, sqlite3.Error) as exc:
            raise StateError(self._error("migrate into", exc)) from exc

    @contextlib.contextmanager
    def _transaction(self):  # type: ignore[no-untyped-def]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database (unsaved :meth:`put` calls are lost; call :meth:`save` first)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        try:
            n = int(self._db.execute("SELECT count(*) FROM embeddings").fetchone()[0])
            if self._pending:
                n += sum(v is None for v in self._select(list(self._pending)).values())
        except sqlite3.Error as exc:
            raise StateError(self._error("read", exc)) from exc
        return n

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def _select(self, keys: Sequence[str], size: int = _CHUNK) -> dict[str, bytes | None]:
        found: dict[str, bytes | None] = dict.fromkeys(keys)
        for start in range(0, len(keys), size):
            chunk = keys[start:start + size]
            marks = ",".join("?" * len(chunk))
            for key, vec in self._db.execute(f"SELECT key, vec FROM embeddings WHERE key IN ({marks})", chunk):
                found[key] = vec
        return found

    def get(self, key: str) -> npt.NDArray[np.float32] | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Iterable[str], chunk: int | None = None) -> list[npt.NDArray[np.float32] | None]:
        """The embedding of each key (None where absent), in order; one query per ``chunk`` keys (default and at most
        500). Each chunk's blobs become arrays before the next is read, so at most one chunk of raw rows is held
        beside the result (``chunk``: a memory budget's ``store_chunk``, :mod:`edgetl.budget`)."""
        keys = [str(k) for k in keys]
        size = max(1, min(_CHUNK, int(chunk))) if chunk else _CHUNK
        out: list[npt.NDArray[np.float32] | None] = []
        for start in range(0, len(keys), size):
            part = keys[start:start + size]
            try:
                saved = self._select([k for k in dict.fromkeys(part) if k not in self._pending], size)
            except sqlite3.Error as exc:
                raise StateError(self._error("read", exc)) from exc
            for k in part:
                blob = self._pending[k] if k in self._pending else saved.get(k)
                out.append(None if blob is None else np.frombuffer(blob, dtype="<f4").astype(np.float32))
            del saved
        return out

    def keys(self) -> list[str]:
        """Every saved key (and buffered ones)."""
        try:
            saved = [k for (k,) in self._db.execute("SELECT key FROM embeddings")]
        except sqlite3.Error as exc:
            raise StateError(self._error("read", exc)) from exc
        return list(dict.fromkeys([*saved, *self._pending]))

    # -------------------------------------------------------------------------------------------------- writing
    def put(self, key: str, embedding: np.ndarray) -> None:
        """Buffer one embedding (float32); :meth:`save` writes it."""
        self._pending[str(key)] = np.ascontiguousarray(embedding, dtype="<f4").reshape(-1).tobytes()

    def save(self) -> None:
        """Write buffered embeddings in one transaction (insert or replace; nothing else is touched)."""
        if not self._pending:
            return
        try:
            with self._transaction():
                self._db.executemany("INSERT OR REPLACE INTO embeddings (key, vec) VALUES (?, ?)",
                                     self._pending.items())
        except sqlite3.Error as exc:
            raise StateError(self._error("write", exc)) from exc
        self._pending.clear()

    def retain(self, keys: set[str]) -> int:
        """Delete every embedding whose key is not in ``keys`` (buffered ones are saved first); returns how many.
        Only a caller holding the device's writer lock may call this (it is a deletion, not a merge)."""
        self.save()
        keep = {str(k) for k in keys}
        try:
            with self._transaction():
                drop = [(k,) for (k,) in self._db.execute("SELECT key FROM embeddings") if k not in keep]
                self._db.executemany("DELETE FROM embeddings WHERE key = ?", drop)
        except sqlite3.Error as exc:
            raise StateError(self._error("write", exc)) from exc
        return len(drop)

    def file_bytes(self) -> int:
        """Bytes on disk (database and its write-ahead log)."""
        total = 0
        for p in (self.path, Path(f"{self.path}-wal")):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text or "corrupt" in text


def reservoir(y: np.ndarray, n_old: int, budget: int, seen: dict[int, int], seed: int = 0
              ) -> tuple[np.ndarray, dict[int, int]]:
    """Per-class reservoir sampling (Vitter's algorithm R) over a stream of labelled samples.

    ``y[:n_old]`` is the current reservoir (rows already kept), ``y[n_old:]`` the new samples in arrival order;
    ``seen[c]`` counts the samples of class ``c`` offered so far (at least its kept rows). Each class keeps at most
    ``budget`` rows, a uniform random sample of every sample of that class ever offered. Returns the sorted indices
    of the rows to keep and the updated counts.
    """
    rng = np.random.default_rng(seed)
    kept: dict[int, list[int]] = {}
    for i in range(n_old):
        kept.setdefault(int(y[i]), []).append(i)
    counts = {c: max(seen.get(c, 0), len(rows)) for c, rows in kept.items()}
    for c, rows in kept.items():
        if len(rows) > budget:  # a smaller budget than before: a uniform subsample of the reservoir stays uniform
            kept[c] = sorted(rng.choice(rows, size=budget, replace=False).tolist())
    for i in range(n_old, len(y)):
        c = int(y[i])
        rows = kept.setdefault(c, [])
        n = counts.get(c, 0)
        if len(rows) < budget:
            rows.append(i)
        else:
            j = int(rng.integers(0, n + 1))
            if j < budget:
                rows[j] = i
        counts[c] = n + 1
    keep = np.sort(np.fromiter((i for rows in kept.values() for i in rows), dtype=np.int64))
    return keep, counts
