"""INT8 fidelity and speed: backbone x backend x data set (issue 14).

    .venv/bin/python tools/measure_int8.py --out docs/results/int8_fidelity.json [--markdown docs/results/int8.md] \
        [--data demo --data fashion-mnist --data digits-64] [--work DIR]

Rows of data sets not named in this run are kept in --out (one data set can be measured at a time).

For each data set and registry image backbone, one `edgetl export` (the product's own code: default --calib-size 64,
default gate) with ONNX Runtime, OpenVINO and LiteRT graphs in FP32 and INT8 (`keep_failed` so that a failed graph is
still measured). The numbers are the export gate's own, on held-out images the quantizers never saw: mean cosine of
the INT8 embeddings to PyTorch FP32, top-1 agreement of the FP32 reference head, accuracy drop of a head retrained on
the INT8 embeddings (5-fold). Speed: images/s at batch 32 of the INT8 graph vs the FP32 graph of the same runtime
(2 threads, best of 10 runs with the two graphs timed in turn, after a warm-up), on this machine.

Data sets: the embedded demo set (300 Fashion-MNIST training images), Fashion-MNIST (1,000 images of the official
training split, Debian's dataset-fashion-mnist) and scikit-learn's 8x8 digits upscaled to 64 px (1,797 images).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BACKBONES = ("mobilenet_v2", "efficientnet_lite0")


def digits_folder(out: Path, size: int = 64) -> Path:
    """scikit-learn's digits, upscaled (bicubic) to ``size`` px, as a PNG ImageFolder."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for i, (image, label) in enumerate(zip(images, digits.target)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.png")
    return out


def datasets(root: Path, only: list[str] | None) -> dict[str, Path]:
    from edgetl.datasets.fashion_mnist import write_image_folder
    from edgetl.demo import demo_split

    makers = {"demo": lambda: Path(demo_split("train")),
              "fashion-mnist": lambda: (write_image_folder(root / "fmnist", "train", 100, 0), root / "fmnist")[1],
              "digits-64": lambda: digits_folder(root / "digits")}
    return {name: make() for name, make in makers.items() if not only or name in only}


#: timed runs per graph; the FP32 and INT8 graphs alternate, so that both see the same load
REPEATS = 10


def _timed(fn: Any, images: np.ndarray) -> float:
    start = time.perf_counter()
    fn(images)
    return time.perf_counter() - start


