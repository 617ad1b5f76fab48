#!/usr/bin/env bash
# The test suite: set up, then pytest (GPU tests carry the `cuda` marker and are
# skipped where torch sees no GPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
