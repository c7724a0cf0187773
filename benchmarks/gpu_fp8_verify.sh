#!/usr/bin/env bash
# Run: run(command="bash benchmarks/gpu_fp8_verify.sh", carry=[".whl"]); a lean check of a committed tree:
# the extension alone (no ctypes library), then the FP8 tests and the 16-bit forward's op tests (test_cuda.py,
# test_cuda_features.py through the public op) within TIMEOUT seconds (default 150).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
t0=$SECONDS
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build_ext.txt" 2>&1
echo "extension build rc=$? ($((SECONDS - t0)) s)"
timeout "${TIMEOUT:-150}" python3 -m pytest -q -x tests/test_cuda_fp8.py tests/test_cuda.py tests/test_cuda_features.py \
  > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?"; tail -2 "$OUT/pytest.txt"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -5
} 2>&1 | tee "$OUT/log.txt"
