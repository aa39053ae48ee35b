#!/usr/bin/env bash
# One time-boxed pass on a GPU machine: build the CUDA extension, run the tests that touch the GPU, benchmark.
#
#   make gpu-check PYTHON=python3                       # everything, in this order, within GPU_CHECK_BUDGET_S
#   GPU_CHECK_STAGES="build bench" BENCH_ARGS="--only spherical_ce" make gpu-check PYTHON=python3
#
# Peers (Liger-Kernel, cut-cross-entropy) are not on the GPU image: run `make gpu-wheels` on a machine with a
# registry first and carry .whl with the device call; they are installed into /tmp/etfkern-peers here.
#
# Stages (GPU_CHECK_STAGES, default "build tests bench"):
#   build   pip install -e . with CUDA (TORCH_CUDA_ARCH_LIST defaults to the visible GPU's arch only: faster)
#   tests   pytest on every test whose id names cuda or that is marked gpu, then (time permitting) the rest
#   bench   bench/run_all.py $BENCH_ARGS (default --quick), result JSON + REPORT.md
# Each stage gets what is left of GPU_CHECK_BUDGET_S (default 540 s, one device call is 600 s at most) and is
# killed at that point; the log and whatever results exist are copied to $GPU_CHECK_OUT (default $OUT, else
# bench/results/gpu-check) so that a stage cut short still reports.
set -uo pipefail
PY=${PYTHON:-python3}
STAGES=${GPU_CHECK_STAGES:-build tests bench}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
DEST=${GPU_CHECK_OUT:-${OUT:-bench/results/gpu-check}}
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
START=$(date +%s)
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
stage() {  # stage NAME CMD...: run with the remaining budget, log everything, never abort the script
  local name=$1; shift
  local t=$(left)
  if (( t < 20 )); then echo "== $name: skipped, budget spent" | tee -a "$LOG"; return 1; fi
  echo "== $name (budget ${t}s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$t" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
  return "$rc"
}

{
  echo "== environment"; date -u; git rev-parse --short=12 HEAD 2>/dev/null; nvidia-smi 2>&1 | head -15
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
} 2>&1 | tee "$LOG"

# Benchmark peers carried as wheels (make gpu-wheels here, carry .whl): installed outside the image's packages.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/etfkern-peers \
    .whl/*.whl 2>&1 | tee -a "$LOG" && export PYTHONPATH="/tmp/etfkern-peers${PYTHONPATH:+:$PYTHONPATH}"
  echo "== peers from .whl: $(ls .whl | tr '\n' ' ')" | tee -a "$LOG"
fi

ARCH=$("$PY" -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}' + ('a' if p[0] == 9 else ''))" 2>/dev/null || echo "8.0;9.0a")
for s in $STAGES; do
  case $s in
    build)
      stage build env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$PY" -m pip install -q --no-build-isolation --no-deps -e . &&
      stage info "$PY" -m etfkern info ;;
    tests)
      stage gpu-tests "$PY" -m pytest -q -p no:cacheprovider -rs --timeout 300 -k "cuda or gpu" \
        --junitxml="$DEST/junit_gpu.xml" tests
      stage other-tests "$PY" -m pytest -q -p no:cacheprovider -x --timeout 300 -k "not cuda and not gpu" \
        -n "${PYTEST_WORKERS:-8}" --dist loadfile tests ;;
    bench)
      stage bench "$PY" bench/run_all.py ${BENCH_ARGS:---quick} --out "$DEST/run_all.json" \
        --report "$DEST/REPORT.md" ;;
    *) echo "unknown stage $s" | tee -a "$LOG" ;;
  esac
done
echo "== done in $(( $(date +%s) - START ))s; outputs in $DEST" | tee -a "$LOG"
