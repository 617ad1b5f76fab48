#!/usr/bin/env bash
# The main job on built-in defaults: set up, then run the main demo (python -m pyfast:
# every compression recipe on the digits data, compared for accuracy, size and latency).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pyfast "$@"
