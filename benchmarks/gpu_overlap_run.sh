#!/usr/bin/env bash
# One device call (~5-6 min cold): the D = 128 forward's intra-warpgroup overlap (WSplitOv, taca_fwd_sm90.cu
# fwd_overlap) against the form without it, per key count. Build; the CUDA forward / backward tests and sanitize_fwd.py
# (memcheck + racecheck) on the default; outputs with TACA_FWD_OVERLAP=0 and =1 compared bitwise (out_hash.py); then
# FLUX at 512 / 1024 / 1536 / 2048 (1536 / 4608 / 9728 / 16896 keys) under sustained load (bench_sustained.py, both
# forms and cuDNN, 3 s phases, 2 rotated rounds) and isolated (bench_attention_gpu.py --quick, forms alternating in
# separate processes, ROUNDS rounds).
# SHAPES=.. picks others (flux1792_b1 / flux1920_b1: 13056 / 14912 keys; the threshold was 12288 before they were
# timed, 15360 after); SKIP_TESTS=1 skips the tests and sanitizers; SPANS=1 adds bench_fwd_tail.py --feature spans
# with both forms (the FEAT instances).
#   run(command="bash benchmarks/gpu_overlap_run.sh", carry=[".whl"])
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SH=${SHAPES:-flux512_b1,flux1024_b1,flux1536_b1,flux2048_b1}
{
source benchmarks/gpu_build.sh
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site:$PWD/tests/cuda_harness PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 200 python3 -m pytest -q tests/test_cuda.py tests/test_cuda_bwd.py tests/test_cuda_features.py \
    > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?: $(tail -1 "$OUT/pytest.txt")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -12
  source benchmarks/gpu_sanitize.sh
  sanitize tests/cuda_harness/sanitize_fwd.py taca_ all 200
fi
for ov in 0 1; do TACA_FWD_OVERLAP=$ov timeout 120 python3 benchmarks/out_hash.py > "$OUT/hash_ov$ov.txt" 2>&1; done
if cmp -s "$OUT/hash_ov0.txt" "$OUT/hash_ov1.txt" && grep -q fwd "$OUT/hash_ov0.txt"; then echo "outputs bitwise equal overlap 0 / 1"
else echo "OUTPUTS DIFFER overlap 0 / 1"; diff "$OUT/hash_ov0.txt" "$OUT/hash_ov1.txt" | head; fi
timeout 200 python3 benchmarks/bench_sustained.py --shapes "$SH" --env TACA_FWD_OVERLAP=0,TACA_FWD_OVERLAP=1 \
  --only "taca fwd TACA_FWD_OVERLAP=0,taca fwd TACA_FWD_OVERLAP=1,cudnn fwd" --seconds 3 --rounds 2 --out "$OUT/sus" \
  > "$OUT/sustained.txt" 2>&1; echo "sustained rc=$?"; grep -E "^\|" "$OUT/sustained.txt"
for r in $(seq 1 "${ROUNDS:-2}"); do for ov in 0 1; do
  TACA_FWD_OVERLAP=$ov timeout 100 python3 benchmarks/bench_attention_gpu.py --quick --no-bwd --shapes "$SH" \
    --methods "^taca_cuda$" --out "$OUT/iso_ov${ov}_$r" --tag ov 2>&1 | grep -E "^\| [a-z0-9]+_" | grep -v "plain_eff\|flash2" \
    | cut -c1-80 | sed "s/^/ov$ov r$r /"
done; done
if [ "${SPANS:-0}" = 1 ]; then  # per-sample spans (a (1,) text_len tensor: the FEAT split instances), both forms
  timeout 150 python3 benchmarks/bench_fwd_tail.py --feature spans --env TACA_FWD_OVERLAP=0,TACA_FWD_OVERLAP=1 \
    --heads 24,48 --rounds 3 --no-bwd --out "$OUT/spans" > "$OUT/spans.txt" 2>&1; echo "spans rc=$?"; tail -8 "$OUT/spans.txt"
fi
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