def measure(backbone: str, data: Path, work: Path, eval_size: int) -> list[dict[str, Any]]:
    from edgetl.bundle import Bundle
    from edgetl.data import load_image, scan_image_folder
    from edgetl.host.export import export
    from edgetl.preprocess import preprocess_batch

    bundle = export(work / f"{backbone}-{data.name}", data, model=backbone, formats=("onnx", "openvino", "tflite"),
                    precisions=("fp32", "int8"), keep_failed=True, eval_size=eval_size, force=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    pp = Bundle.load(bundle).preprocessing
    folder = scan_image_folder(data)
    batch = preprocess_batch([load_image(s.path) for s in folder.samples[:32]], pp)
    entries = {(e["format"], e["precision"]): e for e in manifest["extractors"]}
    rows = []
    for fmt in ("onnx", "openvino", "tflite"):
        fp32, int8 = entries.get((fmt, "fp32")), entries.get((fmt, "int8"))
        if fp32 is None or int8 is None:
            continue
        r = int8["report"]
        rows.append({"backbone": backbone, "data": data.name, "backend": fmt, "mean_cosine": round(r["mean_cosine"], 4),
                     "min_cosine": round(r["min_cosine"], 4), "top1_agreement": round(r["top1_agreement"], 4),
                     "drop_points": r["drop_points"], "passed": r["passed"], "reason": r["reason"],
                     "n_held_out": r["n_images"], "size_mb": round(r["size_bytes"] / 1e6, 2),
                     "quantization": int8["quantization"], "bundle": bundle.name} | speed(bundle, fmt, batch))
    return rows


def speed(bundle: Path, fmt: str, batch: np.ndarray, repeats: int = REPEATS) -> dict[str, float]:
    """Images/s of the FP32 and INT8 graphs of ``fmt`` in ``bundle`` at batch 32 (best of ``repeats`` after a warm-up,
    the two graphs timed in turn), and their ratio."""
    from edgetl.runtime import load_extractor

    manifest = json.loads((bundle / "manifest.json").read_text())
    entries = {(e["format"], e["precision"]): e for e in manifest["extractors"]}
    graphs = {p: load_extractor(fmt, bundle / entries[(fmt, p)]["file"], entry=entries[(fmt, p)], threads=2)
              for p in ("fp32", "int8")}
    for extractor in graphs.values():
        extractor.embed(batch)  # warm-up
    best = {p: float("inf") for p in graphs}
    for _ in range(repeats):
        for p, extractor in graphs.items():
            best[p] = min(best[p], _timed(extractor.embed, batch))
    fp32_speed, int8_speed = len(batch) / best["fp32"], len(batch) / best["int8"]
    return {"fp32_img_s": round(fp32_speed, 1), "int8_img_s": round(int8_speed, 1),
            "speedup": round(int8_speed / fp32_speed, 2)}


def respeed(rows: list[dict[str, Any]], work: Path, data: dict[str, Path]) -> None:
    """Measure the speed columns again on the bundles kept in ``work`` (on a quiet machine: fidelity does not depend on
    the load, speed does), for the rows of the data sets in ``data`` (the others are kept as they are)."""
    from edgetl.bundle import Bundle
    from edgetl.data import load_image, scan_image_folder
    from edgetl.preprocess import preprocess_batch

    for row in (r for r in rows if r["data"] in data):
        bundle = work / row["bundle"]
        folder = scan_image_folder(data[row["data"]])
        batch = preprocess_batch([load_image(s.path) for s in folder.samples[:32]], Bundle.load(bundle).preprocessing)
        row.update(speed(bundle, row["backend"], batch))
        print(json.dumps({k: row[k] for k in ("data", "backbone", "backend", "fp32_img_s", "int8_img_s", "speedup")}),
              flush=True)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [("| data | backbone | backend | mean cos | min cos | ref-head agree | drop (pts) | FP32 img/s | INT8 img/s "
              "| speed-up | gate |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['backbone']} | {r['backend']} | {r['mean_cosine']:.3f} | {r['min_cosine']:.3f} "
                     f"| {r['top1_agreement']:.3f} | {r['drop_points']:.2f} | {r['fp32_img_s']:.0f} | "
                     f"{r['int8_img_s']:.0f} | {r['speedup']:.2f}x | {'pass' if r['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table as markdown")
    parser.add_argument("--data", action="append", default=None, help="demo | fashion-mnist | digits-64 (repeat)")
    parser.add_argument("--backbone", action="append", default=None)
    parser.add_argument("--eval-size", type=int, default=600)
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the bundles here (default: a temporary folder, removed afterwards)")
    parser.add_argument("--speed-only", action="store_true",
                        help="re-measure only the speed columns of --out on the bundles kept in --work")
    args = parser.parse_args()
    started = time.time()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgetl-int8-")))
        work.mkdir(parents=True, exist_ok=True)
        data = datasets(work / "data", args.data)
        if args.speed_only:
            result = json.loads(args.out.read_text())
            respeed(result["rows"], work, data)
            result["speed_command"] = "python tools/measure_int8.py " + " ".join(sys.argv[1:])
            _write(args, result)
            return
        rows: list[dict[str, Any]] = []
        for name, folder in data.items():
            for backbone in args.backbone or BACKBONES:
                for row in measure(backbone, folder, work, args.eval_size):
                    rows.append(row | {"data": name})
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "quantization"}), flush=True)
    import onnxruntime
    import openvino

    from edgetl.kit import lock_file

    run = {"command": "python tools/measure_int8.py " + " ".join(sys.argv[1:]), "data": list(data),
           "machine": {"arch": platform.machine(), "processor": platform.processor() or platform.machine()},
           "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__},
           "lock": str(lock_file()), "seconds": round(time.time() - started)}
    _write(args, _merged(args.out, run, rows))


def _merged(out: Path, run: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The results of this run, with the rows (and runs) of the other data sets already in ``out`` kept, so that the
    data sets can be measured one command at a time."""
    previous = json.loads(out.read_text()) if out.exists() else {"rows": [], "runs": []}
    runs = previous.get("runs") or ([{k: previous[k] for k in ("command", "machine", "versions", "lock", "seconds")}
                                     | {"data": sorted({r["data"] for r in previous["rows"]})}]
                                    if "command" in previous else [])
    kept = [r for r in previous["rows"] if r["data"] not in run["data"]]
    return {"runs": [r for r in runs if not set(r["data"]) <= set(run["data"])] + [run], "rows": kept + rows,
            **({"speed_command": previous["speed_command"]} if "speed_command" in previous else {})}


def _write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown(result["rows"])
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
