#!/usr/bin/env bash
# The main job end to end on the embedded demo data (Fashion-MNIST, 300 train / 100 test images):
# fine-tune MobileNetV2 on the host → export the frozen extractor to ONNX → train a head on the device → predict.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
E=.venv/bin/edgetl
DEMO=$(.venv/bin/python -c "from edgetl.demo import DEMO_ROOT; print(DEMO_ROOT)")
OUT=${OUT:-out/quickstart}
rm -rf "$OUT"
$E finetune --model mobilenet_v2 --data "$DEMO/train" --out "$OUT/run" --epochs 2 --freeze head
$E export --run "$OUT/run" --out "$OUT/bundle"
$E device train "$OUT/bundle" --data "$DEMO/train"
$E device predict "$OUT/bundle" "$DEMO"/test/bag/*.png --top-k 2
$E device evaluate "$OUT/bundle" --data "$DEMO/test"
