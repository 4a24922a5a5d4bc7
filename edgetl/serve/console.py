"""The console's state, framework-free: the watcher journal read as it grows, the label queue, the operator's labels,
training from them, metrics. :mod:`edgetl.serve.app` puts HTTP in front of it.

Every state change goes through :class:`edgetl.device.DeviceRuntime` (``train``, ``add_class``, ``rollback``): the
same writer lock, promote gate and audit log as the CLI. Nothing a client sends becomes a file-system path: images
are named by the ids this module hands out, class names are checked by :func:`check_label`, and the files read are the
ones the watcher's journal records (regular files under the inbox or the move-done folder, never through a link).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.data import IMAGE_SUFFIXES, ImageFolder, Sample
from edgetl.errors import DataError, NotFittedError, StateError
from edgetl.novelty import calibrated_proba
from edgetl.serve.queue import NOVEL_EVERY, rank
from edgetl.state import BUNDLE_HEAD, check_version

if TYPE_CHECKING:
    from edgetl.device import DeviceRuntime

log = logging.getLogger(__name__)

#: a class name an operator may give: starts with a letter or digit, then letters, digits, space, ``_ . + -``; at most
#: 64 characters; no path separator, no leading dot or underscore (the inbox's ``_label/<class>/`` layout and
#: :func:`edgetl.data.scan_image_folder` skip those), no trailing dot or space
LABEL_PATTERN = re.compile(r"[^\W_][\w .+\-]{0,63}")
MAX_JOURNAL_LINE = 1 << 20
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


@dataclass
class Item:
    """One image the watcher classified (a journal line), as the console knows it."""

    id: int
    file: str  #: name relative to the inbox (display only)
    path: Path  #: where the image is now (its journal path, or where the watcher moved it)
    time: str
    label: str | None
    probability: float | None
    unknown: bool | None
    novelty: float | None
    drift: float | None
    head_version: str | None
    status: str
    error: str | None = None
    key: str | None = None  #: content hash (the embedding store's key), once read

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "file": self.file, "time": self.time, "label": self.label,
                "probability": self.probability, "unknown": self.unknown, "novelty": self.novelty,
                "drift": self.drift, "head_version": self.head_version, "status": self.status, "error": self.error}


@dataclass(frozen=True)
class LabelRecord:
    """An operator's answer: image (content hash), class, and what the head in use said before the answer."""

    key: str
    file: str
    label: str
    predicted: str | None
    head_version: str | None
    time: str


@dataclass
class Metrics:
    """Counters and gauges behind ``GET /metrics`` (Prometheus text format)."""

    registry: Any
    predictions: Any
    unknown: Any
    latency: Any
    drift: Any
    head_version: Any
    queue_length: Any
    unknown_rate: Any
    labels: Any
    recent_unknown: deque[bool] = field(default_factory=lambda: deque(maxlen=500))

    @classmethod
    def create(cls) -> Metrics:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = CollectorRegistry()
        return cls(
            registry=r,
            predictions=Counter("edgetl_predictions", "Images classified, by predicted label and source "
                                "(api: POST /api/predict; inbox: the watcher's journal)", ["label", "source"],
                                registry=r),
            unknown=Counter("edgetl_unknown_predictions", "Images flagged unknown (novelty above the threshold)",
                            ["source"], registry=r),
            latency=Histogram("edgetl_predict_latency_seconds", "Latency of POST /api/predict (decode, embed, head)",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=r),
            drift=Gauge("edgetl_drift_score", "Rolling drift score (median novelty of the last inbox images)",
                        registry=r),
            head_version=Gauge("edgetl_head_version", "Current head version number (0: the bundle's own head, -1: "
                               "none)", registry=r),
            queue_length=Gauge("edgetl_label_queue_length", "Unlabelled images waiting in the label queue",
                               registry=r),
            unknown_rate=Gauge("edgetl_unknown_rate", "Fraction of the last 500 predictions flagged unknown",
                               registry=r),
            labels=Counter("edgetl_operator_labels", "Labels submitted by the operator", registry=r),
        )

    def observe(self, label: str, unknown: bool | None, source: str) -> None:
        self.predictions.labels(label=label, source=source).inc()
        if unknown is not None:
            self.recent_unknown.append(bool(unknown))
            if unknown:
                self.unknown.labels(source=source).inc()
            self.unknown_rate.set(sum(self.recent_unknown) / len(self.recent_unknown))


