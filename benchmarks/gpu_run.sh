#!/usr/bin/env bash
# One-call GPU script (run through the device tool from the repo root):
#   build the extension + the ctypes forward library, CUDA tests, compute-sanitizer, benchmark.
# Steps: wgmma (standalone Hopper layout check), build, test, sanitize, bench, pipeline (not default).
# Env: STEPS (default "wgmma build test sanitize bench"), BENCH_ARGS (args for the benchmark; default "--rounds 3":
#      the fast methods timed in three rotated rounds, medians kept: one pass left FLUX 2048's fwd+bwd cells 10% apart),
#      PYTEST_K (a pytest -k expression), OUT (folder whose files come back; default /tmp/out).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"wgmma build test sanitize bench"}
BENCH_ARGS=${BENCH_ARGS-"--rounds 3"}
# diffusers wheels carried in .whl (the device image has none)
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site; fi
export PYTHONUNBUFFERED=1 TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so HF_HUB_OFFLINE=1
has() { [[ " $STEPS " == *" $1 "* ]]; }
{
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
if has wgmma; then
  mkdir -p build
  nvcc -std=c++17 -O2 -Icsrc -Icsrc/cuda -gencode=arch=compute_90a,code=sm_90a tests/cuda_harness/wgmma_check.cu \
    -o build/wgmma_check 2>&1 | tail -3 && build/wgmma_check
fi
if has build; then
  t0=$SECONDS; mkdir -p build
  (python3 tests/cuda_harness/taca_ctypes.py "$TACA_CUDA_LIB" > "$OUT/build_ctypes.txt" 2>&1; echo "ctypes lib rc=$?") &
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build_ext.txt" 2>&1
  echo "extension build rc=$? ($((SECONDS - t0)) s)"; tail -5 "$OUT/build_ext.txt"
  grep "taca setup" "$OUT/build_ext.txt"  # setup.py's compiler choice (the /opt/gcc _C.so crashed on C++ errors)
  wait; echo "builds done ($((SECONDS - t0)) s)"
  python3 -c "import torch, taca, taca._C; print('taca._C has_cuda:', torch.ops.taca.has_cuda())" || true
fi
if has test; then
  t0=$SECONDS
  tests="tests/test_cuda.py tests/test_cuda_bwd.py"
  python3 -m pytest -q -rs $tests ${PYTEST_K:+-k "$PYTEST_K"} > "$OUT/pytest.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.txt" | tail -30
  # CUDA cases of the CPU-first suites (compile, analysis, processors)
  python3 -m pytest -q -rs tests/test_ops_compile.py tests/test_analysis.py tests/test_processors.py tests/test_pipeline.py -k "cuda or CUDA" > "$OUT/pytest_more.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_more.txt" | tail -30
  echo "tests done ($((SECONDS - t0)) s)"
fi
if has sanitize; then
  t0=$SECONDS
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fwd.py > "$OUT/sanitize_$tool.txt" 2>&1
    echo "sanitizer $tool rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|kernel calls done' "$OUT/sanitize_$tool.txt" | tr '\n' ' ')"
  done
  # does racecheck model named barriers? (a race-free hand-off; see the file's header)
  mkdir -p build && nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a tests/cuda_harness/namedbar_racecheck.cu -o build/namedbar_racecheck \
    && compute-sanitizer --tool racecheck build/namedbar_racecheck > "$OUT/sanitize_namedbar.txt" 2>&1
  echo "racecheck on the named-barrier probe: $(grep -E 'RACECHECK SUMMARY|mismatches' "$OUT/sanitize_namedbar.txt" | tr '\n' ' ')"
  echo "sanitize done ($((SECONDS - t0)) s)"
fi
if has bench; then
  python3 benchmarks/bench_attention_gpu.py --out "$OUT" $BENCH_ARGS 2>&1 | grep -v "^$" > "$OUT/bench.txt"
  echo "bench rc=$?"; cat "$OUT/bench.txt"
fi
if has pipeline; then  # end to end: per-step (bare transformer) and whole 28-step pipeline calls
  python3 benchmarks/bench_pipeline.py --out "$OUT" --repeats 10 --schedule-repeats 2 2>&1 | tail -4
  python3 benchmarks/bench_pipeline_loop.py --out "$OUT" --rounds 2 2>&1 | grep -v Siglip | tail -3
fi
} 2>&1 | tee "$OUT/log.txt"
