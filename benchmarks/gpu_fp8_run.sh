#!/usr/bin/env bash
# Run: run(command="bash benchmarks/gpu_fp8_run.sh", carry=[".whl"]); files under $OUT.
# The opt-in FP8 forward: build (sm_90a), its tests (and the fp8 CPU-side tests), memcheck + racecheck over
# sanitize_fp8.py, then bench_fp8.py (speed against the 16-bit kernel and cuDNN, error). Env: STEPS (default
# "build test sanitize bench"), BENCH_ARGS (extra bench_fp8.py arguments), PIPELINE=1 adds the FLUX.1-dev-sized
# transformer call with FP8 attention (bench_pipeline.py --fp8).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build test sanitize bench"}  # also: diag (benchmarks/fp8_diag.py)
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
{
has build && STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so
if has diag; then
  timeout 120 python3 benchmarks/fp8_diag.py > "$OUT/diag.txt" 2>&1; echo "diag rc=$?"; cat "$OUT/diag.txt" | tail -30
fi
if has test; then
  timeout 240 python3 -m pytest -q tests/test_cuda_fp8.py tests/test_fp8.py > "$OUT/pytest.txt" 2>&1; tail -1 "$OUT/pytest.txt"
  grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/pytest.txt" | head -12
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool $tool --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fp8.py \
      > "$OUT/$tool.txt" 2>&1
    echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|calls done' "$OUT/$tool.txt" | tr '\n' ' ')"
  done
fi
if has bench; then
  timeout 300 python3 benchmarks/bench_fp8.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench_fp8.txt" 2>&1
  echo "bench rc=$?"; grep -vE "^\s*$" "$OUT/bench_fp8.txt" | tail -22
fi
if [ "${PIPELINE:-0}" = 1 ]; then
  timeout 220 python3 benchmarks/bench_pipeline.py --models flux --repeats 8 --schedule-repeats 1 --fp8 \
    --out "$OUT/pipeline" > "$OUT/pipeline.txt" 2>&1; echo "pipeline rc=$?"; tail -8 "$OUT/pipeline.txt"
fi
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