def version_number(version: str | None) -> int:
    if version is None:
        return -1
    return 0 if version == BUNDLE_HEAD else int(version[1:])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class JournalTail:
    """Reads the watcher's journal (JSON lines) from where it left off; a torn last line waits for its end, a
    replaced or truncated file is read again from the start, a link is never followed."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.ident: tuple[int, int] | None = None
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return []
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return []
            ident = (st.st_dev, st.st_ino)
            if ident != self.ident or st.st_size < self.offset:
                self.ident, self.offset, self._partial = ident, 0, b""
            if st.st_size == self.offset:
                return []
            os.lseek(fd, self.offset, os.SEEK_SET)
            chunks = []
            left = st.st_size - self.offset
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            data = self._partial + b"".join(chunks)
            self.offset += sum(len(c) for c in chunks)
        finally:
            os.close(fd)
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > MAX_JOURNAL_LINE:
            self._partial = b""
        out = []
        for line in lines:
            if not line.strip() or len(line) > MAX_JOURNAL_LINE:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("file"), str):
                out.append(rec)
        return out


class Console:
    """What the operator's console serves. ``inbox``: the watched folder (None: no queue, predict only);
    ``results``: the watcher's journal (default ``INBOX/_watch/results.jsonl``); ``move_done``: where the watcher
    moves processed images (they stay readable there); ``pool``: at most this many recent unlabelled images are
    ranked; ``lock_wait``: seconds a state change waits for another writer (``device train`` …) to finish."""

    def __init__(self, runtime: DeviceRuntime, inbox: str | os.PathLike[str] | None = None,
                 results: str | os.PathLike[str] | None = None, move_done: str | os.PathLike[str] | None = None,
                 pool: int = 2000, lock_wait: float = 30.0, tolerance: float = 0.02):
        self.runtime = runtime
        self.inbox = Path(inbox).absolute() if inbox is not None else None
        if self.inbox is not None and not self.inbox.is_dir():
            raise DataError(f"inbox {self.inbox} is not a folder; create it or pass the folder images arrive in")
        self.results = Path(results).absolute() if results is not None else \
            (self.inbox / "_watch" / "results.jsonl" if self.inbox is not None else None)
        self.move_done = Path(move_done).absolute() if move_done is not None else None
        self.pool, self.lock_wait, self.tolerance = pool, lock_wait, tolerance
        self.metrics = Metrics.create()
        self._lock = threading.RLock()  # items, labels, embeddings
        self._write = threading.Lock()  # one state change at a time from this process (the writer lock does the rest)
        self._tail = JournalTail(self.results) if self.results is not None else None
        self._items: OrderedDict[int, Item] = OrderedDict()
        self._by_file: dict[str, int] = {}
        self._next_id = 1
        self._drift: deque[tuple[str, float, str | None]] = deque(maxlen=1000)
        self._embeddings: dict[str, np.ndarray] = {}
        self._labels: dict[str, LabelRecord] = {}
        self._labels_file = self.results.with_name(LABELS_FILE) if self.results is not None else None
        self._thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._upload_dir = Path(tempfile.mkdtemp(prefix="edgetl-serve-"))
        self._uploads = 0
        self._load_labels()
        self._update_head_metric()

    def close(self) -> None:
        shutil.rmtree(self._upload_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------- reading
    def _roots(self) -> list[Path]:
        return [p for p in (self.inbox, self.move_done) if p is not None]

    def _safe_file(self, path: Path) -> Path:
        """``path`` if it is a regular file (not a link) under the inbox or the move-done folder; else DataError."""
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise DataError(f"image {path.name} is gone ({exc.strerror}); it was moved or deleted") from None
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"image {path.name} is not a regular file any more; refusing to read it")
        real = path.resolve()
        if not any(real.is_relative_to(root.resolve()) for root in self._roots()):
            raise DataError(f"image {path.name} is outside the inbox; refusing to read it")
        return path

    def refresh(self) -> None:
        """Read new journal lines."""
        if self._tail is None:
            return
        records = self._tail.poll()
        if not records:
            return
        with self._lock:
            for rec in records:
                status = str(rec.get("status", "ok"))
                path = Path(str(rec.get("moved_to") or rec.get("path") or ""))
                old = self._by_file.pop(rec["file"], None)
                if old is not None:
                    self._items.pop(old, None)
                item = Item(self._next_id, rec["file"], path, str(rec.get("time", "")), _str(rec.get("label")),
                            _num(rec.get("probability")), _bool(rec.get("unknown")), _num(rec.get("novelty")),
                            _num(rec.get("drift")), _str(rec.get("head_version")), status,
                            str(rec["error"])[:300] if rec.get("error") else None)
                self._next_id += 1
                self._items[item.id] = item
                self._by_file[item.file] = item.id
                if status == "ok" and item.label is not None:
                    self.metrics.observe(item.label, item.unknown, "inbox")
                if item.drift is not None:
                    self._drift.append((item.time, item.drift, item.head_version))
                    self.metrics.drift.set(item.drift)
            while len(self._items) > 4 * self.pool:  # forget the oldest
                _, gone = self._items.popitem(last=False)
                self._by_file.pop(gone.file, None)

    def item(self, item_id: int) -> Item:
        self.refresh()
        with self._lock:
            item = self._items.get(item_id)
        if item is None:
            raise LookupError(f"no image with id {item_id}; ask GET /api/queue or /api/results for current ids")
        return item

    def results_page(self, limit: int = 50) -> list[dict[str, Any]]:
        self.refresh()
        with self._lock:
            items = list(self._items.values())[-limit:]
        return [i.public() for i in reversed(items)]

    def thumbnail(self, item_id: int, size: int = 128) -> bytes:
        """A PNG thumbnail of an image the watcher classified (decoded within the CLI's decode budget)."""
        import io

        from edgetl.data import load_image

        item = self.item(item_id)
        path = self._safe_file(item.path)
        st = os.stat(path)
        key = (item_id, st.st_mtime_ns)
        with self._lock:
            if key in self._thumbs:
                return self._thumbs[key]
        image = load_image(path)
        image.thumbnail((size, size))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        with self._lock:
            self._thumbs[key] = data
            while len(self._thumbs) > 512:
                self._thumbs.popitem(last=False)
        return data

    # --------------------------------------------------------------------------------------------------- predict
    def predict_upload(self, data: bytes, top_k: int = 3) -> dict[str, Any]:
        """Classify uploaded image bytes exactly as ``edgetl device predict --json`` classifies a file (the same
        :meth:`DeviceRuntime.predict`, decode budget included); ``path`` is ``"upload"``."""
        if not data:
            raise DataError("the upload is empty; send the image's bytes as the request body")
        with self._lock:
            self._uploads += 1
            n = self._uploads
        tmp = self._upload_dir / f"upload-{n}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            start = time.perf_counter()
            try:
                result = self.runtime.predict([tmp], top_k=top_k)[0]
            except DataError as exc:
                raise DataError(str(exc).replace(str(tmp), "the upload")) from None
            self.metrics.latency.observe(time.perf_counter() - start)
        finally:
            tmp.unlink(missing_ok=True)
        result["path"] = "upload"
        self.metrics.observe(result["label"], result.get("unknown"), "api")
        return result

    # ----------------------------------------------------------------------------------------------------- queue
    def _unlabelled(self) -> list[Item]:
        with self._lock:
            items = [i for i in self._items.values() if i.status == "ok"]
        items = items[-self.pool:]
        return [i for i in items if i.key is None or i.key not in self._labels]

    def _embed(self, items: list[Item]) -> list[Item]:
        """Items whose embedding is known (read through the embedding store, so training on them later re-embeds
        nothing); unreadable ones are dropped from the queue."""
        todo = [i for i in items if i.key is None or i.key not in self._embeddings]
        readable: list[Item] = []
        for item in todo:
            try:
                self._safe_file(item.path)
                item.key = self.runtime.loader.key(item.path)
                readable.append(item)
            except (DataError, OSError):
                item.status = "gone"
        if readable:
            X, _ = self.runtime.embed_paths([i.path for i in readable])
            with self._lock:
                for item, row in zip(readable, X):
                    self._embeddings[str(item.key)] = row
        return [i for i in items if i.status == "ok" and i.key is not None and i.key not in self._labels]

    def queue(self, limit: int = 20) -> dict[str, Any]:
        """Unlabelled images, highest priority first (:func:`edgetl.serve.queue.rank`)."""
        self.refresh()
        head, classes, version = self.runtime.load_current_head()
        items = self._embed(self._unlabelled())
        out: list[dict[str, Any]] = []
        if items:
            X = np.stack([self._embeddings[str(i.key)] for i in items])
            meta = self.runtime.state.meta(version) if version != BUNDLE_HEAD else {}
            proba = calibrated_proba(head, X, meta.get("temperature"))
            novelty = self.runtime.novelty_model(version)
            scores = novelty.score(X) if novelty is not None else None
            ranking = rank(proba, scores, novelty.threshold if novelty is not None else None)
            for j in ranking.order[:limit]:
                top = np.argsort(-proba[j])[:3]
                out.append(items[j].public() | {
                    "placed_by": "novelty" if ranking.by_novelty[j] else "uncertainty",
                    "priority": round(float(ranking.priority[j]), 6), "margin": round(float(ranking.margin[j]), 6),
                    "entropy": round(float(ranking.entropy[j]), 6),
                    "novelty_now": None if scores is None else round(float(scores[j]), 6),
                    "predicted": classes[int(top[0])],
                    "top_k": [{"label": classes[int(c)], "probability": round(float(proba[j, c]), 6)}
                              for c in top]})
        self.metrics.queue_length.set(len(items))
        return {"head_version": version, "classes": classes, "length": len(items), "items": out,
                "inbox": str(self.inbox) if self.inbox else None,
                "ranking": f"1 place in {NOVEL_EVERY} (the first, ...) to the most novel image beyond the unknown "
                           "threshold, the others by uncertainty (1 - margin of the calibrated probabilities)"}

    # ---------------------------------------------------------------------------------------------------- labels
    def _load_labels(self) -> None:
        if self._labels_file is None:
            return
        try:
            lines = self._labels_file.read_bytes().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                rec = json.loads(line)
                self._labels[rec["key"]] = LabelRecord(**{k: rec.get(k) for k in LabelRecord.__dataclass_fields__})
            except (ValueError, KeyError, TypeError):
                continue

    def label(self, item_id: int, label: object) -> LabelRecord:
        """Record the operator's class for an image (a new class name is accepted)."""
        if self._labels_file is None:
            raise DataError("labelling needs an inbox; start the console with --inbox DIR")
        try:
            head, classes, version = self.runtime.load_current_head()
        except NotFittedError:
            head, classes, version = None, [], None
        name = check_label(label, classes)
        item = self.item(item_id)
        if item.status != "ok":
            raise DataError(f"image {item.file} cannot be labelled ({item.status})")
        self._safe_file(item.path)
        key = item.key or self.runtime.loader.key(item.path)
        item.key = key
        predicted, predicted_by = item.label, item.head_version  # what the watcher's head said …
        embedding = self._embeddings.get(key)
        if head is not None and embedding is not None:  # … or, as the queue showed it, the current head
            predicted, predicted_by = classes[int(head.predict(embedding[None])[0])], version
        record = LabelRecord(key, item.file, name, predicted, predicted_by, _now())
        line = (json.dumps(asdict(record)) + "\n").encode("utf-8")
        with self._lock:
            self._labels_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._labels_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                         0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._labels[key] = record
        self.metrics.labels.inc()
        return record

    def labelled(self) -> list[tuple[LabelRecord, Path]]:
        """Labelled images that are still readable, with where they are."""
        self.refresh()
        with self._lock:
            where = {i.key: i.path for i in self._items.values() if i.key is not None}
            records = list(self._labels.values())
        out = []
        for rec in records:
            path = where.get(rec.key)
            if path is None:
                continue
            try:
                out.append((rec, self._safe_file(path)))
            except DataError:
                continue
        return out

    def confusion(self) -> dict[str, Any]:
        """Operator's label (rows) × the head's prediction at the time (columns), over every label given: what the
        device got wrong before a person corrected it."""
        with self._lock:
            records = list(self._labels.values())
        classes = sorted({r.label for r in records} | {r.predicted for r in records if r.predicted})
        index = {c: k for k, c in enumerate(classes)}
        matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
        for r in records:
            if r.predicted:
                matrix[index[r.label], index[r.predicted]] += 1
        agreement: dict[str, dict[str, float | int]] = {}
        for r in records:
            if r.head_version and r.predicted:
                a = agreement.setdefault(r.head_version, {"n": 0, "correct": 0})
                a["n"] += 1
                a["correct"] += int(r.predicted == r.label)
        for a in agreement.values():
            a["accuracy"] = a["correct"] / a["n"]
        return {"classes": classes, "matrix": matrix.tolist(), "n": int(matrix.sum()), "per_version": agreement,
                "basis": "the operator's labels vs what the head in use predicted before each label"}

    # ------------------------------------------------------------------------------------------------- training
    def train(self, force: bool = False) -> dict[str, Any]:
        """Train on the labelled images: added to the current head's training set (``train --incremental``; new
        class names become new classes) through the promote gate; a first head when none was trained here."""
        pairs = self.labelled()
        if not pairs:
            raise DataError("no labelled images to train on; label images from the queue first")
        classes = sorted({rec.label for rec, _ in pairs})
        folder = ImageFolder(self.inbox or Path("."), tuple(classes),
                             tuple(Sample(path, classes.index(rec.label)) for rec, path in pairs))
        current = self.runtime.current_version()
        incremental = current is not None and current != BUNDLE_HEAD
        with self._write:
            report = self.runtime.train(folder, incremental=incremental, force=force, tolerance=self.tolerance,
                                        wait=self.lock_wait)
        self._after_change()
        return asdict(report) | {"labelled_images": len(pairs), "incremental": incremental}

    def add_class(self, name: object, force: bool = False) -> dict[str, Any]:
        """``device add-class``: the labelled images of class ``name`` become a new class of the current head."""
        name = check_label(name)
        paths = [path for rec, path in self.labelled() if rec.label == name]
        if not paths:
            raise DataError(f"no labelled images of class {name!r}; label some queue images {name!r} first")
        with tempfile.TemporaryDirectory(prefix="edgetl-serve-class-") as tmp:
            for k, path in enumerate(paths):  # server-chosen names; the suffix only from the known image suffixes
                suffix = path.suffix.lower() if path.suffix.lower() in IMAGE_SUFFIXES else ".png"
                shutil.copyfile(path, Path(tmp) / f"{k:06d}{suffix}", follow_symlinks=False)
            with self._write:
                report = self.runtime.add_class(name, tmp, wait=self.lock_wait, force=force)
        self._after_change()
        return asdict(report)

    def rollback(self, to: object = None) -> str:
        target = check_version(to, bundle_head=True) if to is not None else None
        with self._write:
            version = self.runtime.rollback(target, wait=self.lock_wait,
                                            reason="rollback from the operator's console")
        self._after_change()
        return version

    def promote(self, version: object) -> str:
        """Make a candidate current (what ``edgetl device rollback --to VERSION`` does), audited as the operator's."""
        target = check_version(version)
        status = self.runtime.state.meta(target).get("status")
        if status != "candidate":
            raise DataError(f"head {target} is not a candidate (status {status}); use rollback to return to it")
        with self._write:
            made = self.runtime.rollback(target, wait=self.lock_wait,
                                         reason="candidate promoted from the operator's console")
        self._after_change()
        return made

    def _after_change(self) -> None:
        self._update_head_metric()

    def _update_head_metric(self) -> None:
        try:
            self.metrics.head_version.set(version_number(self.runtime.current_version()))
        except StateError:
            self.metrics.head_version.set(-1)

    def history(self) -> list[dict[str, Any]]:
        agreement = self.confusion()["per_version"]
        rows = self.runtime.history()
        for r in rows:
            r["operator_agreement"] = agreement.get(r["version"])
        return rows

    def drift(self) -> dict[str, Any]:
        """The watcher's rolling drift: the latest value, the threshold of the current head's novelty model, and the
        series (time, drift, head version) of the last 1,000 images."""
        self.refresh()
        version = self.runtime.current_version()
        novelty = self.runtime.novelty_model(version) if version else None
        with self._lock:
            series = list(self._drift)
            recent = [i.unknown for i in list(self._items.values())[-200:] if i.unknown is not None]
        score = series[-1][1] if series else None
        threshold = novelty.threshold if novelty is not None else None
        return {"score": score, "threshold": threshold,
                "drifted": None if score is None or threshold is None else bool(score > threshold),
                "unknown_fraction": (sum(recent) / len(recent)) if recent else None, "n": len(series),
                "head_version": version,
                "series": [{"time": t, "drift": d, "head_version": v} for t, d, v in series]}

    def metrics_text(self) -> bytes:
        from prometheus_client import generate_latest

        self.refresh()
        self._update_head_metric()
        return bytes(generate_latest(self.metrics.registry))


def _str(v: object) -> str | None:
    return str(v)[:200] if v is not None else None


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) else None


def _bool(v: object) -> bool | None:
    return bool(v) if isinstance(v, bool) else None


__all__ = ["Console", "Item", "JournalTail", "LabelRecord", "Metrics", "check_label"]
