#!/usr/bin/env bash
# The one prepared script for a machine with an NVIDIA GPU and no network (e.g. the lent
# H100/H200, whose python3 has torch, pybind11, cmake, ninja, nvcc and compute-sanitizer).
# It keeps to a time budget, PYMETA_BUDGET_S seconds from its start (default 345, under the
# lent machine's 6 minutes; 0: none): every step after the build runs under `timeout` with the
# smaller of its own limit and the budget left (15 s kept for the summary), and a step with
# under 10 s left is skipped and says so in its log; the summary names the steps skipped and
# those the budget cut short. Order: build, CUDA tests, the LSTM goals
# table, compute-sanitizer, the A/B forward table, then the optional timings. Before the budget
# (H100): run 19 349 s and run 20 468 s with the skips below, the build alone 142 s (run 21).
# It builds pymeta in place for that GPU, runs the CUDA tests, the LSTM benchmarks and every
# kernel under compute-sanitizer, and prints a short table last.
#   bash bench/gpu_check.sh            # logs and bench.json: $OUT/logs.tgz (OUT=/tmp/pymeta-gpu)
#   PYMETA_SKIP_BENCH=1 bash bench/gpu_check.sh   # without the inner_update table (~30 s less)
#   PYMETA_SKIP_MAML=1 ...     # without the MAML timings and profile (~50 s less)
#   PYMETA_LSTM_TIMING=0 ...   # without the LSTM H sweep; PYMETA_GOALS_ARGS=--no-compile: no compile column
#   PYMETA_NCU=1 ...           # + Nsight Compute sections of the LSTM kernels (~1 min)
#   PYMETA_MAML_MEMORY=1 ...   # + MAML peak memory vs inner steps, with checkpoint_steps (~1.5 min)
#   PYMETA_LSTM_MEMORY=1 ...   # + LSTMOptimizer / unroll memory, float32 vs bfloat16 state (~40 s)
#   PYMETA_MEM_PROBE=1 ...     # + bench/lstm_mem_probe.cu (the step's access patterns, ~25 s)
#   PYMETA_QUICK=1 ...         # a short recheck (run 21: 245 s with the skips above): the CUDA
#                              # tests of PYMETA_TEST_K (a pytest -k expression) only, no
#                              # sanitizers, no goals table
#   PYMETA_BUDGET_S=540 ...    # a longer budget (the device tool's limit is 600 s a command)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pymeta-gpu}
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/logs.tgz  # a reused $OUT: no stale log in the summary
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYMETA_CUDA=1
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # just this GPU's architecture: a quicker build
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi
export TORCH_CUDA_ARCH_LIST
# The lent GPU image sets CXX=/opt/gcc/bin/g++, which linked libstdc++ code into the module
# (3401 std:: symbols defined in _C.so, seen 2026-11-26); the module's private copies of the
# locale facets then crash its first std::ostream use (every TORCH_CHECK message). The system compiler links libstdc++ as torch
# does. Override with PYMETA_CXX.
if [ -n "${PYMETA_CXX:-}" ]; then export CXX=$PYMETA_CXX CUDAHOSTCXX=$PYMETA_CXX
elif [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc CUDAHOSTCXX=/usr/bin/g++
fi
rm -rf build-gpu  # a fresh configure, so the compiler choice above takes effect

BUDGET=${PYMETA_BUDGET_S:-345}
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "PYMETA_BUDGET_S must be a whole number of seconds, not '$BUDGET'"; exit 2; }
SKIPPED="" CUT=""
# tmo LIMIT CMD...: CMD under `timeout`, limited to the smaller of LIMIT and the budget left;
# with under 10 s left, skipped (exit status 124, a line on stdout, named in SKIPPED). A step
# the budget's limit stopped is named in CUT.
tmo() {
  local limit=$1 capped=0 a label
  shift
  label=$1
  for a in "$@"; do case $a in *.py|*mem_probe|pymeta|pytest|memcheck|racecheck|synccheck) label=$a; break;; esac; done
  label=$(basename "$label")
  if [ "$BUDGET" -gt 0 ]; then
    local left=$((BUDGET - SECONDS - 15))
    if [ "$left" -lt 10 ]; then
      echo "skipped: the ${BUDGET} s budget (PYMETA_BUDGET_S) is spent"
      SKIPPED="$SKIPPED $label"
      return 124
    fi
    [ "$left" -lt "$limit" ] && limit=$left capped=1
  fi
  timeout "$limit" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ] && [ "$capped" = 1 ]; then
    echo "cut: the ${BUDGET} s budget (PYMETA_BUDGET_S) ran out"
    CUT="$CUT $label"
  fi
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

