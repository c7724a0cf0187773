#!/usr/bin/env bash
# One device call (about 8 min): the D = 128 forward's tail split (TACA_FWD_SPLIT; KERNEL_LOG 2026-12-05, twenty-fifth
# session; the range form is the default since the twenty-sixth where its model expects a gain, so "0" is the control). Build; its tests and the plain forward's; memcheck + racecheck of sanitize_fwd_split.py; then
# bench_fwd_tail.py: FLUX 1024's shape at head counts that fill the SMs evenly (22, 44: 6 and 12 waves on 132 SMs)
# or not (24, 48: FLUX b1 and b2's items), taca with and without the split against cuDNN, one process.
# Env: SPLITS (the TACA_FWD_SPLIT values timed, "@two": the two-launch form; default 0,auto,range: "0" sets the
# variable through the same wrapper, the control), HEADS, ROUNDS (default 7), BWD=1 (fwd+bwd too), SKIP_SAN=1.
# Run: run(command="bash benchmarks/gpu_split_run.sh", carry=[".whl"]).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 150 python3 -m pytest -q tests/test_cuda.py -k "tail_split or forward_matches_reference or deterministic" \
  > "$OUT/pytest.txt" 2>&1
tail -1 "$OUT/pytest.txt"; grep -E "^(FAILED|ERROR)|Error" "$OUT/pytest.txt" | head -8
if [ "${SKIP_SAN:-0}" != 1 ]; then
  source benchmarks/gpu_sanitize.sh
  sanitize tests/cuda_harness/sanitize_fwd_split.py taca_ split 120
fi
timeout 240 python3 benchmarks/bench_fwd_tail.py --heads "${HEADS:-22,24,44,48}" --split "${SPLITS:-0,auto,range}" \
  --rounds "${ROUNDS:-7}" $([ "${BWD:-0}" = 1 ] || echo --no-bwd) --out "$OUT" > "$OUT/tail.txt" 2>&1; echo "tail rc=$?"; grep -E "^\||^GPU|Error" "$OUT/tail.txt"
python3 - "$OUT/fwd_tail.json" <<'PY' 2>/dev/null
import json, statistics, sys
d = json.load(open(sys.argv[1]))
for h, r in d["heads"].items():
    raw = r["raw"]
    base = "split0_fwd" if "split0_fwd" in raw else "taca_fwd"
    pair = {k: round(statistics.median(a / b for a, b in zip(raw[k], raw[base])), 4)
            for k in raw if k.endswith("fwd") and raw[k]}
    print(f"{h} heads ({r['items']} items): fwd ms taca {r['taca_fwd']:.4f} cuDNN {r['cudnn_fwd']:.4f}; paired median "
          f"ratio to {base}: {pair}")
PY
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
