#!/usr/bin/env bash
# One GPU call: where does the Hopper backward's time go? Build, bwd-alone timings of the default
# and of the TACA_BWD_MODE diagnostics, then Nsight Compute on one FLUX-1024 backward main kernel
# (full set + per-SASS-instruction stall sampling) and on cuDNN's SDPA backward of the same shape.
#   run(command="bash benchmarks/gpu_bwd_profile_run.sh", carry=[".whl"], timeout_s=600)
# Env: PROF_KERNEL (ncu kernel regex, default taca_bwd_sm90), BWD_ENV (env assignments for the
# profiled run, e.g. "TACA_BWD_SM90_KERNEL=v6"), SKIP_CUDNN=1.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PROF_KERNEL=${PROF_KERNEL:-taca_bwd_sm90}
{
STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
t0=$SECONDS
env $BWD_ENV timeout 300 ncu --clock-control none --kernel-name "regex:$PROF_KERNEL" --launch-skip 1 --launch-count 1 \
  --set full --import-source no -f -o /tmp/bwd python3 benchmarks/bwd_profile_once.py > "$OUT/ncu_taca_run.txt" 2>&1
echo "ncu taca rc=$? ($((SECONDS - t0)) s)"
ncu --import /tmp/bwd.ncu-rep --page details > "$OUT/ncu_taca_details.txt" 2>&1
ncu --import /tmp/bwd.ncu-rep --page source --csv --print-source sass > /tmp/src.csv 2>"$OUT/ncu_src_err.txt"
echo "source csv rc=$? lines=$(wc -l < /tmp/src.csv)"; gzip -c /tmp/src.csv > "$OUT/ncu_taca_source.csv.gz"
if [ -z "$SKIP_CUDNN" ]; then
  t0=$SECONDS
  timeout 200 ncu --clock-control none --kernel-name regex:bprop --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats \
    --section Occupancy --section WarpStateStats --section SchedulerStats -f -o /tmp/cudnn python3 -c "
import torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
q, k, v = (torch.randn(1, 24, 4608, 128, device='cuda', dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    for _ in range(2):
        o = F.scaled_dot_product_attention(q, k, v); o.backward(torch.randn_like(o))
torch.cuda.synchronize()" > "$OUT/ncu_cudnn_run.txt" 2>&1
  echo "ncu cudnn rc=$? ($((SECONDS - t0)) s)"
  ncu --import /tmp/cudnn.ncu-rep --page details > "$OUT/ncu_cudnn_details.txt" 2>&1
fi
for f in "$OUT"/ncu_*_details.txt; do echo "== $f"; grep -E "^  [a-zA-Z]|Duration|Throughput|Registers|Issue Slots|Executed Ipc|Warp Cycles Per Issued|Shared Memory|Block Size|Grid Size|Pipe|smsp__" "$f" | grep -vE "^    ---" | head -60; done
} 2>&1 | tee "$OUT/log.txt"
