"""Evaluation figures people look at: per-class precision / recall / F1, a confusion matrix, and the files
``edgetl device evaluate --report DIR`` writes (numpy + Pillow only, so it runs on the device)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edgetl._atomic import atomic_write_json


def classification_metrics(truth: np.ndarray, pred: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro F1, the confusion matrix (rows: true class, columns: predicted) and per-class precision,
    recall, F1 and support for ``labels`` (indices into it in ``truth`` / ``pred``)."""
    k = len(labels)
    confusion = np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(np.float64)
    predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    present = support > 0
    per_class = {labels[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i in range(k) if present[i]}
    return {"accuracy": float(tp.sum() / max(1, len(truth))), "macro_f1": float(f1[present].mean()),
            "labels": list(labels), "confusion": confusion.tolist(), "per_class": per_class}


def write_report(result: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write ``metrics.json``, ``confusion.png``, ``per_class.csv`` and ``per_class.md`` into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", result)
    rows = [(name, m["precision"], m["recall"], m["f1"], m["support"]) for name, m in result["per_class"].items()]
    with open(out / "per_class.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        writer.writerows([(n, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", s) for n, p, r, f, s in rows])
    table = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    table += [f"| {n} | {p:.3f} | {r:.3f} | {f:.3f} | {s} |" for n, p, r, f, s in rows]
    table.append(f"| **all** (accuracy {result['accuracy']:.3f}, macro F1 {result['macro_f1']:.3f}) | | | | "
                 f"{sum(r[4] for r in rows)} |")
    (out / "per_class.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    confusion_png(np.asarray(result["confusion"]), result["labels"], out / "confusion.png")
    return [out / n for n in ("metrics.json", "confusion.png", "per_class.csv", "per_class.md")]


def confusion_png(confusion: np.ndarray, labels: Sequence[str], path: Path, cell: int = 44) -> None:
    """A confusion-matrix image: cells shaded by the row-normalised rate, counts written in, class names on both
    axes (rows: true class, columns: predicted)."""
    font = ImageFont.load_default()
    k = len(labels)
    margin = 12 + max(int(font.getlength(str(name))) for name in labels)
    size = (margin + k * cell + 10, margin + k * cell + 24)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    for i in range(k):
        for j in range(k):
            x, y = margin + j * cell, 20 + margin + i * cell
            shade = int(255 * (1 - rates[i, j]))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            text = str(int(confusion[i, j]))
            colour = "white" if rates[i, j] > 0.5 else "black"
            draw.text((x + (cell - font.getlength(text)) / 2, y + cell / 2 - 6), text, fill=colour, font=font)
    for i, name in enumerate(labels):
        draw.text((4, 20 + margin + i * cell + cell / 2 - 6), str(name), fill="black", font=font)
        # column names written vertically
        width = int(font.getlength(str(name))) + 4
        label = Image.new("RGB", (width, 14), "white")
        ImageDraw.Draw(label).text((2, 0), str(name), fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (margin + i * cell + cell // 2 - 7, 20 + margin - label.height - 2))
    draw.text((4, 4), "rows: true class, columns: predicted", fill="black", font=font)
    img.save(path)

