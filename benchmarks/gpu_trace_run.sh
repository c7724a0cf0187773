#!/usr/bin/env bash
# One GPU call: the v6 backward's per-CTA trace (benchmarks/bwd_trace.py) in a diagnostic build
# (TACA_NVCC_EXTRA=-DTACA_BWD_TRACE=1; the default build has no trace code). Run from the repo root:
#   run(command="bash benchmarks/gpu_trace_run.sh", carry=[".whl"], timeout_s=600)
# Env: SHAPES, MODES, REPS (bwd_trace.py's arguments), OUT; BENCH="<bench_bwd_handoff.py modes>" also
# builds the normal extension (in /tmp/normal, beside the trace build) and times those modes there on
# BENCH_SHAPES (default flux1024_b1,flux1024_b2), 3 interleaved rounds.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
nvidia-smi -L
t0=$SECONDS
rm -rf build taca/_C.*.so taca/_numpy_C.*.so
jobs=16
if [ -n "$BENCH" ]; then
  jobs=8; rm -rf /tmp/normal && cp -r . /tmp/normal
  (cd /tmp/normal && TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=8 python3 setup.py build_clib build_ext --inplace \
    > "$OUT/build_normal.txt" 2>&1; echo "normal build rc=$? ($((SECONDS - t0)) s)") &
fi
TACA_NVCC_EXTRA=-DTACA_BWD_TRACE=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=$jobs python3 setup.py build_clib build_ext --inplace \
  > "$OUT/build_trace.txt" 2>&1
echo "trace build rc=$? ($((SECONDS - t0)) s)"
wait
timeout 300 python3 benchmarks/bwd_trace.py --shapes "${SHAPES:-flux1024_b1,flux1024_b2,sd35m_cfg}" \
  --modes "${MODES:-det,nd,as,racy,det@s2,det@s8}" --reps "${REPS:-3}" --out "$OUT" 2>&1 | grep -v Warning
echo "trace rc=$?"
if [ -n "$BENCH" ]; then
  (cd /tmp/normal && timeout 300 python3 benchmarks/bench_bwd_handoff.py --rounds 3 --modes "$BENCH" \
    --shapes "${BENCH_SHAPES:-flux1024_b1,flux1024_b2}" --out "$OUT/bench" 2>&1 | grep -v Warning | tail -6)
fi
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
