#!/usr/bin/env bash
# Pretrain the miniature (taca.mini) on the GPU machine: one call of at most 10 minutes, resuming
# from the checkpoint carried in, writing the next checkpoint and its logs to $OUT.
#
# Run through the device tool from the repository root, carrying the diffusers wheels and the
# checkpoint folder (absent on the first call: training starts from scratch):
#   run(command="bash benchmarks/mini_pretrain_gpu.sh", carry=[".whl", "runs/mini"], timeout_s=600)
# then copy the returned files into runs/mini/ (replacing what is there) for the next call:
#   mkdir -p runs/mini && cp <files_at>/* runs/mini/
# runs/mini (~45 MiB: model, EMA, optimizer, state, logs) + the wheels must stay under carry's 64 MiB.
#
# Files back (7, each < 16 MiB): model.safetensors, ema.safetensors, optim.safetensors,
# state.json, log.jsonl (the whole history: loss and judge accuracy against steps),
# train.log (this call's output), samples.png (EMA generations, a row per category, framed
# green/red by the judge).
#
# Env: CKPT (checkpoint folder to resume from, default runs/mini), DEVICE (default cuda), BUDGET (seconds of training
# before saving, default 480: leaves room for start-up, the final eval and the copy back),
# ARGS (extra arguments for python -m taca.mini.pretrain, e.g. "--compile" or
# "--cooldown-start 12000 --total-steps 16000"), OUT (default /tmp/out).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CKPT=${CKPT:-runs/mini}
BUDGET=${BUDGET:-480}
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
resume=()
if [ -f "$CKPT/state.json" ]; then resume=(--resume "$CKPT"); fi
{
nvidia-smi -L
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
# the data and the judge on the training device: ground truth must score 1.0 there too
python3 -c "
import torch, time
from taca.mini import data as D, judge as J
dev = '${DEVICE:-cuda}'
t = time.time(); b = D.SceneSampler(seed=123, device=dev).batch(2000, captions=True); t1 = time.time() - t
t = time.time(); acc = J.accuracy(J.judge(b.images, b.captions)); t2 = time.time() - t
print(f'judge on {dev} GT renders: all {acc[\"all\"][\"acc\"]:.4f} (n={acc[\"all\"][\"n\"]}); render 2000 {t1:.2f} s, judge {t2:.2f} s')
"
echo "resume: ${resume[*]:-(from scratch)}  budget: ${BUDGET}s  args: ${ARGS}"
# shellcheck disable=SC2086
python3 -m taca.mini.pretrain --out "$OUT" "${resume[@]}" --device "${DEVICE:-cuda}" --max-seconds "$BUDGET" --no-progress \
  --log-every 100 --eval-every 2000 $ARGS
echo "pretrain rc=$?"
python3 -m taca.mini.pretrain samples --ckpt "$OUT" --out "$OUT/samples.png" --per-category 12 --device "${DEVICE:-cuda}"
python3 - "$OUT/log.jsonl" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
tr = [r for r in recs if r["kind"] == "train"]
for r in tr[-5:]:
    print(f"step {r['step']:6d} loss {r['loss']:.4f} lr {r['lr']:.2e} s/step {r.get('s_per_step', '-')}")
for r in [r for r in recs if r["kind"] == "eval"][-4:]:
    print(f"eval step {r['step']} guidance {r['guidance']}: " + " ".join(f"{k} {v['acc']:.3f}" for k, v in r["accuracy"].items()))
PY
ls -la "$OUT"
} 2>&1 | grep -v "Writing model shards\|Loading weights\|Loading pipeline components" | tee "$OUT/train.log"
