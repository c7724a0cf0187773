#!/usr/bin/env bash
# One GPU call for the D = 136..256 wgmma backward (csrc/cuda/taca_bwd_sm90_d256.cu). Steps (STEPS, default
# "build check test bench test2"; they run in the order build check test bench test2 sanitize):
#   build: the extension and the ctypes library (gpu_features_run.sh's build);
#   check: wgmma_check (the m64n32k16 form the kernel adds) and a smoke run of every instance (a hang stops the call);
#   test: the D > 128 backward tests of test_cuda_bwd.py (the rule, determinism, the wgmma kernel against
#     TACA_BWD_D256=mma, the skew, deterministic=False);
#   test2: test_cuda_features.py's at D = 256 / 224 / 208 (spans, masks, grouped KV heads, N_q != N_k) and the WS
#     forward's D = 256 tests (test_cuda.py);
#   sanitize: memcheck, racecheck and synccheck of tests/cuda_harness/sanitize_bwd_d256.py;
#   bench: AuraFlow and Ideogram 4 CFG (bench_attention_gpu.py, fwd and fwd+bwd) with TACA_BWD_D256=wgmma, =mma (the
#     mma.sync kernel) and wgmma with TACA_FWD_D256=ws (the warp-specialized forward), one process each, BENCH_ROUNDS
#     (1) rounds, plain cuDNN / FA2 beside.
#   run(command="timeout 540 bash benchmarks/gpu_d256_bwd_run.sh; bash benchmarks/pack_out.sh $OUT", carry=[".whl"])
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build check test bench test2"}
has() { [[ " $STEPS " == *" $1 "* ]]; }
{
if has build; then STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda|GPU|torch"; fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so
# the wgmma kernel for every step (until it is the default: kDefault in taca_bwd_sm90_d256.cu)
export TACA_BWD_D256=${TACA_BWD_D256:-wgmma}
source benchmarks/gpu_pytest.sh
if has check; then
  nvcc -std=c++17 -O2 -Icsrc -Icsrc/cuda -gencode=arch=compute_90a,code=sm_90a tests/cuda_harness/wgmma_check.cu \
    -o /tmp/wgmma_check 2>&1 | tail -3 && timeout 60 /tmp/wgmma_check | tail -3
fi
if has check; then
  # a smoke run of every instance (the sanitizer harness without the sanitizer): a hang stops the call here
  t0=$SECONDS
  timeout 90 python3 tests/cuda_harness/sanitize_bwd_d256.py > "$OUT/smoke.txt" 2>&1
  rc=$?; echo "smoke rc=$rc ($((SECONDS - t0)) s): $(tail -2 "$OUT/smoke.txt" | tr '\n' ' ')"
  if [ $rc -ne 0 ]; then echo "smoke failed: stopping"; exit 1; fi
fi
if has test; then
  t0=$SECONDS
  pytest_step pytest_bwd_d256 200 "test_cuda_bwd.py (D > 128)" -x tests/test_cuda_bwd.py -k "256 or 224 or D200"
  echo "tests ($((SECONDS - t0)) s)"
fi
if has bench; then
  t0=$SECONDS
  for r in $(seq 1 "${BENCH_ROUNDS:-1}"); do
    for k in wgmma mma wgmma+ws; do
      mkdir -p "$OUT/bench_${k}_r$r"
      export TACA_BWD_D256=${k%+ws}
      if [ "$k" = wgmma+ws ]; then export TACA_FWD_D256=ws; else unset TACA_FWD_D256; fi
      timeout 90 python3 benchmarks/bench_attention_gpu.py --quick --shapes auraflow_cfg,ideogram4_cfg \
        --methods 'taca_cuda$' --out "$OUT/bench_${k}_r$r" --tag _d256bwd_$k > "$OUT/bench_${k}_r$r.txt" 2>&1
      echo "bench $k round $r rc=$?"
    done
  done
  export TACA_BWD_D256=wgmma; unset TACA_FWD_D256
  echo "bench ($((SECONDS - t0)) s)"
  grep -h -E "auraflow|ideogram" "$OUT"/bench_*_r1.txt | head -30
fi
if has test2; then
  t0=$SECONDS
  pytest_step pytest_features_d256 150 "test_cuda_features.py (D > 128)" tests/test_cuda_features.py -k "256 or 224 or 208"
  # the warp-specialized D = 256 forward (TACA_FWD_D256=ws)
  pytest_step pytest_fwd_ws256 100 "test_cuda.py (WS forward at D = 256)" tests/test_cuda.py -k "ws_d256 or head_dim_routes"
  echo "tests 2 ($((SECONDS - t0)) s)"
fi
if has sanitize; then
  source benchmarks/gpu_sanitize.sh
  SAN_TOOLS="memcheck racecheck synccheck" sanitize tests/cuda_harness/sanitize_bwd_d256.py taca_bwd sanitize_bwd_d256 150
fi
} 2>&1 | tee -a "$OUT/log.txt"
