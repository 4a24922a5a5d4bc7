"""Every candidate of an INT8 exporter's mixed-precision search, judged on calibration *and* held-out images (issue 14).

    .venv/bin/python tools/int8_sensitivity_sweep.py --data DIR --backbone efficientnet_lite0 --format tflite \
        --out docs/results/int8_sweep_tflite_efficientnet_lite0_digits.json [--eval-size 600]

A diagnostic, not part of ``edgetl export``: the export's search sees calibration images only and stops at the first
``k`` (leading convolutions kept float) whose calibration mean cosine to FP32 reaches the exporter's target; here every
``k`` is quantized and also run on the export gate's held-out images, so the target can be checked against what the
gate measures (mean cosine, reference-head agreement). Three figures per side: mean cosine to FP32; "standardised"
cosine (each embedding dimension centred and scaled by the FP32 embeddings' own mean and spread, the space a softmax
head reads); and reference-head agreement (calibration: cross-fitted heads on the ~60 calibration images; held-out:
the gate's own). ``DIR`` is a labelled ImageFolder (``tools/measure_int8.py`` writes the digits-64 one under its
``--work``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetl.host import export as export_module
from edgetl.host.sensitivity import Search, Trial, mean_cosine

EXPORTERS = {"onnx": "edgetl.host.onnx_quant", "openvino": "edgetl.host.openvino_export",
             "tflite": "edgetl.host.tflite_export"}


def standardised_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean row cosine after centring and scaling every dimension by ``reference``'s mean and standard deviation."""
    mean, scale = reference.mean(axis=0), reference.std(axis=0) + 1e-6
    return mean_cosine((reference - mean) / scale, (candidate - mean) / scale)


def calibration_agreement(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> float:
    """Agreement of 5 cross-fitted gate heads (fitted on ``reference``) between ``reference`` and ``candidate``."""
    from edgetl.heads import SoftmaxHead
    from edgetl.host.gate import GATE_L2

    folds = np.random.default_rng(0).permutation(len(labels)) % 5
    agree = 0
    for f in range(5):
        head = SoftmaxHead(l2=GATE_L2).fit(reference[folds != f], labels[folds != f])
        agree += int((head.predict(reference[folds == f]) == head.predict(candidate[folds == f])).sum())
    return agree / len(labels)


def held_out_embedder(fmt: str, images: np.ndarray) -> Any:
    module = importlib.import_module(EXPORTERS[fmt])
    if fmt == "onnx":
        return lambda quantized: module._run(quantized, images)
    return lambda quantized: module._embed(quantized, images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--format", choices=sorted(EXPORTERS), required=True)
    parser.add_argument("--eval-size", type=int, default=600)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgetl-int8-sweep"))
    args = parser.parse_args()
    from edgetl.data import scan_image_folder

    folder = scan_image_folder(args.data)
    split = export_module._split(export_module.ImageSource(args.backbone), folder,
                                 export_module.ExportOptions((args.format,), ("int8",), eval_size=args.eval_size))
    calib_labels = folder.labels[split[1]]
    gates: list[Any] = []
    rows: list[dict[str, Any]] = []

    class RecordingGate(export_module.Gate):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            gates.append(self)

    def every_k(quantize: Any, embed: Any, reference: np.ndarray, ks: list[int], target: float) -> Search[Any]:
        gate = gates[-1]
        held = held_out_embedder(args.format, gate.held)
        for k in ks:
            quantized = quantize(k)
            calib, out = embed(quantized), held(quantized)
            rows.append({"float_convs": k, "target_calibration_cosine": target,
                         "calibration": {"mean_cosine": round(mean_cosine(reference, calib), 5),
                                         "standardised_cosine": round(standardised_cosine(reference, calib), 5),
                                         "agreement": round(calibration_agreement(reference, calib, calib_labels), 4)},
                         "held_out": {"mean_cosine": round(mean_cosine(gate.ref_held, out), 5),
                                      "standardised_cosine": round(standardised_cosine(gate.ref_held, out), 5),
                                      "agreement": round(gate.agreement(out), 4)}})
            print(json.dumps(rows[-1]), flush=True)
        trial = Trial(ks[-1], rows[-1]["calibration"]["mean_cosine"])
        return Search(kept=trial, quantized=quantized, trials=[trial], candidates=list(ks))

    export_module.Gate = RecordingGate
    importlib.import_module(EXPORTERS[args.format]).first_float_convs = every_k
    export_module.export(args.work / "bundle", folder, model=args.backbone, formats=(args.format,),
                         precisions=("fp32", "int8"), keep_failed=True, eval_size=args.eval_size, force=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python tools/int8_sensitivity_sweep.py " + " ".join(sys.argv[1:]),
                                    "n_calibration": len(calib_labels), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
