#!/usr/bin/env bash
# One device call for D2 (the D = 64 backward with DF and two dS' buffers, TACA_BWD_V6_D2=1) and the CPU session's
# unverified changes (forty-sixth session): build; D2's bitwise tests (against the default, with and without DF's
# lead); the backward alone one mode per process (v6 = the default, v6@d2) at the D = 64 shapes; memcheck and
# racecheck of sanitize_bwd_d2.py; then the fast path's host cost, the row-range, fast-path and model tests on CUDA.
# Each step is skipped when less than it needs is left of LIMIT seconds; the timing only if D2's tests passed.
#   run(command="LIMIT=560 bash benchmarks/gpu_d2_run.sh", carry=[".whl"], timeout_s=600)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LIMIT=${LIMIT:-560}
left() { echo $((LIMIT - SECONDS)); }
{
export PYTHONPATH=/tmp/site
OUT=$OUT STEPS=build bash benchmarks/gpu_features_run.sh > "$OUT/build_log.txt" 2>&1
nvidia-smi -L; echo "built at $SECONDS s: $(grep -E 'rc=|has_cuda' "$OUT/build_log.txt" | tr '\n' ' ')"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 150 python3 -m pytest -q -rs tests/test_cuda_bwd.py -k "two_ds" > "$OUT/pytest_d2.txt" 2>&1
d2rc=$?
echo "D2 tests rc=$d2rc: $(tail -1 "$OUT/pytest_d2.txt")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_d2.txt" | head -6
if [ "$d2rc" = 0 ] && [ "$(left)" -gt 140 ]; then
  MODES=${MODES:-v6,v6@d2} SHAPES=${SHAPES:-sd35m_cfg,sd35l_cfg} ROUNDS=${ROUNDS:-3} BUILD=0 OUT=$OUT/xproc \
    timeout $(( $(left) - 100 )) bash benchmarks/gpu_modes_xproc.sh 2>&1 | tail -10
fi
if [ "$(left)" -gt 60 ]; then
  source benchmarks/gpu_sanitize.sh; sanitize tests/cuda_harness/sanitize_bwd_d2.py taca_bwd d2 $(( ($(left) - 10) / 2 ))
fi
echo "D2 done at $SECONDS s"
if [ "$(left)" -gt 60 ]; then
  timeout 40 python3 benchmarks/bench_host_cost.py --out "$OUT" > "$OUT/host.txt" 2>&1; tail -7 "$OUT/host.txt"
fi
if [ "$(left)" -gt 30 ]; then
  timeout $(( $(left) - 10 )) python3 -m pytest -q -rs tests/test_ops_fast_path.py tests/test_row_range_mask.py \
    tests/test_models_chroma.py tests/test_models_cogview4.py tests/test_models_glm_image.py tests/test_models_omnigen.py \
    tests/test_models_ideogram4.py tests/test_outer_mask.py tests/test_cuda_features.py > "$OUT/pytest.txt" 2>&1
  echo "tests rc=$?: $(tail -1 "$OUT/pytest.txt")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -8
fi
echo "all done at $SECONDS s"
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT" 2>/dev/null; true
