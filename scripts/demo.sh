#!/usr/bin/env bash
# The main job on built-in defaults: set up, then compress a small MLP and compare.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pyfast "$@"
