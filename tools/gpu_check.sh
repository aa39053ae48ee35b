#!/usr/bin/env bash
# One time-boxed run on a GPU machine, under 9 minutes in all: environment + CUDA build (fails fast), the GPU
# tests, the benchmark sweeps of each family; everything packed into ONE archive, a summary at the end of stdout.
#
#   bash tools/gpu_check.sh                      # on the GPU machine (or: make gpu-check PYTHON=python3)
#   GPU_CHECK_DRY_RUN=1 bash tools/gpu_check.sh  # the same script on CPU in a few minutes: existing build checked,
#                                                # CPU tests selected the same way, every family at --quick on cpu
#
# Stages (each time-boxed; a box never runs past what is left of GPU_CHECK_BUDGET_S, default 540 s, less 15 s
# kept for the report and the archive; typical: environment 10 s, build 40 s, tests 120 s, benchmarks 345 s):
#   1 environment  nvidia-smi, nvcc, python/torch/triton/setuptools versions; stops here without a GPU
#     peers        .whl/*.whl (made by `make gpu-wheels`, carried with the device call) installed into
#                  /tmp/etfkern-peers (--no-index --target: never into the image's packages)
#     build        pip install --no-build-isolation -e . with CUDA, TORCH_CUDA_ARCH_LIST=9.0a, MAX_JOBS=16
#                  (GPU_CHECK_BOX_BUILD=180 s); a failed build or a build without CUDA kernels stops the run
#   2 tests        pytest -k "(cuda or gpu) and not cuda_build" -n 6 --dist loadfile, junit_gpu.xml
#                  (GPU_CHECK_BOX_TESTS=120 s; GPU_CHECK_TEST_WORKERS, GPU_CHECK_PYTEST_ARGS)
#   3 bench-*      python bench/run_all.py --only <family> --device cuda per family, full sizes:
#                  spherical 180 s, collapse 60 s, msam 45 s, banks 60 s (GPU_CHECK_BOX_<FAMILY>;
#                  GPU_CHECK_FAMILIES="spherical collapse msam banks"); a family cut short is recorded as such;
#                  ETFKERN_BENCH_DEADLINE (Unix time, box end - 15 s) lets a sweep stop in time on its own
#     report       the families merged into run_all.json + REPORT.md + charts/ (bench/run_all.py --merge)
# Output: $GPU_CHECK_OUT (default $OUT, else bench/results/gpu-check) gets gpu_check.tar.gz (< 16 MiB: the
# folder gpu_check/ with gpu_check.log, environment.txt, stages.tsv, junit_gpu.xml, bench/<family>.json,
# run_all.json, REPORT.md, charts/, summary.txt, dispatch/<family>-dispatch.json: the dispatch data a full GPU
# sweep wrote, to commit under bench/results/) and summary.txt. Exit 0 only if every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
RESERVE=15  # seconds kept for the report, the summary and the archive
DEST=${GPU_CHECK_OUT:-${OUT:-bench/results/gpu-check}}
FAMILIES=${GPU_CHECK_FAMILIES:-spherical collapse msam banks}
WORK_PARENT=$(mktemp -d "${TMPDIR:-/tmp}/etfkern-gpu-check.XXXXXX")
WORK=$WORK_PARENT/gpu_check
LOG=$WORK/gpu_check.log
START=$(date +%s)
mkdir -p "$WORK/bench" "$DEST" || exit 2
: > "$WORK/stages.tsv"
touch "$WORK_PARENT/started"  # files newer than this were written by this run
export PYTHONUNBUFFERED=1
if [[ $DRY == 1 ]]; then
  DEVICE=cpu; SIZE=--quick; WORKERS=${GPU_CHECK_TEST_WORKERS:-2}
  BUILD_CMD=${GPU_CHECK_BUILD_CMD:-"$PY -c 'import etfkern; assert etfkern._C is not None, etfkern._C_ERROR'"}
else
  DEVICE=cuda; SIZE=""; WORKERS=${GPU_CHECK_TEST_WORKERS:-6}
  BUILD_CMD=${GPU_CHECK_BUILD_CMD:-"env TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -e ."}
