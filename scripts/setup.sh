#!/usr/bin/env bash
# Create or reuse .venv, install torch==2.13.0 first (a CPU wheel on this kind of
# machine; a bare `pip install torch` would pull a multi-GB CUDA build), then
# lmckit with its test extras, then make sure Fashion-MNIST is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
V=.venv/bin/python
if ! $V -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  $V -m pip install -q --disable-pip-version-check torch==2.13.0
fi
# Reinstall the package only when pyproject.toml changed since the last install.
stamp=.venv/.lmckit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! $V -c 'import lmckit' 2>/dev/null; then
  $V -m pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
# The default dataset.
if ! $V -c 'from lmckit.data import find_dataset; find_dataset("fashion-mnist")' 2>/dev/null; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)" >&2
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1) || \
      (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)
  fi
fi
if ! $V -c 'from lmckit.data import find_dataset; find_dataset("fashion-mnist")' 2>/dev/null; then
  echo "setup: Fashion-MNIST not installed by apt; trying a download into the user cache" >&2
  .venv/bin/lmckit data download fashion-mnist || {
    echo "setup: Fashion-MNIST is missing. Install it with 'apt-get install dataset-fashion-mnist'," >&2
    echo "       or put the four IDX files in a folder and set LMCKIT_DATA to it." >&2
    exit 1
  }
fi
