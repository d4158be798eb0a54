#!/usr/bin/env bash
# The GPU checks of fastbert, sized for GPU time that comes once per task, 15 minutes in all
# (machine start included) and at most 10 minutes a command. Run `essentials` first: one call
# of at most 8 minutes on a fresh machine that brings back what matters most. The other calls
# are optional follow-ups, each standalone, for when time is left:
#
#   bash benchmarks/gpu_check.sh essentials RESULTS_DIR   # <= 8 min: install, correctness subset, headline numbers, tile choices
#   bash benchmarks/gpu_check.sh tests      RESULTS_DIR   # install + the whole test suite on CUDA
#   bash benchmarks/gpu_check.sh kernels    RESULTS_DIR   # op microbenchmarks (fp16, bf16), training steps
#   bash benchmarks/gpu_check.sh models     RESULTS_DIR   # model benchmarks on a grid that fits one call
#
#   bash benchmarks/gpu_check.sh --dry-run CALL RESULTS_DIR   # (or DRY_RUN=1) every step of CALL on the CPU
#
# `essentials`: install (with a check that ninja is there: without it the extension's
# translation units build one by one); `python -m fastbert.info --check` (every op of every GPU
# backend against the reference in fp16 and bf16 on awkward shapes); the GPU tests of the ops,
# the Triton model, the host path's sync-debug and CUDA-graph tests; the attention op at head
# dim 64, sequence 512 and BERT-base's FFN GEMM (achieved TFLOP/s, and each kernel's measured
# tile choice with every candidate's time); BERT-base fp16 at 32x128 full and uniform (~50 %)
# fill and at 1x16, fastbert with and without CUDA graphs against HF SDPA and HF SDPA replayed
# from a CUDA graph.
#
# Each call runs in at most GPU_CHECK_BUDGET_S seconds (default 480 for essentials, 540 for
# the others): every step runs under `timeout` with its own cap, cut to what is left of the
# budget (SIGINT first, so pytest and the benchmarks keep what they have, SIGKILL 15 s later);
# a step that finds less than 10 s left is skipped. The run goes on after a failing step. Each
# call ends with its summary (step status and duration, then the headline numbers), on the
# console and in RESULTS_DIR/summary-CALL.txt and .json, and exits non-zero if a step did not
# succeed or it wrote more than 8 files.
#
# What each call writes at the top of RESULTS_DIR (the logs of every step go in the tarball):
#   essentials  summary-essentials.{txt,json}, tests-junit.xml, kernels.json, models.json, logs-essentials.tar.gz
#   tests       summary-tests.{txt,json}, tests-junit.xml, tests.log, logs-tests.tar.gz
#   kernels     summary-kernels.{txt,json}, kernels-float16.json, kernels-bfloat16.json, training.json,
#               logs-kernels.tar.gz
#   models      summary-models.{txt,json}, host-overhead.json, models-grid.json, models-bf16.json, models-report.md,
#               logs-models.tar.gz
#
# `essentials` and `tests` always install (pip install -e is idempotent); `kernels` and
# `models` install only when fastbert with a CUDA-built extension does not import from this
# checkout (a fresh machine). The interpreter is $PYTHON (default python3). The dry run forces
# the CPU (CUDA_VISIBLE_DEVICES=""), does not install (it checks that fastbert imports from the
# checkout), and shrinks each step: two quick test functions; the op benchmarks at one tiny
# case per op with Triton in its interpreter; the model benchmarks on the tiny config (fp32 for
# the grid, the GPU one's fp16 being slow on CPUs) with torch.compile disabled
# (TORCH_COMPILE_DISABLE=1: the compile peers run eagerly). tests/test_gpu_check.py runs it.
set -u

usage() {
    echo "usage: bash benchmarks/gpu_check.sh [--dry-run] essentials|tests|kernels|models RESULTS_DIR" >&2
    exit 2
}
DRY_RUN=${DRY_RUN:-0}
[ "$DRY_RUN" = 0 ] || [ "$DRY_RUN" = 1 ] || usage
if [ "${1:-}" = --dry-run ]; then
    DRY_RUN=1
    shift
