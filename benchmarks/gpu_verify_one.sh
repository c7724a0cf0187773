#!/usr/bin/env bash
# One device call that verifies the working tree's kernels with a single build (no A/B base build): build (reused on
# a warm machine), the CUDA tests, memcheck + racecheck of sanitize_fwd.py, then timing switches of that build: the
# backward alone one mode per process (gpu_modes_xproc.sh, with MODES / SHAPES / ROUNDS; skipped without MODES) and,
# with SUS_NSEG, sustained fwd+bwd phases against cuDNN with TACA_BWD_NSEG forced (bench_sustained.py --nseg, on
# SHAPES). Each step is skipped when less than it needs is left of LIMIT seconds. Written for the thirty-second
# session's chain rule (one build instead of gpu_next_run.sh's two: the base side of that A/B was measured three
# times already); gpu_next_run.sh runs it without MODES for its tests step.
# PYTEST_K: a pytest -k expression for the CUDA tests; SAN_LAST=1: the sanitizers after the timing, with 200 s
# kept for them (a short call's timing first).
#   run(command="LIMIT=420 MODES=v6,v6@s4 SHAPES=flux1024_b2,flux1024_b1 SUS_NSEG=4 bash benchmarks/gpu_verify_one.sh",
#       carry=[".whl"], timeout_s=440)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LIMIT=${LIMIT:-420}
left() { echo $((LIMIT - SECONDS)); }
{
source benchmarks/gpu_build.sh
nvidia-smi -L; echo "built at $SECONDS s"
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site:$PWD/tests/cuda_harness PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 150 python3 -m pytest -q -rs tests/test_cuda_bwd.py tests/test_cuda_features.py tests/test_cuda.py ${PYTEST_K:+-k "$PYTEST_K"} > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?: $(tail -1 "$OUT/pytest.txt")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -8
# racecheck of sanitize_fwd.py took 77-93 s on an H100 and ran past 110 s on an H200 (thirty-seventh session);
# SAN_LAST=1 runs the sanitizers after the timing (when a call's device time is short, the timing comes first)
san() { if [ "$(left)" -gt 200 ]; then source benchmarks/gpu_sanitize.sh; (export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so; sanitize tests/cuda_harness/sanitize_fwd.py taca_ all 170); else echo "sanitizers skipped: $(left) s left"; fi; }
[ -z "${SAN_LAST:-}" ] && san
echo "tests done at $SECONDS s"
unset TACA_CUDA_LIB; export PYTHONPATH=/tmp/site
if [ -n "${SUS_NSEG:-}" ] && [ "$(left)" -gt 60 ]; then
  for s in ${SHAPES//,/ }; do
    timeout 60 python3 benchmarks/bench_sustained.py --shapes "$s" --nseg "$SUS_NSEG" --seconds 3 --rounds 2 \
      --only "taca f+b,cudnn f+b,taca f+b nseg$SUS_NSEG" --out "$OUT/sus_$s" 2>&1 | grep "^|" | tail -8
  done
fi
keep=10; [ -n "${SAN_LAST:-}" ] && keep=210  # seconds kept after the timing (SAN_LAST: for the sanitizers)
t=$(( $(left) - keep ))
[ -n "${MODES:-}" ] && [ "$t" -gt 40 ] && BUILD=0 OUT=$OUT/xproc timeout "$t" bash benchmarks/gpu_modes_xproc.sh 2>&1 | tail -12
[ -n "${SAN_LAST:-}" ] && san
echo "all done at $SECONDS s"
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT" 2>/dev/null; true
