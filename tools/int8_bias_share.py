"""How much of ONNX Runtime INT8's error is bias (what bias correction could remove), per convolution (issue 14).

    edgetl export --model mobilenet_v2 --out B            # FP32 ONNX of the embedded demo data's default bundle
    .venv/bin/python tools/int8_bias_share.py --bundle B --float-convs 3 \
        --out docs/results/int8_bias_share_mobilenet_v2_onnx_demo.json

A diagnostic, not part of ``edgetl export``. The FP32 graph is quantized as the export does
(:func:`edgetl.host.onnx_quant.quantize_prepared`, the first ``--float-convs`` convolutions float) on 64 images of the
embedded demo training split; on those calibration images, the output of every quantized convolution is compared
with FP32's. Its mean squared error splits into the squared per-channel mean error (bias: what bias correction can
remove) and the rest (rounding noise); the report gives the bias share per convolution and over all of them, and the
INT8 graph's mean cosine to FP32 on the other 136 images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetl.bundle import Bundle
from edgetl.data import load_image, scan_image_folder
from edgetl.demo import demo_split
from edgetl.host.onnx_quant import _run, prepare_int8, quantize_prepared
from edgetl.host.sensitivity import mean_cosine
from edgetl.preprocess import preprocess_batch


def conv_outputs(model: object, names: list[str], images: np.ndarray) -> list[np.ndarray]:
    """Every tensor of ``names`` of the ONNX ``model`` on ``images`` (the model's outputs replaced by them)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # type: ignore[arg-type]
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runs = [session.run(None, {"images": images[i:i + 16]}) for i in range(0, len(images), 16)]
    return [np.concatenate([r[j] for r in runs]).astype(np.float64) for j in range(len(names))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="Bundle with the FP32 extractor.onnx")
    parser.add_argument("--float-convs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgetl-int8-bias"))
    args = parser.parse_args()
    import onnx

    args.work.mkdir(parents=True, exist_ok=True)
    folder = scan_image_folder(demo_split("train"))
    order = np.random.default_rng(0).permutation(len(folder.samples))[:200]
    images = preprocess_batch([load_image(folder.samples[i].path) for i in order], Bundle.load(args.bundle).preprocessing)
    calib, held = images[:64], images[64:]
    prep = prepare_int8(args.bundle / "extractor.onnx", args.work)
    prepared, convs = prep.graph, prep.convs
    quantized = quantize_prepared(prep, calib, args.float_convs, args.work / "int8.onnx")
    fp32, int8 = onnx.load(str(prepared)), onnx.load(str(quantized))
    fp32_out = {n.name: n.output[0] for n in fp32.graph.node if n.op_type == "Conv"}
    int8_out = {n.name: n.output[0] for n in int8.graph.node if n.op_type == "Conv"}
    quantized_convs = [c for c in convs[args.float_convs:] if c in int8_out]
    ref = conv_outputs(fp32, [fp32_out[c] for c in quantized_convs], calib)
    got = conv_outputs(int8, [int8_out[c] for c in quantized_convs], calib)
    rows, bias_total, mse_total = [], 0.0, 0.0
    for name, a, b in zip(quantized_convs, ref, got):
        err = b - a
        mse = float((err ** 2).mean())
        bias = float((err.mean(axis=(0, 2, 3)) ** 2).mean())  # per output channel, over images and positions
        bias_total, mse_total = bias_total + bias, mse_total + mse
        rows.append({"conv": name, "mse": mse, "bias_squared": bias, "bias_share": round(bias / mse, 4)})
    result = {"command": "python tools/int8_bias_share.py " + " ".join(sys.argv[1:]),
              "float_convs": args.float_convs, "calibration_images": len(calib), "held_out_images": len(held),
              "held_out_mean_cosine": round(mean_cosine(_run(prepared, held), _run(quantized, held)), 5),
              "bias_share_all_convs": round(bias_total / mse_total, 4),
              "bias_share_median": float(np.median([r["bias_share"] for r in rows])), "convs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "convs"}, indent=1))


if __name__ == "__main__":
    main()
