#!/usr/bin/env bash
# One GPU call for the opt-in v6 Hopper backward (csrc/cuda/taca_bwd_sm90_v6.cu, TACA_BWD_SM90_KERNEL=v6):
# build, a smoke run, the CUDA tests (test_cuda, test_cuda_bwd, test_cuda_features) with v6 forced,
# memcheck + racecheck of the harness with v6, bwd alone v5 vs v6 (same process, interleaved rounds),
# fwd+bwd against cuDNN with v6, and optionally (STEPS with "prof" / "wgmma") Nsight Compute on one FLUX-1024 backward main
# kernel (full set + per-SASS-instruction stall samples in $OUT) and wgmma_check.
#   run(command="bash benchmarks/gpu_bwd_v6_run.sh", carry=[".whl"], timeout_s=600)
# Env: STEPS (default "build test sanitize bench attn"; also "prof", "wgmma", "sass"), MODES (bench modes),
# PROF ("v6"; "v5", "v6:<writer>"), PROF_ARGS ("d64": the SD3.5-M shape), SAN_EXTRA (more sanitizer tools), VARS (v6 variants for the tests: "default" or a dQ writer; "rows tensor"), SVARS (for the sanitizers, $VARS).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build test sanitize bench attn"}
MODES=${MODES:-"v5,v6,v5+nd,v6+nd"}
PROF=${PROF:-"v6"}
VARS=${VARS:-"rows tensor"}  # v6 dQ writers (TACA_BWD_V6_WRITER) the tests and sanitizers run with
has() { [[ " $STEPS " == *" $1 "* ]]; }
# the environment of a v6 variant: "default" (none) or a dQ writer
v6env() { case "$1" in default) ;; *) echo "TACA_BWD_V6_WRITER=$1" ;; esac; }
{
if has build; then STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"; fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so
# smoke first: a hang or a crash of v6 must not eat the call's time
if TACA_BWD_SM90_KERNEL=v6 timeout 60 python3 benchmarks/bwd_profile_once.py; then echo "smoke v6 ok"
else echo "smoke v6 FAILED"; STEPS=""; fi
if has sass; then  # where ptxas spills in v6 (STL / LDL with the surrounding SASS)
  nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -DTACA_HAVE_SM90A=1 -Icsrc -Icsrc/cuda -cubin \
    csrc/cuda/taca_bwd_sm90_v6.cu -o /tmp/v6.cubin && cuobjdump -sass /tmp/v6.cubin > /tmp/v6.sass \
    && python3 tools/sass_spills.py /tmp/v6.sass > "$OUT/v6_spills.txt" && head -12 "$OUT/v6_spills.txt"
fi
if has wgmma; then
  nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Icsrc/cuda tests/cuda_harness/wgmma_check.cu \
    -o /tmp/wgmma_check 2>&1 | tail -3 && /tmp/wgmma_check | tail -2
fi
if has test; then
  for var in $VARS; do
    t0=$SECONDS
    env $(v6env $var) TACA_BWD_SM90_KERNEL=v6 timeout 240 python3 -m pytest -q tests/test_cuda.py tests/test_cuda_bwd.py tests/test_cuda_features.py > "$OUT/pytest_$var.txt" 2>&1
    echo "tests (v6 writer $var): $(tail -1 "$OUT/pytest_$var.txt") ($((SECONDS - t0)) s)"; grep -E "^(FAILED|ERROR)|Error" "$OUT/pytest_$var.txt" | head -8
  done
fi
if has sanitize; then
  t0=$SECONDS
  for var in ${SVARS:-$VARS}; do for tool in memcheck racecheck $SAN_EXTRA; do
    env $(v6env $var) TACA_BWD_SM90_KERNEL=v6 timeout 150 compute-sanitizer --tool $tool --kernel-name kns=taca_bwd python3 tests/cuda_harness/sanitize_fwd.py > /tmp/san_v6_$tool.txt 2>&1
    echo "v6 (writer $var) $tool rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|calls done' /tmp/san_v6_$tool.txt | tr '\n' ' ') ($((SECONDS - t0)) s)"
    grep -B2 -A3 -m2 -E "^========= (Invalid|Race|Error)" /tmp/san_v6_$tool.txt | head -14
  done; done
  # is the v6 racecheck report about its lse2 / delta ring a tool limitation? the pattern alone:
  mkdir -p build && nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Icsrc/cuda \
    tests/cuda_harness/bulkring_racecheck.cu -o build/bulkring_racecheck \
    && for m in lane0 all; do compute-sanitizer --tool racecheck build/bulkring_racecheck $m > /tmp/san_bulkring.txt 2>&1
  echo "racecheck on the bulk-ring probe: $(grep -E 'RACECHECK SUMMARY|mismatches' /tmp/san_bulkring.txt | tr '\n' ' ')"; done
fi
if has bench; then
  timeout 200 python3 benchmarks/bench_bwd_handoff.py --rounds 3 --modes "$MODES" --out "$OUT" 2>&1 | tail -5 > /tmp/bench.txt
fi
if has attn; then
  TACA_BWD_SM90_KERNEL=v6 timeout 200 python3 benchmarks/bench_attention_gpu.py --quick --shapes flux1024_b1,sd35m_cfg,flux1024_b2 \
    --methods "taca|split" --out /tmp/attn --tag v6 2>&1 | grep "^|" | grep -v "plain_eff" > /tmp/attn.txt
  cp /tmp/attn/*.json "$OUT/" 2>/dev/null
fi
if has prof; then
  for k in $PROF; do
    t0=$SECONDS; kf=${k//:/_}$PROF_ARGS
    # "v6", "v5" or "v6:<variant>"
    if [ "${k%%:*}" = v6 ]; then export TACA_BWD_SM90_KERNEL=v6; else export TACA_BWD_SM90_KERNEL=v5; fi
    unset TACA_BWD_V6_WRITER
    if [ "$k" != "${k#v6:}" ]; then export $(v6env ${k#v6:}); fi
    timeout 150 ncu --clock-control none --kernel-name regex:taca_bwd_sm90 --launch-skip 1 --launch-count 1 \
      --set full --import-source no -f -o /tmp/prof_$kf python3 benchmarks/bwd_profile_once.py $PROF_ARGS > /tmp/ncu_${kf}_run.txt 2>&1
    echo "ncu $kf rc=$? ($((SECONDS - t0)) s)"
    ncu --import /tmp/prof_$kf.ncu-rep --page details > "$OUT/ncu_${kf}_details.txt" 2>&1
    ncu --import /tmp/prof_$kf.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip -c > "$OUT/ncu_${kf}_sass.csv.gz"
    grep -E "Duration|Compute \(SM\) Throughput|Executed Ipc Active|Issue Slots Busy|Warp Cycles Per Issued|Registers Per|Shared Memory Configuration|No Eligible" "$OUT/ncu_${kf}_details.txt" | head -12
  done
  unset TACA_BWD_SM90_KERNEL TACA_BWD_V6_WRITER
fi
cat /tmp/attn.txt /tmp/bench.txt 2>/dev/null
} 2>&1 | tee "$OUT/log.txt"
