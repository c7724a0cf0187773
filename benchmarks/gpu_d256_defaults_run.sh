#!/usr/bin/env bash
# The D = 256 defaults to be (fiftieth session): the wgmma backward (TACA_BWD_D256=wgmma; kDefault in
# taca_bwd_sm90_d256.cu) and the warp-specialized forward (TACA_FWD_D256=ws; fwd_d256_ws in taca_fwd_sm90.cu), both
# exported by this script (NEW, default "TACA_BWD_D256=wgmma TACA_FWD_D256=ws"), checked and timed in one call before
# they are made the defaults; steps in order of need (STEPS, default all of them):
#   build;
#   test: the D > 128 CUDA tests (test_cuda.py, test_cuda_bwd.py, test_cuda_features.py) with NEW (the head dims
#     they route; D <= 128 run the same code either way);
#   san_bwd: compute-sanitizer memcheck, racecheck and synccheck of sanitize_bwd_d256.py;
#   bench: bench_attention_gpu.py at auraflow_cfg / ideogram4_cfg with NEW, 3 rounds;
#   feat: AuraFlow's / Ideogram 4's feature shapes with the old routes (TACA_FWD_D256=cp TACA_BWD_D256=mma) and the
#     NEW, one process each;
#   san_fwd: memcheck and racecheck of sanitize_fwd_pad.py (the WS D = 256 forward's plain and FEAT instances).
#   prof (not in the default STEPS): Nsight Compute (full set) on the wgmma backward's main kernel and on plain cuDNN's
#     fwd + bwd kernels at AuraFlow CFG (bwd_profile_once.py d256), the details pages and the SASS opcode counts.
#   diag (not in the default STEPS; the fifty-first session's, about 1.5 min): where the wgmma backward's time goes,
#     at AuraFlow / Ideogram 4 CFG: bench_bwd_handoff.py, the backward alone in its dQ modes (deterministic chains,
#     deterministic=False, racy stores, no dQ written, without the skew, the conversion after the kernel), 3
#     interleaved rounds; then bwd_trace.py --kernel d256 (the kernel's trace instance): a query tile's cycles by
#     segment of MMA thread 0's loop, the writers' and the producer's waits, in the modes det / nd / racy / skip;
#     both also with the own-half variant (TACA_BWD_D256_OWN=1: d256@oh, det+oh).
#   own (not in the default STEPS; about 4 min): the own-half variant checked as a default would be: the D > 128
#     tests with TACA_BWD_D256_OWN=1 exported (features, masks, grouped KV heads included), then memcheck, racecheck
#     and synccheck of sanitize_bwd_d256.py with it.
# SAN_T: each sanitizer run's timeout in seconds (default 75 / 70).
# Run: run(command="timeout 570 bash benchmarks/gpu_d256_defaults_run.sh; bash benchmarks/pack_out.sh $OUT", carry=[".whl"])
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build test san_bwd bench feat san_fwd"}
has() { [[ " $STEPS " == *" $1 "* ]]; }
{
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; fi
if has build; then t0=$SECONDS; source benchmarks/gpu_build.sh; echo "build ($((SECONDS - t0)) s)"; fi
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
NEW=${NEW:-"TACA_BWD_D256=wgmma TACA_FWD_D256=ws"}
unset TACA_BWD_D256 TACA_FWD_D256; export $NEW
nvidia-smi -L
source benchmarks/gpu_sanitize.sh
source benchmarks/gpu_pytest.sh
if has test; then
  pytest_step pytest_d256 120 "CUDA tests, D > 128" -rs tests/test_cuda.py tests/test_cuda_bwd.py \
    tests/test_cuda_features.py -k "256 or 224 or 208 or D200 or d256"
fi
if has san_bwd; then
  SAN_TOOLS="memcheck racecheck synccheck" sanitize tests/cuda_harness/sanitize_bwd_d256.py taca_bwd sanitize_bwd_d256 ${SAN_T:-75}
fi
if has bench; then
  t0=$SECONDS
  timeout 90 python3 benchmarks/bench_attention_gpu.py --rounds 3 --shapes auraflow_cfg,ideogram4_cfg \
    --methods 'taca_cuda$' --out "$OUT" --tag _d256_defaults > "$OUT/bench_d256.txt" 2>&1
  echo "bench rc=$? ($((SECONDS - t0)) s)"
  grep -E "^\| (auraflow|ideogram)" "$OUT/bench_d256.txt" | cut -d'|' -f2-12
fi
if has feat; then
  t0=$SECONDS
  for route in old new; do
    mkdir -p "$OUT/feat256_$route"
    if [ $route = old ]; then export TACA_FWD_D256=cp TACA_BWD_D256=mma; else export $NEW; fi
    timeout 60 python3 benchmarks/bench_features_gpu.py --shapes 'auraflow|ideogram' --out "$OUT/feat256_$route" \
      > "$OUT/feat256_$route.txt" 2>&1
    echo "features D = 256 ($route routes) rc=$?"
  done
  export $NEW
  echo "features ($((SECONDS - t0)) s)"
  for f in "$OUT"/feat256_*.txt; do echo "== $(basename "$f")"; grep -E "auraflow|ideogram" "$f" | tail -4 | cut -c1-160; done
fi
if has prof; then
  for who in taca cudnn; do
    t0=$SECONDS
    if [ $who = taca ]; then
      timeout 120 ncu --clock-control none --kernel-name regex:taca_bwd_sm90_d256 --launch-skip 1 --launch-count 1 \
        --set full --import-source no -f -o /tmp/prof_$who python3 benchmarks/bwd_profile_once.py d256 > /tmp/ncu_$who.txt 2>&1
    else
      timeout 150 ncu --clock-control none --profile-from-start off --set full --import-source no -f -o /tmp/prof_$who \
        python3 benchmarks/bwd_profile_once.py d256 cudnn > /tmp/ncu_$who.txt 2>&1
    fi
    echo "ncu $who rc=$? ($((SECONDS - t0)) s)"
    ncu --import /tmp/prof_$who.ncu-rep --page details > "$OUT/ncu_d256_${who}_details.txt" 2>&1
    ncu --import /tmp/prof_$who.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip -c > /tmp/ncu_${who}_sass.csv.gz
    python3 tools/ncu_sass_ops.py /tmp/ncu_${who}_sass.csv.gz > "$OUT/ncu_d256_${who}_ops.txt"
  done
  grep -E "^  [a-zA-Z_].*\(|Duration|Registers Per|Dynamic Shared|Issue Slots Busy|No Eligible|Tensor" \
    "$OUT"/ncu_d256_*_details.txt | head -40
fi
if has diag; then
  t0=$SECONDS
  timeout 150 python3 benchmarks/bench_bwd_handoff.py --rounds 3 --shapes auraflow_cfg,ideogram4_cfg \
    --modes d256,d256@oh,d256+nd,d256@rc,d256@sk,d256@k0,d256@o0 --out "$OUT/diag_bench" > "$OUT/diag_bench.txt" 2>&1
  echo "diag bench rc=$? ($((SECONDS - t0)) s)"; grep -E "^\|" "$OUT/diag_bench.txt" | cut -c1-220
  t0=$SECONDS
  timeout 120 python3 benchmarks/bwd_trace.py --kernel d256 --shapes auraflow_cfg,ideogram4_cfg \
    --modes det,det+oh,nd,racy,skip --reps 3 --out "$OUT/diag_trace" > "$OUT/diag_trace.txt" 2>&1
  echo "diag trace rc=$? ($((SECONDS - t0)) s)"; grep -E "^\||cycles" "$OUT/diag_trace.txt" | cut -c1-260
fi
if has own; then
  export TACA_BWD_D256_OWN=1
  pytest_step pytest_d256_own 120 "CUDA tests, D > 128, own half" -rs tests/test_cuda_bwd.py tests/test_cuda_features.py \
    -k "256 or 224 or 208 or D200 or d256"
  SAN_TOOLS="memcheck racecheck synccheck" sanitize tests/cuda_harness/sanitize_bwd_d256.py taca_bwd sanitize_bwd_d256_own \
    ${SAN_T:-75}
  unset TACA_BWD_D256_OWN
fi
if has san_fwd; then sanitize tests/cuda_harness/sanitize_fwd_pad.py taca_fwd sanitize_fwd_pad ${SAN_T:-70}; fi
} 2>&1 | tee "$OUT/log.txt"
