#!/usr/bin/env bash
# One device call (about 7 min), two forward experiments first run: at D = 128 three consumer warpgroups on 64-key
# tiles (variants 19 / 20: 2 / 3 stages), and at D = 64 a key mask's per-tile terms in the three-consumer kernel
# (TACA_FWD_MASK=nc3). Build; the forward and feature CUDA tests (19 / 20 in the tiling and ws lists; nc3 bitwise
# equal to the default); memcheck + racecheck of the forward harness (19 / 20 included); the forward variants 0 / 19 /
# 20 timed at the FLUX shapes (QUICK windows, one process); bench_feat_overhead.py at SD3.5-M CFG with
# --mask-modes elem,nc3. Run: run(command="bash benchmarks/gpu_v19_run.sh", carry=[".whl"]); files under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 200 python3 -m pytest -q tests/test_cuda.py tests/test_cuda_features.py > "$OUT/pytest.txt" 2>&1
tail -1 "$OUT/pytest.txt"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -8
for tool in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool $tool --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fwd.py > "$OUT/fwd.$tool.txt" 2>&1
  echo "sanitize_fwd $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|calls done' "$OUT/fwd.$tool.txt" | tr '\n' ' ')"
done
timeout 120 python3 benchmarks/bench_attention_gpu.py --quick --no-bwd --variants --methods "taca_ctypes_v(0|19|20)$" \
  --shapes flux1024_b1,flux1024_b2,flux2048_b1 --out "$OUT" --tag v19 2>&1 | grep "^|" | grep -E "ctypes|cudnn" | grep -v plain_eff
timeout 120 python3 benchmarks/bench_feat_overhead.py --shapes sd35m_cfg --rounds 3 --mask-modes elem,nc3 --out "$OUT" \
  > "$OUT/feat.txt" 2>&1; echo "feat rc=$?"; grep "^|" "$OUT/feat.txt" | head -16
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
