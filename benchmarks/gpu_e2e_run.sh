#!/usr/bin/env bash
# One device call (about 8 min): end to end after a kernel change. Build; one transformer call and the 28-step
# schedule of SD3.5-Large- and FLUX.1-dev-sized transformers, stock vs TACA (bench_pipeline.py); the LoRA training
# step of SD3.5-Medium- and FLUX.1-dev-sized transformers, stock vs taca (bench_train_step.py), SD3 first (the D = 64
# kernels changed). NEW_MODELS=1 adds the FLUX.2-dev- and Qwen-Image-sized training steps (their taca train families)
# and a FLUX.1-Kontext-dev edit step with one reference; OLD=0 skips the SD3.5 / FLUX steps (NEW_MODELS=1 OLD=0 fits
# one 600 s call: about 2 min build + 6 min).
# Run: run(command="bash benchmarks/gpu_e2e_run.sh", carry=[".whl"]); files under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
source benchmarks/gpu_build.sh  # (reused on a warm machine when the sources match)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ "${OLD:-1}" = 1 ]; then
timeout 150 python3 benchmarks/bench_train_step.py --models sd35m --batches 1,4 --methods stock,taca --out "$OUT" \
  > "$OUT/train_sd3.txt" 2>&1; echo "train sd35m rc=$?"; grep "^|" "$OUT/train_sd3.txt"
timeout 150 python3 benchmarks/bench_pipeline.py --models sd3,flux --repeats 8 --schedule-repeats 2 --out "$OUT/pipeline" \
  > "$OUT/pipeline.txt" 2>&1; echo "pipeline rc=$?"; grep -A4 "^model" "$OUT/pipeline.txt"
timeout 130 python3 benchmarks/bench_train_step.py --models flux --batches 1 --methods stock,taca --out "$OUT" \
  > "$OUT/train_flux.txt" 2>&1; echo "train flux rc=$?"; grep "^|" "$OUT/train_flux.txt"
fi
if [ "${NEW_MODELS:-0}" = 1 ]; then  # FLUX.2-dev- (32B) and Qwen-Image-sized (20B) LoRA training steps, batch 1
  timeout 260 python3 benchmarks/bench_train_step.py --models qwenimage,flux2 --batches 1 --methods stock,taca \
    --rounds 3 --steps 4 --out "$OUT" > "$OUT/train_new.txt" 2>&1; echo "train new rc=$?"; grep "^|" "$OUT/train_new.txt"
  # a FLUX.1-Kontext-dev edit step (one 1024 px reference: 8192 image tokens; taca train's reference path)
  timeout 180 python3 benchmarks/bench_train_step.py --models kontext --batches 1 --methods stock,taca \
    --rounds 3 --steps 4 --out "$OUT/kontext" > "$OUT/train_kontext.txt" 2>&1; echo "train kontext rc=$?"
  grep "^|" "$OUT/train_kontext.txt"
fi
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
