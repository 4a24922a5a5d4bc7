"""The console's state, framework-free: a facade over the inbox log (:mod:`edgetl.serve.inbox`), the label queue
(:mod:`edgetl.serve.candidates`), the operator's labels (:mod:`edgetl.serve.labels`) and the metrics
(:mod:`edgetl.serve.metrics`), with training from the labels. :mod:`edgetl.serve.app` puts HTTP in front of it.

Every state change goes through :class:`edgetl.device.DeviceRuntime` (``train``, ``add_class``, ``rollback``): the
same writer lock, promote gate and audit log as the CLI. Nothing a client sends becomes a file-system path: images
are named by the ids the inbox log hands out, class names are checked by :func:`check_label`, and the files read are
the ones the watcher's journal records (regular files under the inbox or the move-done folder, never through a link).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetl.data import IMAGE_SUFFIXES, ImageFolder, Sample
from edgetl.errors import DataError, NotFittedError, StateError
from edgetl.serve.candidates import CandidatePool
from edgetl.serve.inbox import InboxLog, Item, JournalTail
from edgetl.serve.labels import LABELS_FILE, LabelBook, LabelledImage, LabelRecord, check_label
from edgetl.serve.metrics import Metrics, version_number
from edgetl.state import BUNDLE_HEAD, check_version

if TYPE_CHECKING:
    from edgetl.device import DeviceRuntime

log = logging.getLogger(__name__)

#: the inbox log keeps this many times the queue's pool of images
KEEP_FACTOR = 4
#: images the rolling unknown fraction of ``GET /api/drift`` is computed over
DRIFT_RECENT = 200


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Uploads:
    """Uploaded images, each written to a private temporary folder under a server-chosen name while it is read."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="edgetl-serve-"))
        self._lock = threading.Lock()
        self._count = 0

    def write(self, data: bytes) -> Path:
        with self._lock:
            self._count += 1
            path = self.folder / f"upload-{self._count}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return path

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


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
        self._write = threading.Lock()  # one state change at a time from this process (the writer lock does the rest)
        roots = [p for p in (self.inbox, self.move_done) if p is not None]
        self.log = InboxLog(self.results, roots, keep=KEEP_FACTOR * pool, observe=self._observe)
        self.labels = LabelBook(self.results.with_name(LABELS_FILE) if self.results is not None else None)
        self.candidates = CandidatePool(runtime, self.log, self.labels, pool)
        self._uploads = Uploads()
        #: the head uploads are classified with, read once and again only when the current version changes
        self._predictor = runtime.predictor(window=None)
        self._predict = threading.Lock()  # the predictor swaps its head in place: one classification at a time
        self._update_head_metric()

    def close(self) -> None:
        self._uploads.close()

    # ------------------------------------------------------------------------------------------------- reading
    def _observe(self, item: Item) -> None:
        if item.status == "ok" and item.label is not None:
            self.metrics.observe(item.label, item.unknown, "inbox")
        if item.drift is not None:
            self.metrics.drift.set(item.drift)

    def refresh(self) -> None:
        """Read new journal lines."""
        self.log.refresh()

    def item(self, item_id: int) -> Item:
        return self.log.item(item_id)

    def results_page(self, limit: int = 50) -> list[dict[str, Any]]:
        self.refresh()
        return [i.public() for i in reversed(self.log.items()[-limit:])]

    def thumbnail(self, item_id: int, size: int = 128) -> bytes:
        """A PNG thumbnail of an image the watcher classified (decoded within the CLI's decode budget)."""
        return self.log.thumbnail(item_id, size)

    # --------------------------------------------------------------------------------------------------- predict
    def predict_upload(self, data: bytes, top_k: int = 3) -> dict[str, Any]:
        """Classify uploaded image bytes exactly as ``edgetl device predict --json`` classifies a file (the same
        :meth:`DeviceRuntime.predictions`, decode budget included; the head read once); ``path`` is ``"upload"``."""
        if not data:
            raise DataError("the upload is empty; send the image's bytes as the request body")
        tmp = self._uploads.write(data)
        try:
            start = time.perf_counter()
            try:
                with self._predict:
                    result = self.runtime.predictions([tmp], top_k, predictor=self._predictor)[0].as_dict()
            except DataError as exc:
                raise DataError(str(exc).replace(str(tmp), "the upload")) from None
            self.metrics.latency.observe(time.perf_counter() - start)
        finally:
            tmp.unlink(missing_ok=True)
        result["path"] = "upload"
        self.metrics.observe(result["label"], result.get("unknown"), "api")
        return result

    # ----------------------------------------------------------------------------------------------------- queue
    def queue(self, limit: int = 20) -> dict[str, Any]:
        """Unlabelled images, highest priority first (:func:`edgetl.serve.queue.rank`)."""
        self.refresh()
        page = self.candidates.page(limit, str(self.inbox) if self.inbox else None)
        self.metrics.queue_length.set(page.length)
        return page.public()

    # ---------------------------------------------------------------------------------------------------- labels
    def label(self, item_id: int, label: object) -> LabelRecord:
        """Record the operator's class for an image (a new class name is accepted)."""
        if self.labels.path is None:
            raise DataError("labelling needs an inbox; start the console with --inbox DIR")
        try:
            head, classes, version = self.runtime.load_current_head()
        except NotFittedError:
            head, classes, version = None, [], None
        name = check_label(label, classes)
        item = self.item(item_id)
        if item.status != "ok":
            raise DataError(f"image {item.file} cannot be labelled ({item.status})")
        self.log.safe_file(item.path)
        key = item.key or self.runtime.loader.key(item.path)
        item.key = key
        predicted, predicted_by = item.label, item.head_version  # what the watcher's head said …
        embedding = self.candidates.embedding(key)
        if head is not None and embedding is not None:  # … or, as the queue showed it, the current head
            predicted, predicted_by = classes[int(head.predict(embedding[None])[0])], version
        record = LabelRecord(key, item.file, name, predicted, predicted_by, _now())
        self.labels.add(record)
        self.metrics.labels.inc()
        return record

    def labelled(self) -> list[LabelledImage]:
        """Labelled images that are still readable, with where they are."""
        self.refresh()
        where = {i.key: i.path for i in self.log.items() if i.key is not None}
        out = []
        for rec in self.labels.records():
            path = where.get(rec.key)
            if path is None:
                continue
            try:
                out.append(LabelledImage(rec, self.log.safe_file(path)))
            except DataError:
                continue
        return out

    def confusion(self) -> dict[str, Any]:
        """Operator's label (rows) × the head's prediction at the time (columns), over every label given: what the
        device got wrong before a person corrected it."""
        return self.labels.confusion().public()

    # ------------------------------------------------------------------------------------------------- training
    def train(self, force: bool = False) -> dict[str, Any]:
        """Train on the labelled images: added to the current head's training set (``train --incremental``; new
        class names become new classes) through the promote gate; a first head when none was trained here."""
        labelled = self.labelled()
        if not labelled:
            raise DataError("no labelled images to train on; label images from the queue first")
        classes = sorted({li.record.label for li in labelled})
        folder = ImageFolder(self.inbox or Path("."), tuple(classes),
                             tuple(Sample(li.path, classes.index(li.record.label)) for li in labelled))
        current = self.runtime.current_version()
        incremental = current is not None and current != BUNDLE_HEAD
        with self._write:
            report = self.runtime.train(folder, incremental=incremental, force=force, tolerance=self.tolerance,
                                        wait=self.lock_wait)
        self._update_head_metric()
        return asdict(report) | {"labelled_images": len(labelled), "incremental": incremental}

    def add_class(self, name: object, force: bool = False) -> dict[str, Any]:
        """``device add-class``: the labelled images of class ``name`` become a new class of the current head."""
        name = check_label(name)
        paths = [li.path for li in self.labelled() if li.record.label == name]
        if not paths:
            raise DataError(f"no labelled images of class {name!r}; label some queue images {name!r} first")
        with tempfile.TemporaryDirectory(prefix="edgetl-serve-class-") as tmp:
            for k, path in enumerate(paths):  # server-chosen names; the suffix only from the known image suffixes
                suffix = path.suffix.lower() if path.suffix.lower() in IMAGE_SUFFIXES else ".png"
                shutil.copyfile(path, Path(tmp) / f"{k:06d}{suffix}", follow_symlinks=False)
            with self._write:
                report = self.runtime.add_class(name, tmp, wait=self.lock_wait, force=force)
        self._update_head_metric()
        return asdict(report)

    def rollback(self, to: object = None) -> str:
        target = check_version(to, bundle_head=True) if to is not None else None
        with self._write:
            version = self.runtime.rollback(target, wait=self.lock_wait,
                                            reason="rollback from the operator's console")
        self._update_head_metric()
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
        self._update_head_metric()
        return made

    def _update_head_metric(self) -> None:
        try:
            self.metrics.head_version.set(version_number(self.runtime.current_version()))
        except StateError:
            self.metrics.head_version.set(-1)

    # ------------------------------------------------------------------------------------------------ reporting
    def history(self) -> list[dict[str, Any]]:
        agreement = self.labels.confusion().per_version
        rows = self.runtime.history()
        for r in rows:
            a = agreement.get(r["version"])
            r["operator_agreement"] = a.public() if a is not None else None
        return rows

    def drift(self) -> dict[str, Any]:
        """The watcher's rolling drift: the latest value, the threshold of the current head's novelty model, and the
        series (time, drift, head version) of the last 1,000 images."""
        self.refresh()
        version = self.runtime.current_version()
        novelty = self.runtime.novelty_model(version) if version else None
        series = self.log.drift_series()
        recent = [i.unknown for i in self.log.items()[-DRIFT_RECENT:] if i.unknown is not None]
        score = series[-1].drift if series else None
        threshold = novelty.threshold if novelty is not None else None
        return {"score": score, "threshold": threshold,
                "drifted": None if score is None or threshold is None else bool(score > threshold),
                "unknown_fraction": (sum(recent) / len(recent)) if recent else None, "n": len(series),
                "head_version": version, "series": [asdict(p) for p in series]}

    def metrics_text(self) -> bytes:
        self.refresh()
        self._update_head_metric()
        return self.metrics.text()


__all__ = ["Console", "Item", "JournalTail", "LabelRecord", "Metrics", "check_label"]
