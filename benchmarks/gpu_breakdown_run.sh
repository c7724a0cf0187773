#!/usr/bin/env bash
# One GPU call: where the backward's time goes, taca against cuDNN. Build; per-kernel device times of a
# fwd + bwd iteration (bwd_breakdown.py: taca deterministic / not, plain cuDNN); the backward alone with
# 1..6 deterministic dQ chains (TACA_BWD_NSEG); Nsight Compute (full set) on every kernel of one plain
# cuDNN fwd + bwd iteration and on taca's v6 backward main kernel (FLUX 1024 b1 shape).
#   run(command="bash benchmarks/gpu_breakdown_run.sh", carry=[".whl"], timeout_s=600)
# Env: STEPS (default "build breakdown nseg ncu"), OUT, PROFILE_SHAPE ("d64": the ncu step at SD3.5-M CFG, D = 64,
# bwd_profile_once.py's other shape).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build breakdown nseg ncu"}
has() { [[ " $STEPS " == *" $1 "* ]]; }
{
if has build; then STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"; fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so
if has breakdown; then timeout 150 python3 benchmarks/bwd_breakdown.py --out "$OUT" > "$OUT/breakdown.txt" 2>&1; echo "breakdown rc=$?"; fi
if has nseg; then
  timeout 200 python3 benchmarks/bench_bwd_handoff.py --rounds 3 --modes "v6,v6@s1,v6@s2,v6@s3,v6@s6,v6+nd" --out "$OUT" 2>&1 | tail -4 > /tmp/nseg.txt
fi
if has ncu; then
  t0=$SECONDS
  timeout 150 ncu --clock-control none --profile-from-start off --set full --import-source no -f -o /tmp/prof_cudnn \
    python3 benchmarks/bwd_profile_once.py cudnn ${PROFILE_SHAPE:-} > /tmp/ncu_cudnn_run.txt 2>&1
  echo "ncu cudnn rc=$? ($((SECONDS - t0)) s)"; tail -3 /tmp/ncu_cudnn_run.txt
  ncu --import /tmp/prof_cudnn.ncu-rep --page details > "$OUT/ncu_cudnn_details.txt" 2>&1
  # cuDNN's kernels: instruction counts per opcode only (tools/ncu_sass_ops.py), not their SASS
  ncu --import /tmp/prof_cudnn.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip -c > /tmp/ncu_cudnn_sass.csv.gz
  python3 tools/ncu_sass_ops.py /tmp/ncu_cudnn_sass.csv.gz > "$OUT/ncu_cudnn_ops.txt"
  t0=$SECONDS
  timeout 120 ncu --clock-control none --kernel-name regex:taca_bwd_sm90 --launch-skip 1 --launch-count 1 \
    --set full --import-source no -f -o /tmp/prof_v6 python3 benchmarks/bwd_profile_once.py ${PROFILE_SHAPE:-} > /tmp/ncu_v6_run.txt 2>&1
  echo "ncu v6 rc=$? ($((SECONDS - t0)) s)"
  ncu --import /tmp/prof_v6.ncu-rep --page details > "$OUT/ncu_v6_details.txt" 2>&1
  ncu --import /tmp/prof_v6.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip -c > "$OUT/ncu_v6_sass.csv.gz"
  python3 tools/ncu_sass_ops.py "$OUT/ncu_v6_sass.csv.gz" > "$OUT/ncu_v6_ops.txt"
  grep -E "^  [a-zA-Z_].*\(|Duration|Registers Per|Block Size|Grid Size|Dynamic Shared|Issue Slots Busy|No Eligible" "$OUT/ncu_cudnn_details.txt" "$OUT/ncu_v6_details.txt" | head -60
fi
cat "$OUT/breakdown.txt" /tmp/nseg.txt 2>/dev/null
} 2>&1 | tee "$OUT/log.txt"
