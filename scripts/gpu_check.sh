#!/usr/bin/env bash
# The GPU checks of issues 3 and 4, for a lent GPU machine whose python3 already has a
# CUDA build of torch, Triton, nvcc, pytest and pytest-xdist (the device machine's image;
# nothing is downloaded). Run from the repository root, one step per call so that each
# stays inside a 10-minute command limit; the build stays in the tree (pyfast/_C*.so,
# build/) for the later steps on the same machine:
#
#   bash scripts/gpu_check.sh build   # pip install -e . with the CUDA kernels (PYFAST_CUDA=1)
#   bash scripts/gpu_check.sh tests   # the cuda-marked tests (tests cpu: the others, GPU hidden)
#   bash scripts/gpu_check.sh diag    # the four error tests that crashed on the first GPU run,
#                                     # without xdist, with a native backtrace
#   bash scripts/gpu_check.sh bench   # the GPU bench, every op and backend
#                                     # (more arguments go to python -m bench.run)
#
# Logs, the per-test log (results.tsv: one line per test as it ends, so a run cut off
# by its time limit still tells), the JUnit report and the bench result file go to $OUT
# when set (the device tool's folder that comes back), else to gpu-check/.
# PYFAST_CUDA_ARCHS picks the architectures (default here: 9.0, the H100 / H200).
# The tests run with PYFAST_TRITON_CONFIGS=few unless it is set: one autotuner config
# per BLOCK_K (kernels/_common.py), because on a cold Triton cache the full lists cost
# 20-70 s per Triton test; the bench always autotunes over every config and checks each
# output against the reference. PYFAST_GPU_TEST_SECONDS (default 540) bounds the tests.
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
    # An editable install, as scripts/setup.sh does: it builds pyfast._C in place and maps
    # kernels/ to pyfast.kernels (build_ext --inplace alone leaves pyfast.kernels missing).
    # PYFAST_CUDA=1: a build that cannot include the CUDA kernels fails and says why.
    status=0
    PYFAST_CUDA=1 PYFAST_CUDA_ARCHS=${PYFAST_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . \
      > "$DEST/build.log" 2>&1 || status=$?
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
    # cuda: the cuda-marked tests, on the GPU. cpu: every other test as CI runs it, with
    # the GPU hidden (Triton's interpreter on CPU tensors; those tests create CPU tensors
    # and Triton launches nothing on them where a GPU is visible).
    case "$which" in
      cuda) marker=(-m cuda); hide=() ;;
      cpu) marker=(-m "not cuda"); hide=(env CUDA_VISIBLE_DEVICES=) ;;
      *) echo "gpu_check: tests $which; accepted: cuda (default), cpu" >&2; exit 2 ;;
    esac
    workers=()   # pytest-xdist where the image has it
    "$PY" -c 'import xdist' 2>/dev/null && workers=(-n "${PYTEST_WORKERS:-12}")
    # No -x: one run should report every failure. --timeout: a hung test fails alone.
    status=0
    PYFAST_TRITON_CONFIGS=${PYFAST_TRITON_CONFIGS:-few} PYFAST_TEST_LOG="$DEST/results.tsv" \
      timeout "${PYFAST_GPU_TEST_SECONDS:-540}" "${hide[@]}" "$PY" -m pytest tests "${marker[@]}" -q \
      -p no:cacheprovider "${workers[@]}" --timeout 300 -rfE \
      --junitxml="$DEST/tests_$which.xml" > "$DEST/tests_$which.log" 2>&1 || status=$?
    tail -n 30 "$DEST/tests_$which.log"
    echo "gpu_check: pytest exit $status (124: cut off by PYFAST_GPU_TEST_SECONDS)"
    cut -f1 "$DEST/results.tsv" | grep -v '^ ' | sort | uniq -c || true
    exit "$status"
    ;;
  diag)
    need_gpu
    # The error tests of the four CUDA C++ kernels died with SIGSEGV under pytest-xdist on
    # the first run (README, "What has run where"). Here: without xdist; then with the
    # system libstdc++ preloaded (two copies of libstdc++ in one process is one suspect);
    # then under cuda-gdb for the native backtrace.
    tests=(tests/test_cuda_int4_mm.py::test_errors tests/test_cuda_int8_mm.py::test_error_messages
           tests/test_cuda_sparse24_mm.py::test_errors tests/test_cuda_sparse24_int4_mm.py::test_errors)
    : > "$DEST/diag.log"
    # An error message with integers from the extension, without and with Triton (whose
    # libraries the test runs load) imported first: a standalone call raised cleanly.
    for first in "pass" "import triton"; do
      "$PY" -c "$first"'
import torch, pyfast._C
a = torch.zeros(1, 131072, dtype=torch.int8, device="cuda")
s = torch.ones(1, device="cuda")
try:
    torch.ops.pyfast_C.int8_mm(a, a, s, s, None, torch.float32)
except RuntimeError as e:
    print("raised:", str(e)[:90])' 2>&1 | tail -n 3 | sed "s/^/[$first] /" | tee -a "$DEST/diag.log"
    done
    "$PY" -m pytest "${tests[@]}" -q -p no:cacheprovider -p no:xdist 2>&1 | tail -n 8 | tee -a "$DEST/diag.log"
    libstdcxx=$(g++ -print-file-name=libstdc++.so.6 2>/dev/null || true)
    [ -n "$libstdcxx" ] && LD_PRELOAD=$libstdcxx "$PY" -m pytest "${tests[@]}" -q -p no:cacheprovider \
      -p no:xdist 2>&1 | tail -n 8 | tee -a "$DEST/diag.log"
    command -v cuda-gdb >/dev/null && timeout 240 cuda-gdb -q -batch -ex run -ex bt --args \
      "$PY" -m pytest "${tests[@]}" -q -p no:cacheprovider -p no:xdist > "$DEST/diag_gdb.log" 2>&1
    grep -E "^#|SIGSEGV" "$DEST/diag_gdb.log" | head -n 40 || true
    ;;
  bench)
    need_gpu
    # more arguments go to bench.run (e.g. --ops int4_mm,sparse24_mm to split a long run)
    "$PY" -m bench.run --device cuda --out "$DEST" "${@:2}" 2>&1 | tee "$DEST/bench.log" | tail -n 40
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh build | tests [cuda|cpu] | diag | bench [bench.run args]" >&2
    exit 2
    ;;
esac
