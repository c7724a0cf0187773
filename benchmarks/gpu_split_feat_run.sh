#!/usr/bin/env bash
# One device call (about 6 min): the tail split in the D = 128 forward's feature instances (per-sample spans; a key
# mask's per-tile terms), opt-in (TACA_FWD_SPLIT set) since the twenty-sixth session, compiled and SASS-checked, not
# run when written. Build; the split tests (plain and feature cases) and the key-mask / feature tests; memcheck +
# racecheck of sanitize_fwd_split.py (its feature calls included); bench_fwd_tail.py at FLUX 1024's item counts (24,
# 48 heads) through each feature instance, unset (the unsplit feature kernel) against TACA_FWD_SPLIT=range and cuDNN.
# If range is sanitizer-clean and faster at both item counts under every feature, drop the opt-in (d128_split_plan's
# env check) and re-run this. SKIP_SAN=1: no sanitizer; FEATURES (default spans,keymask,keypad); ROUNDS (default 5).
# Run: run(command="bash benchmarks/gpu_split_feat_run.sh", carry=[".whl"]).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
source benchmarks/gpu_build.sh  # (reused on a warm machine when the sources match)
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 200 python3 -m pytest -q tests/test_cuda.py tests/test_cuda_features.py \
  -k "tail_split or key_mask or features_tolerance or deterministic" > "$OUT/pytest.txt" 2>&1
tail -1 "$OUT/pytest.txt"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -8
if [ "${SKIP_SAN:-0}" != 1 ]; then
  source benchmarks/gpu_sanitize.sh
  sanitize tests/cuda_harness/sanitize_fwd_split.py taca_ split
fi
for f in $(echo "${FEATURES:-spans,keymask,keypad}" | tr , ' '); do
  mkdir -p "$OUT/$f"
  timeout 120 python3 benchmarks/bench_fwd_tail.py --heads 22,24,48 --feature $f --split range,0 --rounds "${ROUNDS:-5}" \
    --no-bwd --out "$OUT/$f" > "$OUT/$f/tail.txt" 2>&1; echo "$f rc=$?"
  python3 - "$OUT/$f/fwd_tail.json" <<'PY' 2>&1
import json, statistics, sys
d = json.load(open(sys.argv[1]))
for h, r in d["heads"].items():
    raw = r["raw"]; p = lambda a, b: statistics.median(x / y for x, y in zip(raw[a], raw[b]))
    print(f"  {d['feature']} H {h} ({r['items']} items): ms unset {r['taca_fwd']:.4f} range {r['splitrange_fwd']:.4f} "
          f"0 {r['split0_fwd']:.4f} cuDNN {r['cudnn_fwd']:.4f}; paired range/unset {p('splitrange_fwd', 'taca_fwd'):.4f} "
          f"0/unset {p('split0_fwd', 'taca_fwd'):.4f}")
PY
done
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
