#!/usr/bin/env bash
# One-command GPU check, for a machine with an NVIDIA GPU and no network:
#   1. builds linfusion_ops in place for the local GPU's arch only, with every core;
#   2. runs the test suite (`-m "not slow"`), then the slow tests if time allows;
#   3. runs benchmarks/bench_gpu.py, which writes <date>_<commit>_<gpu>.json and .png;
#   4. runs benchmarks/gpu_vs_model.py: measured times next to the emulator model's predictions
#      (and Nsight Compute counters when ncu exists), gpu_vs_model_<gpu>.json, and appends to
#      its log the run against the current model (gpu_vs_model.py --analyse).
# Logs and results go to ${OUT:-benchmarks/results}: at most 8 files (what a lent machine returns).
# Measured on an H200 (16 cores) at 4de0116: build 86 s; benchmark, model check and 60 s of ncu
# about 150 s; the fast tests in one process about 6 min (17 % took 66 s), hence the workers and
# TESTS_SECONDS. Exit status: non-zero when the build, the tests or the benchmark failed.
#
# Usage: bash benchmarks/gpu_check.sh        (PYTHON=/path/to/python to pick an interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
SLOW_TESTS_IF_ELAPSED_BELOW=${SLOW_TESTS_IF_ELAPSED_BELOW:-240}  # seconds
TESTS_SECONDS=${TESTS_SECONDS:-240}  # the fast tests are interrupted (SIGINT: summary kept) after this
BENCH_MAX_SECONDS=${BENCH_MAX_SECONDS:-2}  # per benchmark case
NCU_SECONDS=${NCU_SECONDS:-90}  # all ncu runs together
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
status=0

arch=$("$PYTHON" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}.{minor}')") || {
  echo "gpu_check: no CUDA GPU visible to torch ($PYTHON)" >&2
  exit 2
}
export TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc)
echo "gpu_check: building for sm_${arch/./} with $MAX_JOBS jobs ($PYTHON)"
if ! "$PYTHON" setup.py build_ext --inplace > "$OUT_DIR/gpu_check_build.log" 2>&1; then
  tail -n 50 "$OUT_DIR/gpu_check_build.log"
  echo "gpu_check: build failed after $(elapsed)s (log: $OUT_DIR/gpu_check_build.log)" >&2
  exit 1
fi
"$PYTHON" -c "import linfusion_ops; print('gpu_check: built', linfusion_ops.build_info())"
echo "gpu_check: build done at $(elapsed)s"

# The CUDA ops' bad-input tests under cuda-gdb, which stops at a crash and prints its host
# backtrace (seen on an H200 at 4de0116: layer_norm_leaky_relu on CUDA tensors with a (7,) weight
# for C = 8 segfaulted instead of raising; the same checks raise on CPU tensors).
if command -v cuda-gdb > /dev/null; then
  timeout 150 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt --args "$PYTHON" -m pytest tests/ops -q \
    -k "bad and cuda" -p no:cacheprovider -p no:faulthandler > "$OUT_DIR/gpu_check_error_probe.log" 2>&1
  grep -E "passed|failed|SIGSEGV|^#[0-9]" "$OUT_DIR/gpu_check_error_probe.log" | head -n 30
  echo "gpu_check: error probe done at $(elapsed)s"
fi

# With pytest-xdist (the lent H200 machines have it) the tests run in TEST_WORKERS processes: a
# test that crashes the interpreter (a segfault in an op) costs one worker, which xdist replaces
# and reports, instead of ending the run with no summary.
workers=""
if "$PYTHON" -c "import xdist" 2> /dev/null; then workers="-n ${TEST_WORKERS:-4}"; fi
timeout -s INT "$TESTS_SECONDS" "$PYTHON" -m pytest tests -q -m "not slow" -p no:cacheprovider -rfE --durations=15 \
  $workers 2>&1 | tee "$OUT_DIR/gpu_check_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check: tests done at $(elapsed)s"

if [ "$(elapsed)" -lt "$SLOW_TESTS_IF_ELAPSED_BELOW" ]; then
  timeout 150 "$PYTHON" -m pytest tests -q -m slow -p no:cacheprovider 2>&1 | tee -a "$OUT_DIR/gpu_check_tests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "gpu_check: slow tests done at $(elapsed)s"
else
  echo "gpu_check: skipping the slow tests (elapsed $(elapsed)s >= ${SLOW_TESTS_IF_ELAPSED_BELOW}s)"
fi

"$PYTHON" benchmarks/bench_gpu.py --out "$OUT_DIR" --max-seconds "$BENCH_MAX_SECONDS" 2>&1 | tee "$OUT_DIR/gpu_check_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# Measured times next to the emulator model's predictions (benchmarks/results/emu_profile.json),
# with Nsight Compute's counters when ncu is installed and time remains.
NCU_IF_ELAPSED_BELOW=${NCU_IF_ELAPSED_BELOW:-360}  # seconds
ncu_flag=""
if command -v ncu > /dev/null && [ "$(elapsed)" -lt "$NCU_IF_ELAPSED_BELOW" ]; then ncu_flag="--ncu"; fi
timeout 240 "$PYTHON" benchmarks/gpu_vs_model.py --out "$OUT_DIR" $ncu_flag --ncu-seconds "$NCU_SECONDS" 2>&1 | tee "$OUT_DIR/gpu_check_model.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# The run against the current model (bound, serial estimate, emulator vs ncu per kernel): tables
# into the model log; its JSON stays out of OUT_DIR (8 files come back), --analyse remakes it.
gpu_json=$(ls -t "$OUT_DIR"/gpu_vs_model_*.json 2> /dev/null | grep -v _analysis | head -1)  # the newest
if [ -n "$gpu_json" ]; then
  "$PYTHON" benchmarks/gpu_vs_model.py --analyse "$gpu_json" --out "$(mktemp -d)" >> "$OUT_DIR/gpu_check_model.log" 2>&1 || status=1
fi
echo "gpu_check: model check done at $(elapsed)s"
echo "gpu_check: finished in $(elapsed)s with status $status (results in $OUT_DIR)"
exit $status
