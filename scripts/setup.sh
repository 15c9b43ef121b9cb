#!/usr/bin/env bash
# Sets up a virtual environment in .venv with the CPU build of torch and this package (editable).
# GPU users: install torch your usual way into the environment first; this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # torch first: a bare 'torch' requirement could pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
echo "kohonen-vae installed in .venv  (activate with: source .venv/bin/activate)"
