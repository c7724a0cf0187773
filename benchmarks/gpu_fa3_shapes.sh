#!/usr/bin/env bash
# One GPU call: the kernels at FlashAttention-3's own benchmark shapes (bench_attention_gpu.py's fa3_d{64,128}_{4,8,16}k:
# hidden 2048, 16k tokens a batch, 512 of them text), so its published H100 rates compare with ours shape for shape:
# build, the table (taca against plain cuDNN / FA2 / efficient, three rotated rounds) and the backward alone
# (bench_bwd_handoff.py: deterministic and not). Run from the repo root with .whl carried:
#   run(command="bash benchmarks/gpu_fa3_shapes.sh", carry=[".whl"], timeout_s=600)
# Env: STEPS (default "build table bwd"), SHAPES (default all six), OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build table bwd"}
SHAPES=${SHAPES:-fa3_d64_4k,fa3_d64_8k,fa3_d64_16k,fa3_d128_4k,fa3_d128_8k,fa3_d128_16k}
has() { [[ " $STEPS " == *" $1 "* ]]; }
{
if has build; then STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda|GPU|torch"; fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so
if has table; then
  t0=$SECONDS
  timeout 330 python3 benchmarks/bench_attention_gpu.py --rounds 3 --shapes "$SHAPES" --methods 'taca_cuda$' \
    --out "$OUT" --tag _fa3 > "$OUT/table.txt" 2>&1
  echo "table rc=$? ($((SECONDS - t0)) s)"
fi
if has bwd; then
  t0=$SECONDS
  timeout 200 python3 benchmarks/bench_bwd_handoff.py --rounds 3 --modes "v6,v6+nd" --shapes "$SHAPES" --out "$OUT" \
    > "$OUT/bwd.txt" 2>&1
  echo "bwd rc=$? ($((SECONDS - t0)) s)"
fi
grep "^| fa3" "$OUT/table.txt" | cut -d'|' -f2-9; tail -8 "$OUT/bwd.txt"
} 2>&1 | tee "$OUT/log.txt"
