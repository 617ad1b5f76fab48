#!/usr/bin/env bash
# Set-up shared by scripts/demo.sh and scripts/test.sh, safe to re-run:
# a virtual environment in .venv with torch 2.13.0 (any torch >= 2.4 works; on
# the project's machines 2.13.0 is a local CPU wheel), then pyfast installed in
# editable mode, which builds the extension pyfast._C (C++ CPU kernels, plus the
# CUDA kernels when torch is a CUDA build and nvcc is found).
# --no-build-isolation: the extension must compile against the torch installed
# here; an isolated build would download the newest (CUDA) torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==${PYFAST_TORCH_VERSION:-2.13.0}" numpy setuptools wheel ninja
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test,demo]"
