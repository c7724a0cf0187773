#!/usr/bin/env bash
# One-call GPU script for `taca eval` (run through the device tool from the repo root):
#   (a) e2e: taca eval generate (baseline + TACA) + score blip-vqa + score clip + report through the CLI,
#       on a tiny random-weight FLUX pipeline with tiny BLIP/CLIP scorers built and saved on the fly;
#   (b) throughput: a FLUX.1-dev-sized random-weight FluxPipeline, 1024x1024, 28 steps, batch 1 and 4,
#       TACA off/on, images/s and the extrapolated cost of a 3000-image category.
# Env: PARTS (default "e2e throughput"), REPEATS (timed calls per configuration, default 1),
#      BUILD=1 builds the CUDA extension first (as gpu_run.sh's build step) so TACA uses its kernels;
#      OUT (folder whose files come back; default /tmp/out); TINY=1 PY=.venv/bin/python: CPU smoke test.
# About 3-5 minutes of GPU time with the defaults (building 12B random weights, 4 x 28-step calls).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PARTS=${PARTS:-"e2e throughput"}
# diffusers wheels carried in .whl (the device image has none)
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
nvidia-smi -L; "${PY:-python3}" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
if [ "${BUILD:-0}" = 1 ]; then
  t0=$SECONDS
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build_ext.txt" 2>&1
  echo "extension build rc=$? ($((SECONDS - t0)) s)"
fi
for part in $PARTS; do
  t0=$SECONDS
  "${PY:-python3}" benchmarks/bench_eval_throughput.py --part "$part" --repeats "${REPEATS:-1}" --out "$OUT" ${TINY:+--tiny} \
    > "$OUT/eval_$part.txt" 2> "$OUT/eval_$part.stderr.txt"
  echo "$part rc=$? ($((SECONDS - t0)) s)"
  grep -E "^  (\\$|batch)" "$OUT/eval_$part.stderr.txt" | cut -c1-300
done
for part in $PARTS; do cat "$OUT/eval_$part.txt"; done  # the short tables, last
} 2>&1 | tee "$OUT/log.txt"