t0=$SECONDS
if ! { cmake -S . -B build-gpu -G Ninja -DPython_EXECUTABLE="$(command -v $PY)" \
         -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/pymeta" && cmake --build build-gpu -j"$(nproc)"; } \
       > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
build_s=$((SECONDS - t0))
grep -iE "registers|spill|stack" "$OUT/build.log" | head -20

t0=$SECONDS
QUICK=${PYMETA_QUICK:-0}
tmo 240 $PY -m pytest tests -q -m cuda -p no:cacheprovider ${PYMETA_TEST_K:+-k "$PYMETA_TEST_K"} \
  > "$OUT/tests.log" 2>&1
tests_rc=$?
tests_s=$((SECONDS - t0))
tail -25 "$OUT/tests.log"

t0=$SECONDS
# the issue's goals (PYMETA_GOALS_ARGS=--no-compile: without torch.compile's column, ~40 s less)
[ "$QUICK" != 1 ] && tmo 170 $PY bench/lstm_gpu_goals.py ${PYMETA_GOALS_ARGS:-} > "$OUT/lstm_goals.log" 2>&1
goals_s=$((SECONDS - t0))

t0=$SECONDS
san_rc=0 race_rc=0 sync_rc=0
if [ "$QUICK" != 1 ]; then
# without torch's caching allocator, so that a read past a tensor's end leaves its allocation
tmo 130 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY bench/sanitize.py > "$OUT/sanitizer.log" 2>&1
san_rc=$?
# shared-memory hazards of the cp.async kernels: the staged LSTM forward (per-warp buffers)
# and the tensor-core weight gradients (block-wide double buffer)
tmo 130 compute-sanitizer --tool racecheck --error-exitcode 9 $PY bench/sanitize.py staged wgrad blocked > "$OUT/racecheck.log" 2>&1
race_rc=$?
# barriers: the staged forward's sync form (every warp of a group meets every barrier)
tmo 90 compute-sanitizer --tool synccheck --error-exitcode 9 $PY bench/sanitize.py sync > "$OUT/synccheck.log" 2>&1
sync_rc=$?
else
  for f in sanitizer racecheck synccheck; do echo "skipped (PYMETA_QUICK=1)" > "$OUT/$f.log"; done
fi
san_s=$((SECONDS - t0))
tail -5 "$OUT/sanitizer.log"
tail -3 "$OUT/racecheck.log"
tail -2 "$OUT/synccheck.log"


t0=$SECONDS
if [ "${PYMETA_MEM_PROBE:-0}" = 1 ]; then  # standalone (no torch): the forward's memory patterns
  # this GPU's architecture, and the nvcc and host compiler the build used
  cap=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
  nvcc_bin=$(sed -n 's/^CMAKE_CUDA_COMPILER:[A-Z]*=//p' build-gpu/CMakeCache.txt 2>/dev/null)
  { "${nvcc_bin:-nvcc}" -ccbin "${CXX:-g++}" -O3 -std=c++17 -arch="sm_$cap" \
      bench/lstm_mem_probe.cu -o "$OUT/mem_probe" &&
    tmo 90 "$OUT/mem_probe" 10000000 15 16; } > "$OUT/mem_probe.log" 2>&1
  rm -f "$OUT/mem_probe"
fi
# the forward's kernels in alternating rounds (H 20): the feature-major default (float32: the
# staged kernel's sync form in barrier groups of 4 warps; at 10k, with fewer block steps than
# SMs, the direct kernel) and the direct kernel, against the blocked state layout's kernels:
# its default (the free-running staged kernel; the direct one at 10k), the direct one and the
# staged one's sync form; bfloat16: the feature-major default (staged) against the blocked
# default (staged) and direct kernels
ab_sizes="1e6 1e7"  # (10k: eager calls are host-bound, no signal; the goals table's graph column times it)
{ tmo 90 $PY bench/lstm_gpu_ab.py --op forward --N $ab_sizes --variant default: \
    --variant direct:PYMETA_LSTM_MMA_STAGED=0 --variant blk:LAYOUT=blocked \
    --variant blkdirect:LAYOUT=blocked,PYMETA_LSTM_BLK_STAGED=0 \
    --variant blksync:LAYOUT=blocked,PYMETA_LSTM_SYNC=1
  tmo 60 $PY bench/lstm_gpu_ab.py --op forward --bf16 --N 1e6 1e7 --variant default: \
    --variant blk:LAYOUT=blocked --variant blkdirect:LAYOUT=blocked,PYMETA_LSTM_BLK_STAGED=0
} > "$OUT/lstm_ab.log" 2>&1
if [ "${PYMETA_LSTM_TIMING:-1}" = 1 ]; then  # PYMETA_LSTM_TIMING=0: without the H sweep (~60 s less)
  tmo 90 $PY bench/lstm_gpu_timing.py --H 20 32 64 > "$OUT/lstm_timing.log" 2>&1
fi
if [ "${PYMETA_SKIP_MAML:-0}" != 1 ]; then  # PYMETA_SKIP_MAML=1: when only the LSTM changed
  tmo 150 $PY bench/gpu_check_maml.py cuda noloop > "$OUT/maml.log" 2>&1
  # inner_update's eager front vs the registered op (host cost per eager MAML iteration)
  tmo 60 $PY bench/maml_front_timing.py --device cuda --rounds 6 > "$OUT/maml_front.log" 2>&1
fi
if [ "${PYMETA_MAML_MEMORY:-0}" = 1 ]; then
  tmo 150 $PY bench/maml_memory.py --device cuda --steps 1 5 --first-order-steps 5 \
    > "$OUT/maml_memory.log" 2>&1
  tail -12 "$OUT/maml_memory.log"
fi
if [ "${PYMETA_LSTM_MEMORY:-0}" = 1 ]; then
  { tmo 60 $PY bench/lstm_state_memory.py --device cuda --params 20000000 --width 2000
    tmo 60 $PY bench/lstm_state_memory.py --device cuda --unroll --params 1000000; } \
    > "$OUT/lstm_memory.log" 2>&1
  tail -12 "$OUT/lstm_memory.log"
fi
extra_s=$((SECONDS - t0))
if [ "${PYMETA_NCU:-0}" = 1 ]; then  # Nsight Compute on the LSTM kernels (~1 min): stall reasons
  # (the first warm-up round's 11 launches: 3 forwards, the 4 backward passes each with their wgrad kernel)
  tmo 150 ncu -k regex:"forward_mma_kernel|forward_mma_staged_kernel|forward_mma_staged_sync_kernel|backward_smem_kernel|backward_smem_ahead_kernel|backward_smem_wide_kernel|backward_mma_kernel|wgrad_kernel|wgrad_mma_kernel" -c 11 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SchedulerStats --section ComputeWorkloadAnalysis \
    $PY bench/lstm_ncu.py > "$OUT/ncu.log" 2>&1
  grep -E "^  [a-z_]+kernel|Duration|Throughput|Achieved Occupancy|Registers|Issue Slots|Eligible" \
    "$OUT/ncu.log" | head -60
fi
if [ "${PYMETA_PROFILE:-1}" = 1 ]; then  # kernel-time breakdowns, for the next levers
  tmo 90 $PY bench/gpu_profile.py 20 ${PYMETA_SKIP_MAML:+lstm} > "$OUT/profile.log" 2>&1
fi

t0=$SECONDS
bench_rc=0
if [ "${PYMETA_SKIP_BENCH:-0}" = 1 ]; then  # for a short device lease: the op table only
  echo "(pymeta bench skipped: PYMETA_SKIP_BENCH=1)" > "$OUT/bench.log"
else
  tmo 120 $PY -m pymeta bench --device cuda --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  bench_rc=$?
fi
bench_s=$((SECONDS - t0))

echo
echo "==================== pymeta gpu_check summary ===================="
cat "$OUT/gpu.txt"
echo "build:      ${build_s}s (archs $TORCH_CUDA_ARCH_LIST)"
echo "cuda tests: rc=$tests_rc ${tests_s}s: $(tail -1 "$OUT/tests.log")"
echo "sanitizer:  rc=$san_rc ${san_s}s: $(grep -E 'ERROR SUMMARY|kernels ran|skipped' "$OUT/sanitizer.log" | tr '\n' ' ')"
echo "racecheck:  rc=$race_rc: $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY| ran$|skipped' "$OUT/racecheck.log" | tr '\n' ' ')"
echo "synccheck:  rc=$sync_rc: $(grep -E 'ERROR SUMMARY| ran$|skipped' "$OUT/synccheck.log" | tr '\n' ' ')"
echo "goals table: ${goals_s}s; lstm/maml timing: ${extra_s}s; total ${SECONDS}s ($([ "$BUDGET" -gt 0 ] && echo "budget ${BUDGET}s" || echo "no budget"))"
[ -n "$CUT" ] && echo "cut short by the budget:$CUT"
[ -n "$SKIPPED" ] && echo "skipped for the budget:$SKIPPED"
tail -24 "$OUT/lstm_goals.log" 2>/dev/null
tail -36 "$OUT/mem_probe.log" 2>/dev/null
grep -vE "^$" "$OUT/lstm_ab.log" 2>/dev/null | tail -40
tail -8 "$OUT/lstm_timing.log" 2>/dev/null
grep -E "err vs loop|maml conv4|graph vs eager|capture|peak memory|vs float64" "$OUT/maml.log" 2>/dev/null
grep -E "^steps=" "$OUT/maml_front.log" 2>/dev/null
echo "bench:      rc=$bench_rc ${bench_s}s"
sed -n '/^$/,$p' "$OUT/bench.log"
# the logs as one file (the device tool brings back at most 8 files from $OUT)
(cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz ./* && find . -maxdepth 1 -type f ! -name logs.tgz -delete)
[ $tests_rc -eq 0 ] && [ $san_rc -eq 0 ] && [ $race_rc -eq 0 ] && [ $sync_rc -eq 0 ] && [ $bench_rc -eq 0 ]
