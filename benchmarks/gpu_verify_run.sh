#!/usr/bin/env bash
# Run: run(command="bash benchmarks/gpu_verify_run.sh", carry=[".whl"]); files under $OUT.
# lean verification of the bulk default: build, CUDA tests, memcheck, bwd per hand-off, fwd+bwd vs cuDNN
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 200 python3 -m pytest -q tests/test_cuda_bwd.py tests/test_cuda_features.py tests/test_cuda.py > "$OUT/pytest.txt" 2>&1; tail -1 "$OUT/pytest.txt"
timeout 150 compute-sanitizer --tool memcheck --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fwd.py > "$OUT/memcheck.txt" 2>&1; grep -E "ERROR SUMMARY|calls done" "$OUT/memcheck.txt" | tr '\n' ' '; echo
python3 benchmarks/bench_bwd_handoff.py --rounds 3 --modes "v5,v6,v5+nd,v6+nd" --out "$OUT" 2>&1 | tail -4
python3 benchmarks/bench_attention_gpu.py --quick --shapes flux1024_b1,sd35m_cfg,flux1024_b2 --methods "taca|split" --out "$OUT" --tag final 2>&1 | grep "^|" | grep -v "plain_eff"
} 2>&1 | tee "$OUT/log.txt"
