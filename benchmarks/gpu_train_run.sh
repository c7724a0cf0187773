#!/usr/bin/env bash
# One GPU call for `taca train` (issue 10), run through the device tool from the repo root with
# .whl carried (diffusers is not on the device image):
#   build the extension for sm_90a; a short real training of a tiny FLUX through the CLI (bf16,
#   taca's CUDA kernels), resumed once, its adapter loaded with taca.enable; then the training-step
#   benchmark (FLUX.1-dev-sized and SD3.5-Medium-sized, TACA against stock attention).
# Env: STEPS (default "build tiny bench"), BENCH_ARGS, OUT (files that come back).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build tiny bench"}
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
has() { [[ " $STEPS " == *" $1 "* ]]; }
{
nvidia-smi -L; python3 -c "import torch, diffusers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
if has build; then
  t0=$SECONDS
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build_ext.txt" 2>&1
  echo "extension build rc=$? ($((SECONDS - t0)) s)"; tail -2 "$OUT/build_ext.txt"
  python3 -c "import torch, taca, taca._C; print('taca._C has_cuda:', torch.ops.taca.has_cuda())" || true
fi
if has tiny; then
  t0=$SECONDS
  W=/tmp/tinytrain; rm -rf $W; mkdir -p $W
  python3 - <<'EOF'
import os, numpy as np
from PIL import Image
from taca.demo import build_tiny_flux_pipeline
build_tiny_flux_pipeline(seed=0).save_pretrained("/tmp/tinytrain/flux")
rng = np.random.default_rng(0)
os.makedirs("/tmp/tinytrain/data")
for i in range(32):
    a = np.zeros((48, 40, 3), np.uint8) + rng.integers(0, 256, 3).astype(np.uint8)
    a[8:30, 6:26] = rng.integers(0, 256, 3).astype(np.uint8)
    Image.fromarray(a).save(f"/tmp/tinytrain/data/{i:03d}.png")
    open(f"/tmp/tinytrain/data/{i:03d}.txt", "w").write(f"a square of color {i % 5} on a plain background")
EOF
  common="--model $W/flux --data $W/data --out $W/out --resolution 32 --batch-size 8 --max-sequence-length 32 --mixed-precision bf16 --lr 1e-3 --rank 8 --checkpoint-every 20 --report-to none"
  python3 -m taca train $common --max-steps 20 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | grep "taca train: [a-zA-Z]" | tail -6
  python3 -m taca train $common --max-steps 40 --resume latest 2>&1 | tr '\r' '\n' | grep "taca train: [a-zA-Z]" | tail -3
  echo "tiny CLI training: rc=$? ($((SECONDS - t0)) s)"; cp $W/out/log.jsonl "$OUT/tiny_train_log.jsonl"; cp $W/out/loss.png "$OUT/tiny_train_loss.png"
  python3 - <<'EOF'
import json, torch, taca
from diffusers import DiffusionPipeline
log = [json.loads(l) for l in open("/tmp/tinytrain/out/log.jsonl")]
print(f"tiny log: {len(log)} steps, loss first 5 mean {sum(r['loss'] for r in log[:5])/5:.4f}, last 5 mean "
      f"{sum(r['loss'] for r in log[-5:])/5:.4f}, median s/step {sorted(r['s_per_step'] for r in log)[len(log)//2]:.4f}, "
      f"min sigma {min(r['sigma_min'] for r in log):.4f}")
pipe = DiffusionPipeline.from_pretrained("/tmp/tinytrain/flux", torch_dtype=torch.bfloat16).to("cuda")
pipe.set_progress_bar_config(disable=True)
kw = dict(prompt="a square of color 3 on a plain background", height=32, width=32, num_inference_steps=28,
          max_sequence_length=32, output_type="pt")
base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
with taca.enabled(pipe, gamma=1.2, lora="/tmp/tinytrain/out") as h:
    on = pipe(generator=torch.Generator().manual_seed(0), **kw).images
after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
print(f"tiny generate with the trained adapter (cuda, bf16): max |TACA+LoRA - stock| = {float((on - base).abs().max()):.4f}, "
      f"stock again bit-identical: {torch.equal(after, base)}")
EOF
fi
if has bench; then
  python3 benchmarks/bench_train_step.py --out "$OUT" $BENCH_ARGS 2>&1 | grep -v "^$" > "$OUT/bench_train.txt"
  echo "bench rc=$?"; grep -v "^{" "$OUT/bench_train.txt" | tail -20
fi
} 2>&1 | tee "$OUT/log.txt"
