#!/usr/bin/env bash
# Device check for one GPU, at most 8 minutes; prints one table (see benchmarks/gpu_check.py).
#   benchmarks/gpu_check.sh                 # on a CUDA machine
#   benchmarks/gpu_check.sh --smoke --device cpu   # checks the script itself anywhere, in seconds
# Python: $PYTHON, else .venv/bin/python, else python3 (torch with CUDA must be importable).
# The quick recipe needs Fashion-MNIST (LMCKIT_DATA, /usr/share/datasets or the user cache); without
# it that row says "skipped". Everything else uses random tensors.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# 470 s for the script (its own budget is 450 s), so the whole check stays under 8 minutes.
exec timeout -k 10 470 "$PY" benchmarks/gpu_check.py "$@"
