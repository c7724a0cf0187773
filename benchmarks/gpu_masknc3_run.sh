#!/usr/bin/env bash
# One device call (about 5 min): at D = 64, a key mask's per-tile terms in the three-consumer forward (TACA_FWD_MASK=nc3,
# 48 spilled bytes) against the two-consumer FEAT instance (the default). Build; the feature tests (bitwise the same
# out / lse / text_mass under tile, elem and nc3); memcheck of the feature tests' forward at D = 64 under nc3;
# bench_feat_overhead.py at SD3.5-M CFG with --mask-modes elem,nc3. Run: run(command="bash benchmarks/gpu_masknc3_run.sh",
# carry=[".whl"]); files under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 100 python3 -m pytest -q tests/test_cuda_features.py > "$OUT/pytest.txt" 2>&1
tail -1 "$OUT/pytest.txt"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -8
TACA_FWD_MASK=nc3 timeout 120 compute-sanitizer --tool memcheck --kernel-name kns=taca_ python3 -m pytest -q -x \
  tests/test_cuda_features.py -k "d64 and not backward and not grad" > "$OUT/memcheck_nc3.txt" 2>&1
echo "memcheck nc3: $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/memcheck_nc3.txt" | tr '\n' ' ')"
timeout 120 python3 benchmarks/bench_feat_overhead.py --shapes sd35m_cfg --rounds 3 --mask-modes elem,nc3 --out "$OUT" \
  > "$OUT/feat.txt" 2>&1; echo "feat rc=$?"; grep "^|" "$OUT/feat.txt" | head -16
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
