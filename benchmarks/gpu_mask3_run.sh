#!/usr/bin/env bash
# One device call (about 8 min; ran as results/mask3_H100_20261205/ when D = 64 key masks briefly took the three-consumer
# kernel by default; that default was reverted after this run's racecheck, see KERNEL_LOG 2026-12-05, twenty-fourth
# session). Build; the forward, feature and backward CUDA tests; memcheck + racecheck of sanitize_fwd.py (a D = 64 key
# mask over 5 query tiles x 45 heads included); bench_feat_overhead.py at SD3.5-M CFG with --mask-modes elem,nc3; last,
# the fwd and fwd+bwd table of PERFORMANCE.md's shapes against cuDNN (the ratios move between leases: this lease's).
# Run: run(command="bash benchmarks/gpu_mask3_run.sh", carry=[".whl"]).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 200 python3 -m pytest -q tests/test_cuda.py tests/test_cuda_features.py tests/test_cuda_bwd.py > "$OUT/pytest.txt" 2>&1
tail -1 "$OUT/pytest.txt"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -8
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fwd.py > "$OUT/fwd.$tool.txt" 2>&1
  echo "sanitize_fwd $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|calls done' "$OUT/fwd.$tool.txt" | tr '\n' ' ')"
done
timeout 150 python3 benchmarks/bench_feat_overhead.py --shapes sd35m_cfg --rounds 3 --mask-modes elem,nc3 \
  --out "$OUT" > "$OUT/feat.txt" 2>&1; echo "feat rc=$?"; grep "^|" "$OUT/feat.txt" | head -40
timeout 200 python3 benchmarks/bench_attention_gpu.py --methods "taca|split" \
  --shapes flux1024_b1,flux1024_b2,sd35l_cfg,sd35m_cfg,flux2048_b1,sd35m_cfg_768,sd35m_cfg_1536 --out "$OUT" --tag mask3 \
  > "$OUT/bench.txt" 2>&1; echo "bench rc=$?"; grep "^|" "$OUT/bench.txt" | grep -v plain_eff | cut -c1-150
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
