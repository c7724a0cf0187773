#!/usr/bin/env bash
# One device call (~5 min with the build): where the D = 128 forward loses its cycles against cuDNN's. Nsight Compute
# (full set, per-SASS stall samples) on one forward each at FLUX 2048 (16896 tokens): taca's default (no
# intra-warpgroup overlap above 15360 keys), taca with the overlap (TACA_FWD_OVERLAP=1), plain cuDNN; and at FLUX 1024
# (4608): taca's default (the overlap) and cuDNN. Per kernel: tools/ncu_kernel_table.py; per opcode:
# tools/ncu_sass_ops.py; taca's loop by phase: tools/ncu_sass_phases.py. Then STEPS' "train": the FLUX.1-dev-sized
# training step, stock vs taca (bench_train_step.py).
#   run(command="bash benchmarks/gpu_fwd_profile.sh", carry=[".whl"])
# Env: STEPS (default "build ncu train"), OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build ncu train"}
has() { [[ " $STEPS " == *" $1 "* ]]; }
{
if has build; then source benchmarks/gpu_build.sh; fi
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
if has ncu; then
  prof() {  # name, N, overlap (""/0/1), argument
    local t0=$SECONDS
    env ${3:+TACA_FWD_OVERLAP=$3} TACA_PROF_N=$2 timeout 150 ncu --clock-control none --nvtx --nvtx-include "prof/" \
      --kernel-name regex:"taca_fwd|sdpa|fprop|fmha" --launch-count 1 --set full --import-source no -f -o /tmp/p_$1 \
      python3 benchmarks/fwd_profile_once.py $4 > /tmp/p_$1.txt 2>&1
    echo "ncu $1 rc=$? ($((SECONDS - t0)) s)"; grep -E "ERROR|rror" /tmp/p_$1.txt | head -3
    ncu --import /tmp/p_$1.ncu-rep --page raw --csv > /tmp/raw_$1.csv 2>/dev/null
    ncu --import /tmp/p_$1.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip -c > "$OUT/sass_$1.csv.gz"
    python3 tools/ncu_sass_ops.py "$OUT/sass_$1.csv.gz" > "$OUT/ops_$1.txt" 2>&1
  }
  prof t2048 16896 "" 0
  prof t2048ov 16896 1 0
  prof c2048 16896 "" cudnn
  prof t1024 4608 "" 0
  prof c1024 4608 "" cudnn
  for n in t1024 c1024 t2048 t2048ov c2048; do
    gzip -c /tmp/raw_$n.csv > "$OUT/raw_$n.csv.gz"
    python3 tools/ncu_kernel_table.py /tmp/raw_$n.csv | sed "s/^| void /| $n /; s/^| cudnn_/| $n cudnn_/"
  done | awk 'NR <= 2 || !/^\| kernel |^\|---/' | tee "$OUT/table.md"
  for n in t2048 t2048ov t1024; do python3 tools/ncu_sass_phases.py "$OUT/sass_$n.csv.gz" > "$OUT/phases_$n.md" 2>&1; done
  head -4 "$OUT"/ops_*.txt
fi
if has train; then
  timeout 150 python3 benchmarks/bench_train_step.py --models flux --batches 1 --methods stock,taca --out "$OUT" \
    > "$OUT/train_flux.txt" 2>&1; echo "train flux rc=$?"; grep "^|" "$OUT/train_flux.txt"
fi
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
