#!/usr/bin/env bash
# The twenty-sixth session's two new forward defaults, checked and timed (KERNEL_LOG 2026-12-05, twenty-sixth session):
# the D = 128 tail split's range form where its model expects a gain (TACA_FWD_SPLIT unset; 0: off) and D = 64 key
# masks in the three-consumer kernel with every-lane key-term barrier arrivals (TACA_FWD_MASK=tile: two consumers;
# TACA_FWD_KT_ARRIVE=lane0: lane-0 arrivals, the forms before). Two calls on one warm machine (each under the 600 s
# limit; the second reuses the first's build when the sources hash the same):
#   PART=check: build; the CUDA tests; compute-sanitizer memcheck + racecheck of sanitize_fwd.py (the split harness
#     included) and racecheck of sanitize_fwd_keymask.py under the new default.
#   PART=time: bench_feat_overhead.py (key masks at SD3.5-M CFG and FLUX 1024 b1, the old forms beside the new);
#     bench_fwd_tail.py at FLUX 1024 (22 / 24 / 44 / 48 heads), 512 px (1536 tokens) and a Kontext edit (8704 tokens),
#     the default against TACA_FWD_SPLIT=0 and cuDNN, rotated rounds; then PERFORMANCE.md's table (TABLE=0: not).
#   PART=e2e: the split and key-mask tests, bench_fwd_tail.py at N 2560 / 4608 (24, 48 heads), and a FLUX.1-dev-sized
#     transformer call and 28-step schedule, stock vs TACA (bench_pipeline.py).
# Run: run(command="PART=check bash benchmarks/gpu_defaults_run.sh", carry=[".whl"]), then PART=time.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
source benchmarks/gpu_build.sh
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
if [ "${PART:-check}" = e2e ]; then  # after a change to the split model: its tests, two tail points, a FLUX step
  timeout 120 python3 -m pytest -q tests/test_cuda.py tests/test_cuda_features.py -k "tail_split or key_mask or determin" \
    > "$OUT/pytest.txt" 2>&1; echo "pytest: $(tail -1 "$OUT/pytest.txt")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -8
  for cfg in "2560 24,48" "4608 24,48"; do
    set -- $cfg; mkdir -p "$OUT/tail_$1"
    timeout 100 python3 benchmarks/bench_fwd_tail.py --tokens $1 --heads $2 --split 0 --rounds 5 --no-bwd \
      --out "$OUT/tail_$1" > "$OUT/tail_$1/tail.txt" 2>&1; echo "tail $1 rc=$?"; grep "^|" "$OUT/tail_$1/tail.txt"
  done
  timeout 200 python3 benchmarks/bench_pipeline.py --models flux --repeats 8 --schedule-repeats 2 --out "$OUT/pipeline" \
    > "$OUT/pipeline.txt" 2>&1; echo "pipeline rc=$?"; grep -A4 "^model" "$OUT/pipeline.txt"
elif [ "${PART:-check}" = check ]; then
  t0=$SECONDS
  timeout 240 python3 -m pytest -q tests/test_cuda.py tests/test_cuda_features.py tests/test_cuda_bwd.py \
    tests/test_ops_compile.py > "$OUT/pytest.txt" 2>&1
  echo "pytest ($((SECONDS - t0)) s): $(tail -1 "$OUT/pytest.txt")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -8
  source benchmarks/gpu_sanitize.sh
  sanitize tests/cuda_harness/sanitize_fwd.py taca_ fwd
  for mode in default tile:lane0; do
    m=${mode%%:*}; [ "$m" = default ] && m=
    TACA_FWD_MASK=$m TACA_FWD_KT_ARRIVE=$([[ $mode == *:* ]] && echo "${mode#*:}") timeout 100 compute-sanitizer \
      --tool racecheck --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fwd_keymask.py > "$OUT/race.keymask.${mode/:/_}.txt" 2>&1
    echo "keymask racecheck $mode: $(grep -E 'RACECHECK SUMMARY|calls done' "$OUT/race.keymask.${mode/:/_}.txt" | tr '\n' ' ')"
  done
else
  timeout 150 python3 benchmarks/bench_feat_overhead.py --shapes sd35m_cfg,flux1024_b1 --rounds 3 \
    --mask-modes tile,nc3+lane0,tile+lane0 --out "$OUT" > "$OUT/feat.txt" 2>&1; echo "feat rc=$?"
  grep "^|" "$OUT/feat.txt" | grep -v spans
  for cfg in "4608 22,24,44,48 5" "1536 24,48 3" "8704 24 3"; do
    set -- $cfg
    mkdir -p "$OUT/tail_$1"
    timeout 150 python3 benchmarks/bench_fwd_tail.py --tokens $1 --heads $2 --split 0 --rounds $3 --no-bwd \
      --out "$OUT/tail_$1" > "$OUT/tail_$1/tail.txt" 2>&1; echo "tail $1 rc=$?"
    python3 - "$OUT/tail_$1/fwd_tail.json" <<'PY' 2>&1
import json, statistics, sys
d = json.load(open(sys.argv[1]))
for h, r in d["heads"].items():
    raw = r["raw"]
    pair = lambda a, b: statistics.median(x / y for x, y in zip(raw[a], raw[b]))
    print(f"N {d['tokens']} H {h} ({r['items']} items, {r['waves']:.2f} waves): ms default {r['taca_fwd']:.4f} "
          f"split=0 {r['split0_fwd']:.4f} cuDNN {r['cudnn_fwd']:.4f}; paired default/split=0 "
          f"{pair('taca_fwd', 'split0_fwd'):.4f}, cuDNN/default {pair('cudnn_fwd', 'taca_fwd'):.4f}")
PY
  done
  [ "${TABLE:-1}" = 1 ] && { timeout 200 python3 benchmarks/bench_attention_gpu.py --methods "taca|split" \
    --shapes flux1024_b1,flux1024_b2,sd35l_cfg,sd35m_cfg,flux2048_b1 --out "$OUT" --tag s26 \
    > "$OUT/bench.txt" 2>&1; echo "bench rc=$?"; grep "^|" "$OUT/bench.txt" | grep -v plain_eff | cut -c1-150; }
fi
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
