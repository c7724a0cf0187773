#!/usr/bin/env bash
# One GPU call for the padded head dims on the warp-specialized forwards (D = 72..120 zero-filled on the D = 128 kernel,
# TACA_FWD_PAD=0 sending them to the cp.async kernel as before; D = 200..256 on the D = 256 one, ctypes variant 10 or
# TACA_FWD_D256=ws) and for TURN (TACA_FWD_TURN=1, the forward consumers' turn across items). Steps:
#   build;
#   test: test_cuda.py's D72 / D80 / D96 / D120 cases, ws_d256, head_dim_routes and turn_across tests;
#     test_cuda_features.py's 96 / 72 / 256 / 224 ones;
#   bench (BENCH, default "d96 d256"): the D = 96 forward and fwd+bwd against the cp.async kernel (ctypes variant 13)
#     and plain cuDNN in one process; D = 256's cp.async default (v0) against v10;
#   sanitize: memcheck + racecheck of sanitize_fwd_pad.py, and of sanitize_fwd_turn.py with synccheck too (SAN=full:
#     the whole sanitize_fwd.py instead);
#   feat: the feature shapes at D = 96 (Lumina 2, OmniGen) and D = 128 with a key mask (Qwen-Image: the D = 72..120
#     change renumbered that instance's registers) with TACA_FWD_PAD=0 and without, one process each, FEAT_ROUNDS (2)
#     times;
#   turn: TACA_FWD_TURN=1 against the default, with the tail split and without (TACA_FWD_SPLIT=0), one mode per
#     process (gpu_fwd_modes.sh; TURN_SHAPES, TURN_ROUNDS (2));
#   feat256: AuraFlow's and Ideogram 4's feature shapes (per-sample text, a segment mask) with TACA_FWD_D256=cp and
#     ws, one process each.
#   run(command="bash benchmarks/gpu_pad_run.sh", carry=[".whl"], timeout_s=600)
# Env: STEPS (default "build test bench sanitize feat feat256"; whatever the order given, they run in the order above),
# FEAT_ROUNDS, SAN, BENCH, TURN_SHAPES, TURN_ROUNDS, OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build test bench sanitize feat feat256"}
has() { [[ " $STEPS " == *" $1 "* ]]; }
{
if has build; then STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda|GPU|torch"; fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so
source benchmarks/gpu_pytest.sh
if has test; then
  t0=$SECONDS
  pytest_step pytest_cuda 150 "test_cuda.py (D 72..120, WS at D = 256)" tests/test_cuda.py \
    -k "D72 or D80 or D96 or D120 or ws_d256 or head_dim_routes or turn_across"
  pytest_step pytest_features 160 "test_cuda_features.py (96 / 72 / 256 / 224)" tests/test_cuda_features.py \
    -k "96 or 72 or 256 or 224"
  echo "tests ($((SECONDS - t0)) s)"
fi
if has bench && [[ " ${BENCH:-d96 d256} " == *" d96 "* ]]; then
  t0=$SECONDS
  timeout 100 python3 benchmarks/bench_attention_gpu.py --rounds 3 --variants --shapes d96_cfg \
    --methods 'taca_cuda$|taca_ctypes_v(0|13)$|split' --out "$OUT" --tag _d96 > "$OUT/bench_d96.txt" 2>&1
  echo "bench d96 rc=$? ($((SECONDS - t0)) s)"
fi
if has bench && [[ " ${BENCH:-d96 d256} " == *" d256 "* ]]; then
  # D = 256: the cp.async default (v0) against the opt-in warp-specialized kernel (v10)
  t0=$SECONDS
  timeout 150 python3 benchmarks/bench_attention_gpu.py --rounds 3 --variants --shapes auraflow_cfg,ideogram4_cfg \
    --methods 'taca_cuda$|taca_ctypes_v(0|10)$|split' --out "$OUT" --tag _d256 > "$OUT/bench_d256.txt" 2>&1
  echo "bench d256 rc=$? ($((SECONDS - t0)) s)"
fi
if has sanitize; then
  source benchmarks/gpu_sanitize.sh
  # SAN=full: the whole forward harness (160 calls, ~2 min for both tools); default: the padded head dims alone
  if [ "${SAN:-pad}" = full ]; then sanitize tests/cuda_harness/sanitize_fwd.py taca_ sanitize_fwd 150
  else
    sanitize tests/cuda_harness/sanitize_fwd_pad.py taca_fwd sanitize_fwd_pad 120
    # TURN: memcheck, racecheck and synccheck (the turn's named barriers)
    SAN_TOOLS="memcheck racecheck synccheck" sanitize tests/cuda_harness/sanitize_fwd_turn.py taca_fwd sanitize_fwd_turn 120
  fi
fi
if has feat; then
  t0=$SECONDS
  for r in $(seq 1 "${FEAT_ROUNDS:-2}"); do
    for pad in 0 1; do
      mkdir -p "$OUT/feat_pad${pad}_r$r"
      TACA_FWD_PAD=$pad timeout 100 python3 benchmarks/bench_features_gpu.py --shapes 'lumina|omnigen|qwen' \
        --out "$OUT/feat_pad${pad}_r$r" > "$OUT/feat_pad${pad}_r$r.txt" 2>&1
      echo "features TACA_FWD_PAD=$pad round $r rc=$?"
    done
  done
  echo "features ($((SECONDS - t0)) s)"
fi
if has turn; then
  t0=$SECONDS
  OUT=$OUT/turn BUILD=0 ROUNDS=${TURN_ROUNDS:-2} MODES=base,turn,sp0,sp0+turn \
    SHAPES=${TURN_SHAPES:-fa3_d128_4k,fa3_d64_4k,flux1024_b1,sd35m_cfg,fa3_d128_16k} bash benchmarks/gpu_fwd_modes.sh > /dev/null 2>&1
  echo "turn modes rc=$? ($((SECONDS - t0)) s)"
fi
if has feat256; then
  t0=$SECONDS
  for route in cp ws; do
    mkdir -p "$OUT/feat256_$route"
    TACA_FWD_D256=$route timeout 150 python3 benchmarks/bench_features_gpu.py --shapes 'auraflow|ideogram' \
      --out "$OUT/feat256_$route" > "$OUT/feat256_$route.txt" 2>&1
    echo "features D = 256 TACA_FWD_D256=$route rc=$?"
  done
  echo "features D = 256 ($((SECONDS - t0)) s)"
fi
grep -hE "^\| (d96|auraflow|ideogram)" "$OUT/bench_d96.txt" "$OUT/bench_d256.txt" | cut -d'|' -f2-10
[ -f "$OUT/turn/log.txt" ] && grep -E "^\| " "$OUT/turn/log.txt" | cut -c1-160
for f in "$OUT"/feat_pad*_r*.txt "$OUT"/feat256_*.txt; do echo "== $(basename "$f")"; grep -E "lumina|omnigen|qwen|hunyuan|auraflow|ideogram" "$f" | tail -3 | cut -c1-150; done
} 2>&1 | tee "$OUT/log.txt"