fi
[ $# -eq 2 ] || usage
CALL=$1
case "$CALL" in essentials | tests | kernels | models) ;; *) usage ;; esac
mkdir -p "$2" || exit 2
RESULTS=$(cd "$2" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

BUDGET_S=${GPU_CHECK_BUDGET_S:-$([ "$CALL" = essentials ] && echo 480 || echo 540)}
STEP_LIMIT_S=${GPU_CHECK_STEP_LIMIT_S:-}  # caps every step (to try the time guard)
RESERVE_S=30   # kept back from the budget for SIGKILL's grace, the tarball and the summary
KILL_AFTER_S=15
MIN_STEP_S=10
DEADLINE=$((SECONDS + BUDGET_S))

export PYTHON=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, installed or not (xdist workers too)
export FASTBERT_GPU_CHECK=1                            # tests/test_gpu_check.py does not run the script within it
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1  # no network on the GPU machine
if [ "$DRY_RUN" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # it measures nothing: no thread pools spinning on shared cores
    DEVICE=cpu
else
    unset TRITON_INTERPRET  # kernels must compile for the GPU, not run in the interpreter
    DEVICE=cuda
    # torch finds nvcc through CUDA_HOME; without it (nvcc is only a symlink in /usr/local/bin)
    # the extension would build CPU-only. FASTBERT_REQUIRE_CUDA makes setup.py fail instead.
    if [ -z "${CUDA_HOME:-}" ]; then
        if [ -x /usr/local/cuda-13.0/bin/nvcc ]; then
            export CUDA_HOME=/usr/local/cuda-13.0
        elif command -v nvcc >/dev/null; then
            CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
            export CUDA_HOME
        fi
    fi
    [ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
    export FASTBERT_REQUIRE_CUDA=1 FASTBERT_CUDA_ARCH=${FASTBERT_CUDA_ARCH:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
fi

LOGS="$RESULTS/logs-$CALL"  # tarred into logs-$CALL.tar.gz at the end
STATE=$(mktemp -d)
trap 'rm -rf "$STATE"' EXIT
# This call's files from an earlier run in the same folder would be read as this run's results.
OWN_FILES=$("$PYTHON" -m benchmarks.gpu_check files "$CALL") || exit 2
(cd "$RESULTS" && rm -f $OWN_FILES)
ls -A "$RESULTS" >"$STATE/before.txt"
rm -rf "$LOGS" && mkdir -p "$LOGS"
: >"$STATE/steps.tsv"
FAILED=0

# record NAME STATUS RC SECONDS LIMIT NOTE: one row of the step table the summary reads.
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STATE/steps.tsv"
    [ "$2" = ok ] || FAILED=1
}

# step NAME CAP_S COMMAND...: run COMMAND (its output to the console and $LOGS/NAME.log) for at
# most CAP_S seconds, less if the call's budget runs short. Returns COMMAND's exit status.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - RESERVE_S - SECONDS))
    if [ "$left" -lt "$MIN_STEP_S" ]; then
        echo "=== $name: skipped, ${left}s left of the call's ${BUDGET_S}s"
        record "$name" skipped "" 0 "" "no time left"
        return 1
    fi
    local limit=$((cap < left ? cap : left))
    if [ -n "$STEP_LIMIT_S" ] && [ "$STEP_LIMIT_S" -lt "$limit" ]; then
        limit=$STEP_LIMIT_S
    fi
    echo "=== $name (at most ${limit}s): $*"
    local begin=$SECONDS
    timeout -s INT -k "$KILL_AFTER_S" "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - begin))
    if [ "$rc" -eq 0 ]; then
        record "$name" ok 0 "$took" "$limit" ""
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        record "$name" TIMEOUT "$rc" "$took" "$limit" "stopped at the time limit"
    else
        record "$name" FAILED "$rc" "$took" "$limit" ""
    fi
    [ "$rc" -eq 0 ] || tail -n 12 "$LOGS/$name.log" >"$STATE/$name.tail"  # shown in the summary
    return "$rc"
}

info_step() {
    local dry=()
    [ "$DRY_RUN" = 1 ] && dry=(--dry-run)
    step info 60 "$PYTHON" -m benchmarks.gpu_check info "${dry[@]}"
}

# The editable install builds fastbert._C (CPU and CUDA kernels for sm_90). If pip cannot
# install, the extension is built in place instead, so that the later steps still run. The
# ninja check comes first: without ninja the build runs its translation units one by one,
# which can take longer than the install's cap (the build still runs; the summary says why).
install_steps() {
    step ninja 20 "$PYTHON" -m benchmarks.gpu_check ninja
    if [ "$DRY_RUN" = 1 ]; then
        step install 120 "$PYTHON" -m benchmarks.gpu_check installed
        return
    fi
    # PIP_BREAK_SYSTEM_PACKAGES: the GPU machine's python3 may be a distribution's (PEP 668).
    if ! PIP_BREAK_SYSTEM_PACKAGES=1 step install 330 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .; then
        step install-inplace 330 "$PYTHON" setup.py build_ext --inplace
    fi
    step extension 60 "$PYTHON" -m benchmarks.gpu_check installed --require-cuda
}

# kernels and models: install only when this checkout's fastbert with CUDA kernels does not import.
ensure_installed() {
    local begin=$SECONDS
    if [ "$DRY_RUN" = 0 ] && timeout 120 "$PYTHON" -m benchmarks.gpu_check installed --require-cuda \
        >"$LOGS/install.log" 2>&1; then
        cat "$LOGS/install.log"
        record install ok 0 $((SECONDS - begin)) 120 "already installed"
        return
    fi
    install_steps
}

run_tests() {
    local xdist=()
    "$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n auto)
    local selection=(tests)
    if [ "$DRY_RUN" = 1 ]; then
        selection=(tests/test_benchmarks.py -k "fills_are_seeded or interleaved_rounds")
    fi
    step tests 600 "$PYTHON" -m pytest "${selection[@]}" -q -ra -p no:cacheprovider --durations=15 \
        --junitxml="$RESULTS/tests-junit.xml" "${xdist[@]}"
    [ -f "$LOGS/tests.log" ] && cp "$LOGS/tests.log" "$RESULTS/tests.log"
}

run_kernels() {
    local common=(--device "$DEVICE")
    if [ "$DRY_RUN" = 1 ]; then
        export TRITON_INTERPRET=1
        common+=(--tiny --rounds 3)
    fi
    local training=(--workload bert-base --dtype float16,bfloat16 --shapes 32x128 --fills 0.5,full --budget 5)
    [ "$DRY_RUN" = 1 ] && training=(--workload minilm --dtype float32 --shapes 2x16 --fills 0.5 --budget 0)
    step kernels-float16 270 "$PYTHON" -m benchmarks.kernels "${common[@]}" --dtype float16 \
        --out "$RESULTS/kernels-float16.json"
    step kernels-bfloat16 150 "$PYTHON" -m benchmarks.kernels "${common[@]}" --dtype bfloat16 \
        --out "$RESULTS/kernels-bfloat16.json"
    # Training steps (forward + backward + AdamW) against HF SDPA: BERT-base fine-tuning shapes.
    step training 90 "$PYTHON" -m benchmarks.training --device "$DEVICE" "${training[@]}" \
        --out "$RESULTS/training.json"
}

# The model grid, sized for one call (a prediction until a GPU run measures it): BERT-base, the
# workload users run most, fp16 at 8x128, 32x128 and 1x16 (typical batch, a large one, latency),
# full rows and uniform fill (~50 % real tokens: where padding-free pays), then bf16 at 8x128
# uniform only. Every fastbert build is cheap; the time goes into torch.compile(mode=
# "max-autotune"), which compiles and autotunes its GEMMs once per shape (dynamic=False): about
# a minute per shape on 16 cores, so four shapes in all. BERT-large, MiniLM and S=512 are left
# to the full `python -m benchmarks` grid. Shapes run in order of importance, and the runner
# writes its JSON after every measurement, so a step stopped at its cap keeps what it measured.
MODEL_IMPLS=fastbert-triton,fastbert-triton-graphs,fastbert-cuda,hf-sdpa,hf-sdpa-compile-max-autotune,nested-tensor

run_models() {
    local work="$LOGS/models"
    local grid=(--workload bert-base --dtype float16 --shapes 8x128,32x128,1x16 --fills full,uniform --budget 0.5)
    local bf16=(--workload bert-base --dtype bfloat16 --shapes 8x128 --fills uniform --budget 0.5)
    if [ "$DRY_RUN" = 1 ]; then
        export TORCH_COMPILE_DISABLE=1
        grid=(--workload tiny --dtype float32 --shapes 2x16 --fills full,uniform --budget 0)
        bf16=(--workload tiny --dtype bfloat16 --shapes 2x16 --fills uniform --budget 0)
    fi
    # Host time per forward (a tiny model, and BERT-base with its kernels stubbed): a few seconds.
    step host-overhead 60 "$PYTHON" -m benchmarks.host_overhead --device "$DEVICE" \
        --budget "$([ "$DRY_RUN" = 1 ] && echo 0.2 || echo 2)" --out "$RESULTS/host-overhead.json"
    step models-grid 300 "$PYTHON" -m benchmarks --device "$DEVICE" --impl "$MODEL_IMPLS" "${grid[@]}" \
        --name models-grid --out "$work"
    step models-bf16 120 "$PYTHON" -m benchmarks --device "$DEVICE" --impl "$MODEL_IMPLS" "${bf16[@]}" \
        --name models-bf16 --out "$work"
    if ls "$work"/*.json >/dev/null 2>&1; then
        step models-report 45 "$PYTHON" -m benchmarks.report "$work"
        cp "$work"/models-*.json "$RESULTS/"
        [ -f "$work/summary.md" ] && cp "$work/summary.md" "$RESULTS/models-report.md"
    fi
}

# essentials: the correctness subset, then the headline numbers (see the header).
run_essentials() {
    local xdist=()
    "$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n 8)
    step check 90 "$PYTHON" -m fastbert.info --check
    local selection=(tests/test_ops.py tests/test_triton_kernels.py tests/test_triton_training.py
                     tests/test_triton_model.py tests/test_host_path.py -k "cuda or graph or sync")
    if [ "$DRY_RUN" = 1 ]; then
        selection=(tests/test_benchmarks.py -k "fills_are_seeded or interleaved_rounds")
    fi
    step tests 120 "$PYTHON" -m pytest "${selection[@]}" -q -ra -p no:cacheprovider --durations=10 \
        --junitxml="$RESULTS/tests-junit.xml" "${xdist[@]}"
    local kernels=(--device "$DEVICE" --dtype float16 --rounds 30)
    local models=(--impl fastbert-triton,fastbert-triton-graphs,hf-sdpa --workload bert-base --dtype float16
                  --shapes 32x128,1x16 --fills full,uniform --budget 0.3)
    if [ "$DRY_RUN" = 1 ]; then  # fp32 and the C++ backend: what measures choices and runs on a CPU
        kernels=(--device cpu --dtype float32 --tiny --rounds 3)
        models=(--impl fastbert-cpp,hf-sdpa --workload tiny --dtype float32 --shapes 2x16 --fills full,uniform
                --budget 0)
    fi
    # (The dry run's Triton kernels run in the interpreter for this step only: with it on, the
    # models step would run fastbert-triton on the CPU at the interpreter's pace.)
    TRITON_INTERPRET=$DRY_RUN step kernels 60 "$PYTHON" -m benchmarks.kernels "${kernels[@]}" \
        --ops attention,linear_gelu --out "$RESULTS/kernels.json"
    step models 150 "$PYTHON" -m benchmarks --device "$DEVICE" "${models[@]}" --name models --out "$LOGS/models"
    [ -f "$LOGS/models/models.json" ] && cp "$LOGS/models/models.json" "$RESULTS/models.json"
}

echo "=== gpu_check.sh $CALL$([ "$DRY_RUN" = 1 ] && echo ' (dry run on CPU)'): results in $RESULTS, at most ${BUDGET_S}s"
info_step
case "$CALL" in
    essentials)
        install_steps
        run_essentials
        ;;
    tests)
        install_steps
        run_tests
        ;;
    kernels)
        ensure_installed
        run_kernels
        ;;
    models)
        ensure_installed
        run_models
        ;;
esac

tar -czf "$RESULTS/logs-$CALL.tar.gz" -C "$RESULTS" "logs-$CALL" && rm -rf "$LOGS"
if ! "$PYTHON" -m benchmarks.gpu_check summary "$CALL" "$RESULTS" "$STATE" $([ "$DRY_RUN" = 1 ] && echo --dry-run); then
    FAILED=1
fi
if [ ! -s "$RESULTS/summary-$CALL.txt" ]; then  # the summary itself broke: the step table at least
    { echo "=== summary: gpu_check.sh $CALL (raw step table; the summary script failed)"
      cat "$STATE/steps.tsv"; } | tee "$RESULTS/summary-$CALL.txt"
    FAILED=1
fi
exit $FAILED
