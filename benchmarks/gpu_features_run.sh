#!/usr/bin/env bash
# One GPU call for the op's features on the CUDA kernels (per-sample spans, image-only queries,
# masks, grouped KV heads): build the extension (sm_90a), the CUDA tests, compute-sanitizer
# memcheck + racecheck on the harness (which now runs the feature paths forward and backward),
# the feature benchmark (kernel vs the split SDPA that ran these before) and the plain-shape
# attention table (no regression of the common path). Run from the repo root with .whl carried:
#   run(command="bash benchmarks/gpu_features_run.sh", carry=[".whl"], timeout_s=600)
# Env: STEPS (default "build test sanitize bench attn"; also attn256), FEAT_ARGS (bench_features_gpu.py), OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build test sanitize bench attn"}
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so
has() { [[ " $STEPS " == *" $1 "* ]]; }
{
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
if has build; then
  t0=$SECONDS; mkdir -p build
  (python3 tests/cuda_harness/taca_ctypes.py "$TACA_CUDA_LIB" > "$OUT/build_ctypes.txt" 2>&1; echo "ctypes lib rc=$?") &
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build_ext.txt" 2>&1
  echo "extension build rc=$? ($((SECONDS - t0)) s)"; tail -2 "$OUT/build_ext.txt"
  wait; python3 -c "import torch, taca, taca._C; print('taca._C has_cuda:', torch.ops.taca.has_cuda())" || true
fi
if has test; then
  t0=$SECONDS
  timeout 240 python3 -m pytest -q -rs tests/test_cuda_features.py > "$OUT/pytest_features.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed|Error|assert" "$OUT/pytest_features.txt" | head -20
  timeout 240 python3 -m pytest -q -rs tests/test_cuda.py tests/test_cuda_bwd.py tests/test_ops_compile.py > "$OUT/pytest_cuda.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_cuda.txt" | tail -10
  echo "tests done ($((SECONDS - t0)) s)"
fi
if has sanitize; then
  t0=$SECONDS
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool $tool --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fwd.py > "$OUT/sanitize_$tool.txt" 2>&1
    echo "sanitizer $tool rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|kernel calls done|skipped' "$OUT/sanitize_$tool.txt" | tr '\n' ' ') ($((SECONDS - t0)) s)"
  done
fi
if has bench; then
  timeout 240 python3 benchmarks/bench_features_gpu.py --out "$OUT" $FEAT_ARGS 2>&1 | grep -v "^$\|Warning\|warn(" | tail -14
fi
if has attn; then
  timeout 200 python3 benchmarks/bench_attention_gpu.py --quick --out "$OUT" --tag features --methods "taca|split" 2>&1 | grep -v "^$" > "$OUT/bench_attn.txt"
  tail -12 "$OUT/bench_attn.txt"
fi
if has attn256; then
  # head dims 256 / 96 (not PERFORMANCE.md shapes): the kernel (Hopper D = 256 forward = ctypes v0,
  # the mma.sync forward = v6, v7 = P V overlap) against plain cuDNN / FA2 / efficient and split
  timeout 300 python3 benchmarks/bench_attention_gpu.py --quick --out "$OUT" --tag d256 --variants \
    --shapes auraflow_cfg,ideogram4_cfg,d96_cfg --methods 'taca_cuda|taca_ctypes_v(0|6|7)$|split' 2>&1 \
    | grep -v "^$" > "$OUT/bench_attn256.txt"
  tail -24 "$OUT/bench_attn256.txt"
fi
} 2>&1 | tee "$OUT/log.txt"
