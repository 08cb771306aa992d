#!/usr/bin/env bash
# Every GPU path of reptile-dist in one run (benchmarks/gpu_check.py says which), a few minutes on
# one GPU. On a machine with the project installed:
#     bash benchmarks/gpu_check.sh
# On a machine without Ray (a bare GPU image), wheels in .whl/ are installed first into
# /tmp/site (python3 -m pip download ... -d .whl ray==<version> and its missing dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import ray" 2>/dev/null && [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PYTHON" benchmarks/gpu_check.py "$@"
