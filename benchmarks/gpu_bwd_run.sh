#!/usr/bin/env bash
# gpu_bwd_run.sh: the backward helper's device script. Builds the extension and the
# standalone harness, checks the CUDA backward (harness vs a float64 CPU reference,
# compute-sanitizer memcheck + racecheck, pytest), then times it. Run from the repo root:
#   bash benchmarks/gpu_bwd_run.sh [stages]   stages: comma list of build,harness,sanitize,test,bench,ncu
# (default all); BENCH_SHAPES=flux1024_b1,sd35m_cfg,... picks the timed shapes. Logs go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
STAGES=${1:-build,harness,sanitize,test,bench}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
rc=0
if has harness || has sanitize; then
  (
    gcc -O2 -std=c99 -Icsrc -c csrc/taca_common.c -o /tmp/taca_common.o
    objs=""
    for f in tests/cuda_harness/bwd_check.cu csrc/cuda/taca_bwd*.cu; do
      o=/tmp/$(basename "$f" .cu).o; objs="$objs $o"
      nvcc -std=c++17 -O3 -lineinfo -Icsrc -Icsrc/cuda -gencode=arch=compute_90a,code=sm_90a -c "$f" -o "$o" &
    done
    wait
    nvcc -gencode=arch=compute_90a,code=sm_90a $objs /tmp/taca_common.o -o /tmp/bwd_check
  ) > "$OUT/harness_build.txt" 2>&1 &
  hpid=$!
fi
if has build; then
  t0=$(date +%s)
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e . \
    > "$OUT/build.txt" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.txt"; rc=1; }
  echo "build: $(( $(date +%s) - t0 )) s"
fi
if [[ -n "${hpid:-}" ]]; then
  wait $hpid || { echo "HARNESS BUILD FAILED"; tail -30 "$OUT/harness_build.txt"; }
fi
if has harness && [[ -x /tmp/bwd_check ]]; then
  /tmp/bwd_check 2>&1 | tee "$OUT/harness.txt" || rc=1
fi
if has sanitize && [[ -x /tmp/bwd_check ]]; then
  compute-sanitizer --tool memcheck --error-exitcode 3 /tmp/bwd_check --quick > "$OUT/memcheck.txt" 2>&1
  echo "memcheck rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.txt")"
  compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 3 /tmp/bwd_check --quick > "$OUT/racecheck.txt" 2>&1
  echo "racecheck rc=$? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/racecheck.txt")"
fi
if has test; then
  python3 -m pytest -q -x tests/test_cuda_bwd.py 2>&1 | tail -25 | tee "$OUT/pytest.txt" || rc=1
fi
if has bench; then
  python3 benchmarks/bench_cuda_bwd.py --shapes "${BENCH_SHAPES:-flux1024_b1,sd35m_cfg}" --out "$OUT" --modes "${BENCH_MODES:-}" \
    > "$OUT/bench_log.txt" 2>&1 || { rc=1; tail -30 "$OUT/bench_log.txt"; }
  cat "$OUT/bench_bwd.md" 2>/dev/null
fi
if has ncu; then
  for shape in d128 d64; do
    ncu --kernel-name regex:bwd_main --launch-skip 1 --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      python3 benchmarks/bwd_profile_once.py $shape > "$OUT/ncu_$shape.txt" 2>&1
    echo "ncu $shape rc=$?"
  done
fi
exit $rc
