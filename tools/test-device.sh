#!/usr/bin/env bash
# The torch-free device test lane: what a device has (numpy + ONNX Runtime, never torch), in ./.venv-device.
#
#   bash tools/test-device.sh            # extra arguments go to pytest, e.g. -x or -k golden
#
# 1. creates .venv-device (python3 -m venv) and installs the package with the device runtime and the test tools only:
#    -e ".[onnx,dev,serve]" (dev = pytest, hypothesis, scikit-image for its sample photos; serve = the console's
#    starlette, uvicorn, prometheus-client) and onnx (the graph library, which
#    some tests use to build or edit a graph; no torch), constrained by the repository's lock file if it has one;
# 2. proves torch is absent (exits 1 if `import torch` works there);
# 3. runs every device-side test: all but those marked host (need torch or the weight wheels), install (make venvs of
#    their own), slow, or needing an extra this lane does not install (openvino, tflite, text, stream, fleet). The
#    device tests use the committed real bundle under tests/data/ (made by tools/make_device_fixture.py), so none is
#    skipped for lack of torch: with EDGETL_DEVICE_LANE=1, tests/conftest.py turns such a skip into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
VENV=.venv-device
PY=${PYTHON:-python3}
start=$SECONDS

echo "[device lane] environment: $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
constraints=()
for lock in requirements/lock.txt requirements/constraints.txt requirements/device.txt constraints.txt \
            requirements-lock.txt; do
  if [ -f "$lock" ]; then constraints=(-c "$lock"); echo "[device lane] constraints: $lock"; break; fi
done
echo "[device lane] installing -e .[onnx,dev,serve] and onnx (no torch) ..."
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "${constraints[@]}" -e ".[onnx,dev,serve]" onnx

if "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[device lane] error: torch is importable in $VENV; the device lane must run without it" >&2
  exit 1
fi
echo "[device lane] torch is absent: \`import torch\` fails in $VENV"
"$VENV/bin/python" -c "import onnxruntime, numpy; print('[device lane] onnxruntime', onnxruntime.__version__, \
'numpy', numpy.__version__)"
echo "[device lane] setup took $((SECONDS - start)) s; running the device tests ..."

MARKS="not slow and not host and not install and not openvino and not tflite and not text and not stream and not fleet"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
EDGETL_DEVICE_LANE=1 "$VENV/bin/python" -m pytest -m "$MARKS" -p no:cacheprovider -rs "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
summary=$(grep -E "(passed|failed|error|no tests ran).* in [0-9.]+s" "$log" | tail -1 |
          sed -E 's/^=+ //; s/ =+$//' || true)
echo "[device lane] device tests: ${summary:-no summary} (torch absent; $((SECONDS - start)) s in all)"
exit "$rc"
