#!/usr/bin/env bash
# The whole miniature in one GPU call (issue 14): pretrain the base model from scratch (or resume a
# checkpoint carried in CKPT), export it, train a TACA LoRA and the control LoRA on it with
# `taca train`, then the experiment (python -m taca.mini.experiment: baseline, training-free gamma,
# both LoRAs, text mass per step). Run through the device tool from the repo root, carrying .whl:
#   run(command="bash benchmarks/mini_full_gpu.sh", carry=[".whl"], timeout_s=600)
# Files back: ckpt/ (the pretraining checkpoint: model, ema, optim, state.json, log.jsonl),
# all.tgz (the exported pipeline, both LoRAs with their logs, the experiment's results), log.txt.
# Env: PRE_SECONDS (pretraining wall-clock budget, default 270), CKPT (resume from), N (LoRA
# training images, default 8192), LORA_STEPS (default 150), LORA_BATCH (256), LORA_LR (5e-4),
# PER_CAT (experiment prompts per category, default 500), DEVICE (cuda), OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; W=${W:-/tmp/miniw}; mkdir -p "$OUT/ckpt" "$W"
DEVICE=${DEVICE:-cuda}
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PY=${PY:-python3}
quiet() { tr '\r' '\n' | grep -v "it/s\]$\|s/it\]$\|Writing model shards\|Loading weights\|Loading pipeline components\|^$"; }
{
nvidia-smi -L 2>/dev/null; "$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
t0=$SECONDS
resume=(); [ -n "$CKPT" ] && [ -f "$CKPT/state.json" ] && resume=(--resume "$CKPT")
# shellcheck disable=SC2086
timeout $(( ${PRE_SECONDS:-270} + 120 )) "$PY" -m taca.mini.pretrain --out "$OUT/ckpt" "${resume[@]}" --device "$DEVICE" \
  --max-seconds "${PRE_SECONDS:-270}" --no-progress --log-every 100 --eval-every 2000 --eval-per-category 100 $PRE_ARGS 2>&1 | quiet | tail -4
echo "pretrain rc=$? ($((SECONDS - t0)) s)"
"$PY" - "$OUT/ckpt/log.jsonl" <<'PYEOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
tr = [r for r in recs if r["kind"] == "train"]
print(f"pretrain: {tr[-1]['step']} steps, last loss {tr[-1]['loss']:.4f}, s/step {tr[-1].get('s_per_step', '-')}")
for r in [r for r in recs if r["kind"] == "eval"][-2:]:
    print(f"  eval step {r['step']} guidance {r['guidance']}: " + " ".join(f"{k} {v['acc']:.3f}" for k, v in r["accuracy"].items()))
PYEOF
"$PY" -m taca.mini.pretrain export --ckpt "$OUT/ckpt" --out "$W/mini" 2>&1 | quiet | tail -1
"$PY" -m taca.mini.data folder --out "$W/data" --n "${N:-8192}" --seed 7 | tail -1
common=(--model "$W/mini" --data "$W/data" --resolution 32 --batch-size "${LORA_BATCH:-256}" --max-steps "${LORA_STEPS:-150}"
        --lr "${LORA_LR:-5e-4}" --rank 16 --mixed-precision "${LORA_PRECISION:-bf16}" --cache-dir "$W/cache" --report-to none
        --checkpoint-every 100000 --seed 0)
[ "$DEVICE" = cpu ] && common+=(--device cpu)
for kind in taca control; do
  t1=$SECONDS
  extra=(); [ $kind = control ] && extra=(--no-taca)
  "$PY" -m taca train "${common[@]}" --out "$W/lora-$kind" "${extra[@]}" 2>&1 | quiet | grep "taca train: [A-Za-z]" | tail -3
  "$PY" -c "import json,sys; r=[json.loads(l) for l in open('$W/lora-$kind/log.jsonl')]; print('lora-$kind: %d steps, loss first10 %.4f last10 %.4f, median s/step %.3f' % (len(r), sum(x['loss'] for x in r[:10])/10, sum(x['loss'] for x in r[-10:])/10, sorted(x['s_per_step'] for x in r)[len(r)//2]))"
  echo "lora-$kind ($((SECONDS - t1)) s)"
done
t1=$SECONDS
"$PY" -m taca.mini.experiment --pipeline "$W/mini" --taca-lora "$W/lora-taca" --control-lora "$W/lora-control" \
  --out "$W/exp" --per-category "${PER_CAT:-500}" --device "$DEVICE" 2>&1 | quiet
echo "experiment ($((SECONDS - t1)) s); total $((SECONDS - t0)) s"
"$PY" -m taca.mini.pretrain samples --ckpt "$OUT/ckpt" --out "$W/exp/samples.png" --per-category 12 --device "$DEVICE" 2>&1 | quiet | tail -1
rm -rf "$W/lora-taca/cache" "$W/lora-control/cache" "$W/lora-taca/checkpoints" "$W/lora-control/checkpoints"
tar czf "$OUT/all.tgz" -C "$W" mini lora-taca lora-control exp && ls -la "$OUT" "$OUT/ckpt"
} 2>&1 | tee "$OUT/log.txt"
