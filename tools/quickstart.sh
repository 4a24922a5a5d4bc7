#!/usr/bin/env bash
# The main job end to end on the embedded demo data (Fashion-MNIST, 300 train / 100 test images):
# fine-tune MobileNetV2 on the host → export the frozen extractor to ONNX → train a head on the device → predict.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "[quickstart] $*" >&2; }
say "setting up .venv (tools/setup.sh; its progress lines start with [setup]) ..."
bash tools/setup.sh
E=.venv/bin/edgetl
DEMO=$(.venv/bin/python -c "from edgetl.demo import DEMO_ROOT; print(DEMO_ROOT)")
OUT=${OUT:-out/quickstart}
rm -rf "$OUT"
say "1/5 fine-tune MobileNetV2 on the demo images (host, 2 epochs) → $OUT/run"
$E finetune --model mobilenet_v2 --data "$DEMO/train" --out "$OUT/run" --epochs 2 --freeze head
say "2/5 export the frozen extractor to ONNX, checked against PyTorch → $OUT/bundle"
$E export --run "$OUT/run" --out "$OUT/bundle"
say "3/5 device: embed the training images and train a head"
$E device train "$OUT/bundle" --data "$DEMO/train"
say "4/5 device: predict a few test images"
$E device predict "$OUT/bundle" "$DEMO"/test/bag/*.png --top-k 2
say "5/5 device: evaluate on the test images"
$E device evaluate "$OUT/bundle" --data "$DEMO/test"
say "done; the bundle is $OUT/bundle"
