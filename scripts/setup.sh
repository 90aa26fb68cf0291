#!/usr/bin/env bash
# Create .venv (if missing) and install spannorm with its test dependencies.
# torch is pinned by constraints.txt to 2.13.0, a CPU wheel (an unpinned torch pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
