#!/usr/bin/env bash
# One device call (~4 min with the build): Nsight Compute (full set) on every kernel of one taca fwd + bwd and one
# plain cuDNN fwd + bwd at FLUX 1024 and FLUX 2048 (benchmarks/profile_long.py), and a per-kernel summary table
# (tools/ncu_kernel_table.py): why the D = 128 ratios to cuDNN fall with the sequence length.
#   run(command="bash benchmarks/gpu_long_profile.sh", carry=[".whl"])
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
source benchmarks/gpu_build.sh
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
t0=$SECONDS
timeout 300 ncu --clock-control none --profile-from-start off --set full --import-source no -f -o /tmp/prof_long \
  python3 benchmarks/profile_long.py > "$OUT/ncu_run.txt" 2>&1
echo "ncu rc=$? ($((SECONDS - t0)) s)"; grep -E "profiled|ERROR|rror" "$OUT/ncu_run.txt" | head
ncu --import /tmp/prof_long.ncu-rep --page raw --csv > /tmp/raw.csv 2>/dev/null; gzip -c /tmp/raw.csv > "$OUT/ncu_raw.csv.gz"
ncu --import /tmp/prof_long.ncu-rep --page details > "$OUT/ncu_details.txt" 2>&1
python3 tools/ncu_kernel_table.py /tmp/raw.csv | tee "$OUT/table.md"
} 2>&1 | tee "$OUT/log.txt"
