#!/usr/bin/env bash
# One device call (about 8 min): variant 17 (three consumer warpgroups at D = 64) and the FP8 tidy host code, first
# run. Build; the forward, feature and FP8 CUDA tests; memcheck + racecheck of the forward and FP8 harnesses; the
# forward variants timed in one process (QUICK windows). Run: run(command="bash benchmarks/gpu_v17_run.sh",
# carry=[".whl"]); files under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 200 python3 -m pytest -q tests/test_cuda.py tests/test_cuda_fp8.py tests/test_fp8.py > "$OUT/pytest.txt" 2>&1
tail -1 "$OUT/pytest.txt"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -8
for h in sanitize_fwd sanitize_fp8; do for tool in memcheck racecheck; do
  timeout 100 compute-sanitizer --tool $tool --kernel-name kns=taca_ python3 tests/cuda_harness/$h.py > "$OUT/$h.$tool.txt" 2>&1
  echo "$h $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|calls done' "$OUT/$h.$tool.txt" | tr '\n' ' ')"
done; done
timeout 150 python3 benchmarks/bench_attention_gpu.py --quick --no-bwd --variants --methods "taca_ctypes_v(0|10|15|16|17)$" \
  --shapes sd35m_cfg,sd35l_cfg,sd35m_cfg_768,sd35m_cfg_1536,flux1024_b1 --out "$OUT" --tag variants 2>&1 \
  | grep "^|" | grep -E "ctypes|cudnn" | grep -v plain_eff
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
