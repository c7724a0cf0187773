#!/usr/bin/env bash
# One GPU call for issue 12: build the extension (sm_90a), the CUDA tests of the op's new features
# (per-sample spans, image-only queries, masks, grouped KV heads, float64 scalars: auto must route
# them exactly, forced cuda must refuse them) and of the changed launchers, compute-sanitizer
# memcheck on the forward harness, then one denoising step of FLUX.2-dev- and Qwen-Image-sized
# transformers (benchmarks/bench_models_step.py). Run from the repo root with .whl carried:
#   run(command="bash benchmarks/gpu_models_run.sh", carry=[".whl"], timeout_s=600)
# Env: STEPS (default "build test bench sanitize"), OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build test bench sanitize"}
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so
has() { [[ " $STEPS " == *" $1 "* ]]; }
{
nvidia-smi -L; python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
if has build; then
  t0=$SECONDS; mkdir -p build
  (python3 tests/cuda_harness/taca_ctypes.py "$TACA_CUDA_LIB" > "$OUT/build_ctypes.txt" 2>&1; echo "ctypes lib rc=$?") &
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build_ext.txt" 2>&1
  echo "extension build rc=$? ($((SECONDS - t0)) s)"; tail -2 "$OUT/build_ext.txt"
  wait; python3 -c "import torch, taca, taca._C; print('taca._C has_cuda:', torch.ops.taca.has_cuda())" || true
fi
if has test; then
  t0=$SECONDS
  timeout 180 python3 -m pytest -q -rs tests/test_cuda_features.py tests/test_cuda.py tests/test_cuda_bwd.py > "$OUT/pytest.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.txt" | tail -20
  timeout 90 python3 -m pytest -q -rs tests/test_ops.py tests/test_bad_input.py tests/test_ops_compile.py tests/test_ops_features.py -k "cuda or CUDA" > "$OUT/pytest_more.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_more.txt" | tail -20
  echo "tests done ($((SECONDS - t0)) s)"
fi
if has bench; then
  timeout 200 python3 benchmarks/bench_models_step.py --out "$OUT" 2>&1 | grep -v "^$\|Warning\|warn(" | tail -8
fi
if has sanitize; then
  t0=$SECONDS
  timeout 90 compute-sanitizer --tool memcheck --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fwd.py > "$OUT/sanitize_memcheck.txt" 2>&1
  echo "sanitizer memcheck rc=$?: $(grep -E 'ERROR SUMMARY|kernel calls done' "$OUT/sanitize_memcheck.txt" | tr '\n' ' ') ($((SECONDS - t0)) s)"
fi
} 2>&1 | tee "$OUT/log.txt"
