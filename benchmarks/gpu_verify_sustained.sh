#!/usr/bin/env bash
# One device call (~6-8 min with the build): the tree after the CTA pairs' drop verified on a GPU (the CUDA test files,
# compute-sanitizer memcheck + racecheck of sanitize_fwd.py, forward and backward calls), then every PERFORMANCE.md shape under sustained
# load (bench_sustained.py: 3 s per phase, 2 rotated rounds; fwd, fwd+bwd, unordered fwd+bwd, the forward without its
# tail split, each against cuDNN, with SM clock, power and energy per iteration), then the isolated table
# (bench_attention_gpu.py) in the same call for the comparison. On an H200 this is the first sustained measurement
# there (its power cap and clocks differ from the H100's; KERNEL_LOG, twenty-eighth session).
#   run(command="bash benchmarks/gpu_verify_sustained.sh", carry=[".whl"])
# Env: SKIP_TESTS=1 (timing only), SECONDS_PER_PHASE (3), OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
source benchmarks/gpu_build.sh
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site:$PWD/tests/cuda_harness PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L; nvidia-smi --query-gpu=power.limit,clocks.max.sm --format=csv,noheader
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 240 python3 -m pytest -q tests/test_cuda.py tests/test_cuda_bwd.py tests/test_cuda_features.py \
    > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?: $(tail -1 "$OUT/pytest.txt")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -12
  source benchmarks/gpu_sanitize.sh
  sanitize tests/cuda_harness/sanitize_fwd.py taca_ all 200  # (its calls run the forward and the backward)
fi
timeout 330 python3 benchmarks/bench_sustained.py --shapes flux1024_b1,flux1024_b2,sd35l_cfg,sd35m_cfg,flux2048_b1 \
  --extra --seconds "${SECONDS_PER_PHASE:-3}" --rounds 2 --out "$OUT" > "$OUT/sustained.txt" 2>&1
echo "sustained rc=$?"; grep -E "^\||^GPU" "$OUT/sustained.txt"
timeout 150 python3 benchmarks/bench_attention_gpu.py --methods taca --out "$OUT" --tag iso > "$OUT/iso.txt" 2>&1
echo "isolated rc=$?"; grep "^|" "$OUT/iso.txt" | grep -v "plain_eff\|flash2" | cut -c1-160
} 2>&1 | tee "$OUT/log.txt"
