#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the test suite. Extra arguments go to pytest, e.g. `-m slow` for the long ones.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[test] setting up .venv first (tools/setup.sh; about a minute when everything is installed) ..." >&2
bash tools/setup.sh >/dev/null  # its progress lines ([setup] ...) go to stderr
echo "[test] running pytest $*" >&2
exec .venv/bin/python -m pytest "$@"
