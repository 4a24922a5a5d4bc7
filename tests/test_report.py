"""`device evaluate --report`: metrics.json, a confusion-matrix PNG and the per-class table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from edgetl.cli import main
from edgetl.device import DeviceRuntime
from edgetl.report import classification_metrics


def test_classification_metrics_by_hand() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(truth, pred, ["a", "b", "c"])
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == 4 / 6
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    assert m["per_class"]["b"]["precision"] == 0.5 and m["per_class"]["b"]["recall"] == 0.5
    assert m["per_class"]["c"]["precision"] == 0.5 and m["per_class"]["c"]["recall"] == 1.0
    assert abs(m["macro_f1"] - np.mean([0.8, 0.5, 2 / 3])) < 1e-12


def test_evaluate_report_files(bundle: Path, demo_train: Path, demo_test: Path, tmp_path: Path) -> None:
    DeviceRuntime(bundle).train(demo_train)
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["device", "evaluate", str(bundle), "--data", str(demo_test), "--report", str(out),
                                    "--quiet"])
    assert res.exit_code == 0, res.stderr
    assert "macro F1" in res.stdout and "precision" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    confusion = np.array(metrics["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == metrics["n"] == 100
    assert np.trace(confusion) / confusion.sum() == metrics["accuracy"]
    with open(out / "per_class.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["class"] for r in rows) == sorted(p.name for p in demo_test.iterdir())
    assert sum(int(r["support"]) for r in rows) == 100
    for r in rows:  # the table agrees with the confusion matrix
        i = metrics["labels"].index(r["class"])
        assert abs(float(r["recall"]) - confusion[i, i] / confusion[i].sum()) < 1e-4
    png = Image.open(out / "confusion.png")
    assert png.format == "PNG" and png.width > 10 * 44 and png.height > 10 * 44
    assert (out / "per_class.md").read_text().count("\n") == 10 + 3