fi

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - RESERVE - ($(date +%s) - START) )); }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$WORK/stages.tsv"; }
# stage NAME BOX CMD...: runs CMD for at most min(BOX, what is left) seconds (SIGINT, then KILL 10 s later),
# output to stdout and the log; records name, exit code (124: time box), seconds in stages.tsv.
stage() {
  local name=$1 box=$2; shift 2
  local t; t=$(left)
  (( box < t )) && t=$box
  if (( t < 10 )); then say "== $name: skipped, budget spent"; record "$name" skipped 0 "budget spent"; return 125; fi
  say "== $name (at most ${t}s): $*"
  local t0; t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$t" "$@" 2>&1 | tee -a "$LOG" "$WORK/stage-$name.log"
  local rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t0 ))
  say "== $name: rc=$rc in ${took}s"
  record "$name" "$rc" "$took" "$( (( rc == 124 )) && echo "time box of ${t}s" )"
  return "$rc"
}
finish() {  # report, summary, archive; exit with $1
  local code=$1
  if compgen -G "$WORK/bench/*.json" > /dev/null; then
    # exit 1/130 only say that a family failed or was cut short; the report exists all the same
    "$PY" bench/run_all.py --merge "$WORK"/bench/*.json --out "$WORK/run_all.json" --report "$WORK/REPORT.md" \
      --no-tables >> "$LOG" 2>&1
    [[ -f $WORK/REPORT.md ]] || say "report: bench/run_all.py --merge wrote no report (see the log)"
  fi
  # the dispatch data the sweeps wrote into the checkout (etfkern/_core/dispatch.py loads these files once committed)
  mkdir -p "$WORK/dispatch"
  for f in bench/results/*-dispatch.json; do
    [[ -f $f && $f -nt "$WORK_PARENT/started" ]] && cp "$f" "$WORK/dispatch/"
  done
  record total "$code" $(( $(date +%s) - START ))
  "$PY" tools/gpu_summary.py "$WORK" | tee -a "$LOG"
  tar -C "$WORK_PARENT" -czf "$DEST/gpu_check.tar.gz" gpu_check
  if (( $(stat -c %s "$DEST/gpu_check.tar.gz") > 15 * 1024 * 1024 )); then  # 16 MiB per file comes back
    tail -c 4000000 "$LOG" > "$LOG.tail" && mv "$LOG.tail" "$LOG"
    tar -C "$WORK_PARENT" -czf "$DEST/gpu_check.tar.gz" gpu_check
  fi
  cp "$WORK/summary.txt" "$DEST/summary.txt" 2>/dev/null
  echo "archive: $DEST/gpu_check.tar.gz ($(du -h "$DEST/gpu_check.tar.gz" | cut -f1)); exit $code; $(( $(date +%s) - START ))s in all"
  rm -rf "$WORK_PARENT"
  exit "$code"
}

# ---- 1. environment, peers, build ------------------------------------------------------------------------------
{
  echo "== environment ($([[ $DRY == 1 ]] && echo 'DRY RUN on CPU' || echo GPU run))"; date -u
  echo "git $(git rev-parse --short=12 HEAD 2>/dev/null), $(git status --porcelain 2>/dev/null | wc -l) changed files"
  if command -v nvidia-smi > /dev/null; then nvidia-smi 2>&1 | head -20; else echo "nvidia-smi: not found"; fi
  if command -v nvcc > /dev/null; then nvcc --version | tail -2; else echo "nvcc: not found"; fi
  echo "cpus $(nproc), $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
  "$PY" -c "
import sys, torch, setuptools
print('python', sys.version.split()[0], sys.executable)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'setuptools', setuptools.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', p.name, f'sm_{p.major}{p.minor}', p.multi_processor_count, 'SMs', round(p.total_memory / 2**30), 'GiB')
else:
    print('gpu: none visible to torch')"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
} 2>&1 | tee "$WORK/environment.txt" | tee -a "$LOG"
if [[ $DRY != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "== environment: torch sees no GPU; stopping (GPU_CHECK_DRY_RUN=1 runs this script on CPU)"
  record environment 1 0 "no GPU"; finish 1
fi
record environment 0 $(( $(date +%s) - START ))

if compgen -G ".whl/*.whl" > /dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/etfkern-peers \
      .whl/*.whl >> "$LOG" 2>&1; then
    export PYTHONPATH="/tmp/etfkern-peers${PYTHONPATH:+:$PYTHONPATH}"
    record peers 0 0 "$(cd .whl && ls *.whl | tr '\n' ' ')"
  else
    record peers 1 0 "pip could not install .whl/*.whl (see the log); peers skipped"
  fi
else
  record peers skipped 0 "no .whl/ (run make gpu-wheels here and carry .whl): Liger / cut-cross-entropy not measured"
fi

stage build "${GPU_CHECK_BOX_BUILD:-180}" bash -c "$BUILD_CMD" || { say "== build failed: stopping"; finish 1; }
want_cuda=$([[ $DRY == 1 ]] && echo False || echo True)
stage build-check 60 "$PY" -c "
import etfkern, json
info = etfkern.build_info()
print(json.dumps(info))
assert info['compiled'], 'etfkern._C did not load: ' + str(info.get('compiled_error'))
assert info['cuda'] or not $want_cuda, 'the build has no CUDA kernels (nvcc or CUDA torch not found?)'
" || { say "== build check failed: stopping"; finish 1; }
"$PY" -m etfkern info 2>&1 | tee -a "$LOG"

# ---- 2. GPU tests -----------------------------------------------------------------------------------------------
failed=0
# shellcheck disable=SC2086
stage tests "${GPU_CHECK_BOX_TESTS:-120}" "$PY" -m pytest -q -p no:cacheprovider -rfE --timeout 120 \
  -k "(cuda or gpu) and not cuda_build" -n "$WORKERS" --dist loadfile --junitxml="$WORK/junit_gpu.xml" \
  ${GPU_CHECK_PYTEST_ARGS:-} tests || failed=1

# ---- 3. benchmarks, one time box per family ----------------------------------------------------------------------
declare -A BOX=([spherical]=180 [collapse]=60 [msam]=45 [banks]=60)
for family in $FAMILIES; do
  var="GPU_CHECK_BOX_${family^^}"
  box=${!var:-${BOX[$family]:-60}}
  (( box <= $(left) )) || box=$(left)  # the deadline below must be the box the stage really gets
  # a sweep may read the end of its box (bench/_common.py seconds_left) and stop early with the rows it has
  export ETFKERN_BENCH_DEADLINE=$(( $(date +%s) + box - 15 ))
  # shellcheck disable=SC2086
  stage "bench-$family" "$box" "$PY" bench/run_all.py --only "$family" --device "$DEVICE" \
    $SIZE --out "$WORK/bench/$family.json" --report "$WORK/bench/$family.md" || failed=1
done
finish "$failed"
