#!/usr/bin/env bash
# One short device call (about 6 min; ran as results/keymask_race_H100_20261205/ in the twenty-sixth session, before
# the modes' names changed): racecheck of sanitize_fwd_keymask.py (10 key tiles, persistent items, D = 64 and 128,
# bool and float masks) under each key-mask form: MODES of TACA_FWD_MASK[:TACA_FWD_KT_ARRIVE] (tile: two consumers at
# D = 64, nc3: three, the default; lane0: lane-0 barrier arrivals, the default before; the default now has every lane
# arrive); the key-mask bitwise test (SKIP_TEST=1: not); what each form costs at SD3.5-M CFG (SKIP_BENCH=1: not).
# Run: run(command="bash benchmarks/gpu_keymask_race.sh", carry=[".whl"]).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for mode in ${MODES:-tile nc3 tile:lane0 nc3:lane0}; do
  TACA_FWD_MASK=${mode%%:*} TACA_FWD_KT_ARRIVE=$([[ $mode == *:* ]] && echo "${mode#*:}") timeout ${RACE_TIMEOUT:-100} compute-sanitizer --tool racecheck --kernel-name kns=taca_ \
    python3 tests/cuda_harness/sanitize_fwd_keymask.py > "$OUT/race.${mode/:/_}.txt" 2>&1
  echo "racecheck $mode: $(grep -E 'RACECHECK SUMMARY|calls done' "$OUT/race.${mode/:/_}.txt" | tr '\n' ' ')"
  grep -oE "(Write|Read) access at .* in [a-z0-9_.]+:[0-9]+" "$OUT/race.${mode/:/_}.txt" | sed 's/ at .* in / at /' | sort | uniq -c | head -6
done
[ "${SKIP_TEST:-0}" = 1 ] || timeout 60 python3 -m pytest -q tests/test_cuda_features.py -k key_mask > "$OUT/pytest.txt" 2>&1; tail -1 "$OUT/pytest.txt"
# what the forms cost (SKIP_BENCH=1: not): SD3.5-M CFG key masks, two / three consumers, lane-0 / every-lane arrivals
[ "${SKIP_BENCH:-0}" = 1 ] || { timeout 120 python3 benchmarks/bench_feat_overhead.py --shapes sd35m_cfg --rounds 3 \
  --mask-modes tile,nc3+lane0,tile+lane0 --out "$OUT" > "$OUT/feat.txt" 2>&1; echo "feat rc=$?"; grep "^|" "$OUT/feat.txt" | grep -v spans; }
# the partial wave (SKIP_TAIL=1: not): FLUX 1024's shape at head counts that fill the 132 SMs evenly (22, 33, 44) or not
[ "${SKIP_TAIL:-0}" = 1 ] || { timeout 150 python3 benchmarks/bench_fwd_tail.py --rounds 3 --out "$OUT" > "$OUT/tail.txt" 2>&1; \
  echo "tail rc=$?"; grep -E "^\||^GPU" "$OUT/tail.txt"; }
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
