#!/usr/bin/env bash
# The GPU checks of issues 3 and 4, for a lent GPU machine whose python3 already has a
# CUDA build of torch, Triton, nvcc, pytest and pytest-xdist (the device machine's image;
# nothing is installed or downloaded). Run from the repository root, one step per call
# so that each stays inside a 10-minute command limit; build outputs stay in the tree
# (pyfast/_C*.so, build/) for the later steps on the same machine:
#
#   bash scripts/gpu_check.sh build   # pyfast._C with the CUDA kernels, in place
#   bash scripts/gpu_check.sh tests   # the cuda-marked tests (then: tests all = every test)
#   bash scripts/gpu_check.sh bench   # the bench on the GPU, every op and backend
#                                     # (more arguments go to python -m bench.run)
#
# Logs, the JUnit report and the bench result file go to $OUT when set (the device
# tool's folder that comes back), else to gpu-check/. PYFAST_CUDA_ARCHS picks the
# architectures (default here: 9.0, the H100 / H200; setup.py's own default is 8.0;9.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-gpu-check}
mkdir -p "$DEST"
step=${1:-}

info() {  # what runs where, into the log and on screen
  { nvidia-smi -L || echo "nvidia-smi: not found"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
    "$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not importable"
    command -v nvcc >/dev/null && nvcc --version | tail -n 1 || echo "nvcc: not found"
  } 2>&1 | tee -a "$DEST/env.txt"
}

need_gpu() {
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "gpu_check: torch sees no GPU here (torch.cuda.is_available() is False);" \
         "this script is for the lent GPU machine" >&2
    exit 2
  }
}

case "$step" in
  build)
    info
    need_gpu
    # PYFAST_CUDA=1: a build that cannot include the CUDA kernels fails and says why
    status=0
    PYFAST_CUDA=1 PYFAST_CUDA_ARCHS=${PYFAST_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      "$PY" setup.py build_ext --inplace > "$DEST/build.log" 2>&1 || status=$?
    grep -E " error|pyfast:" "$DEST/build.log" || true   # what was built, and any error
    if [ "$status" != 0 ]; then
      tail -n 40 "$DEST/build.log"
      echo "gpu_check: the build failed (exit $status); the whole log: $DEST/build.log" >&2
      exit "$status"
    fi
    "$PY" -c 'import pyfast, torch; print(pyfast.backends())' 2>&1 | tee "$DEST/backends.txt"
    ;;
  tests)
    need_gpu
    which=${2:-cuda}
    marker=(-m cuda)
    [ "$which" = all ] && marker=()
    # -x: stop at the first failure so its log is short; -p no:cacheprovider: no .pytest_cache
    workers=()   # pytest-xdist where the image has it
    "$PY" -c 'import xdist' 2>/dev/null && workers=(-n "${PYTEST_WORKERS:-4}")
    "$PY" -m pytest tests "${marker[@]}" -q -x -p no:cacheprovider "${workers[@]}" \
      --junitxml="$DEST/tests_$which.xml" 2>&1 | tee "$DEST/tests_$which.log" | tail -n 30
    ;;
  bench)
    need_gpu
    # more arguments go to bench.run (e.g. --ops int4_mm,sparse24_mm to split a long run)
    "$PY" -m bench.run --device cuda --out "$DEST" "${@:2}" 2>&1 | tee "$DEST/bench.log" | tail -n 40
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh build | tests [cuda|all] | bench [bench.run args]" >&2
    exit 2
    ;;
esac
