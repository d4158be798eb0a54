#!/usr/bin/env bash
# One call does every GPU check fastbert has, for machines where GPU time is rare:
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR
#
#   1. info        device, driver and library versions
#   2. install     pip install --no-build-isolation --no-deps -e .  (no network needed); builds the
#                  C++/CUDA extension for sm_90 (FASTBERT_CUDA_ARCH=9.0) when csrc/ exists
#   3. extension   imports fastbert._C (only when csrc/ exists)
#   4. tests       the whole pytest suite, on CUDA (bf16 and BERT-large sizes included)
#   5. kernels-*   op microbenchmarks, fp16 (with the sweep of launch configs) and bf16, as JSON
#                  (python -m benchmarks.kernels)
#   6. benchmarks  the model benchmark runner (python -m benchmarks), when benchmarks/__main__.py exists
#
# Every step writes RESULTS_DIR/<step>.log (and JSON where it has results) and the run goes on
# after a failing step. A summary of each step's status ends the output and RESULTS_DIR/summary.txt;
# the script exits non-zero if any step failed. STEPS="install tests" (names as above, space
# separated) runs only those steps, e.g. to split the work across calls with a time limit.
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh RESULTS_DIR" >&2
    exit 2
fi
mkdir -p "$1"
RESULTS=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # kernels must compile for the GPU, not run in the interpreter
export FASTBERT_CUDA_ARCH=${FASTBERT_CUDA_ARCH:-9.0} MAX_JOBS=${MAX_JOBS:-8} TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-all}
STATUS=()
FAILED=0

# step NAME COMMAND...: run COMMAND, its output to the console and RESULTS/NAME.log.
step() {
    local name=$1
    shift
    if [ "$STEPS" != all ] && [[ " $STEPS " != *" $name "* ]]; then
        STATUS+=("skipped $name")
        return
    fi
    echo "=== $name: $*"
    local begin=$SECONDS
    "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - begin))
    if [ "$rc" -eq 0 ]; then
        STATUS+=("ok      $name (${took}s)")
    else
        STATUS+=("FAILED  $name (exit $rc, ${took}s, log $RESULTS/$name.log)")
        FAILED=1
    fi
}

info() {
    date -u
    nvidia-smi || true
    "$PYTHON" - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
try:
    import transformers
    print("transformers", transformers.__version__)
except ImportError:
    print("transformers not installed")
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
else:
    raise SystemExit("no CUDA device visible to torch")
PY
}

step info info
step install "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
if [ -d csrc ]; then
    step extension "$PYTHON" -c "import fastbert._C as ext; print('fastbert._C loaded from', ext.__file__)"
fi
step tests "$PYTHON" -m pytest tests -q -ra --junitxml="$RESULTS/pytest.xml"
step kernels-float16 "$PYTHON" -m benchmarks.kernels --device cuda --dtype float16 --sweep \
    --out "$RESULTS/kernels-float16.json"
step kernels-bfloat16 "$PYTHON" -m benchmarks.kernels --device cuda --dtype bfloat16 --out "$RESULTS/kernels-bfloat16.json"
if [ -f benchmarks/__main__.py ]; then
    step benchmarks "$PYTHON" -m benchmarks --device cuda --out "$RESULTS"
fi

{
    echo "=== summary ($(date -u))"
    printf '%s\n' "${STATUS[@]}"
} | tee "$RESULTS/summary.txt"
exit $FAILED
