#!/usr/bin/env bash
# Issue 15 in one device call on a machine with N >= 2 GPUs (nvidia-h200-x2 / -x4 / -x8), from the repo root
# with .whl carried (diffusers is not on the device image):
#   build the extension; write a FluxPipeline with FLUX.1-dev's transformer (random bf16 weights) and synthetic
#   1024x1024 data (bench_multi_gpu.py make); taca train (TACA on, LoRA rank 16, gradient checkpointing) on one
#   GPU with the global batch, with DDP on N GPUs and with FSDP2 (examples/accelerate_fsdp2.yaml) on N GPUs;
#   taca eval generate on one process and on N; then bench_multi_gpu.py report (JSON + table).
# TINY=1 runs the same on this machine's CPUs: the demo's tiny FLUX, 2 gloo processes, FSDP2 through
# tests/fsdp_cpu.py (accelerate selects FSDP only on GPUs). Env: OUT, W (work folder), STEPS (default
# "build make train eval report"), TRAIN_STEPS (16), B (batch per process, 1), NPROC (default: the GPUs).
# Estimated ~8-10 min on 2 GPUs (build ~2, the 24 GB model ~1.5, three trainings with loading ~1.5 each, eval ~1):
# if a call would pass the 10-minute limit, split it, STEPS="build make train" then STEPS="eval report" with
# the same W, in calls less than 30 s apart (the machine keeps /tmp only while it stays warm).
set -o pipefail
OUT=${OUT:-/tmp/out}; W=${W:-/tmp/mgpu}; mkdir -p "$OUT" "$W/runs"
TINY=${TINY:-0}; TRAIN_STEPS=${TRAIN_STEPS:-16}; B=${B:-1}
STEPS=${STEPS:-"build make train eval report"}
has() { [[ " $STEPS " == *" $1 "* ]]; }
# NVLink multicast off in NCCL, PyTorch and NVSHMEM, as the device machines require
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ] && [ "$TINY" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site
fi
PY=${PY:-python3}
if [ "$TINY" = 1 ]; then
  NPROC=${NPROC:-2}; RES=32; DEV="--device cpu"; MP=no; EXTRA="--max-sequence-length 16 --rank 4 --lr 1e-3"
  MAKE="--tiny --n-images 16 --resolution 32"; FSDP_ENTRY="tests/fsdp_cpu.py"; export OMP_NUM_THREADS=1
  EVAL="--height 32 --width 32 --steps 4 --max-sequence-length 16 --dtype fp32"
else
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}; RES=1024; DEV=""; MP=bf16; EXTRA="--gradient-checkpointing"
  MAKE="--n-images $((NPROC * B * TRAIN_STEPS)) --resolution 1024"; FSDP_ENTRY="-m taca"
  EVAL="--height 512 --width 512 --steps 8 --max-sequence-length 64"
fi
GB=$((NPROC * B))
{
[ "$TINY" = 1 ] || nvidia-smi -L
$PY -c "import torch, diffusers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
echo "processes $NPROC, batch $B per process (global $GB), $TRAIN_STEPS steps at ${RES}x${RES}"
if has build && [ "$TINY" != 1 ]; then
  t0=$SECONDS
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 $PY -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build_ext.txt" 2>&1
  echo "extension build rc=$? ($((SECONDS - t0)) s)"; tail -1 "$OUT/build_ext.txt"
fi
if has make; then
  t0=$SECONDS; $PY benchmarks/bench_multi_gpu.py make --out "$W" $MAKE; echo "make rc=$? ($((SECONDS - t0)) s)"
fi
common="--model $W/model --data $W/data --resolution $RES --max-steps $TRAIN_STEPS --mixed-precision $MP --report-to none --checkpoint-every 1000 --cache-dir $W/cache $DEV $EXTRA"
launch() {  # launch LAYOUT PORT ARGS...: accelerate launch for ddp / fsdp, plain python for one
  local layout=$1 port=$2; shift 2
  case $layout in
    one) $PY -m taca "$@" ;;
    ddp) $PY -m accelerate.commands.launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision $MP \
           --dynamo_backend no --main_process_port "$port" -m taca "$@" ;;
    fsdp) $PY -m accelerate.commands.launch --config_file examples/accelerate_fsdp2.yaml --num_processes "$NPROC" \
           --mixed_precision $MP --main_process_port "$port" $FSDP_ENTRY "$@" ;;
  esac
}
if has train; then
  port=29611
  for layout in one ddp fsdp; do
    d=$W/runs/train/$layout; rm -rf "$d"
    if [ $layout = one ]; then bs=$GB; world=1; else bs=$B; world=$NPROC; fi
    t0=$SECONDS
    launch $layout $port train $common --out "$d" --batch-size $bs 2>&1 | tr '\r' '\n' | grep "taca train: [A-Z]" | tail -4
    echo "train $layout rc=$? ($((SECONDS - t0)) s)"; echo $world > "$d/world.txt"; port=$((port + 1))
  done
fi
if has eval; then
  rm -rf "$W/runs/eval"; mkdir -p "$W/runs/eval"
  ev="eval generate --model $W/model --categories color,spatial --limit-prompts $((NPROC * 2)) --images-per-prompt 2 --taca $EVAL --no-progress"
  # each process prints "[process r] generated n in t s" (model loading excluded): the report reads these logs
  launch one 0 $ev --out "$W/runs/eval/one" > "$W/runs/eval_one.log" 2>&1; echo "eval one process rc=$?"
  launch ddp 29631 $ev --out "$W/runs/eval/n" > "$W/runs/eval_n.log" 2>&1; echo "eval $NPROC processes rc=$?"
  grep -h "generated" "$W/runs/eval_one.log" "$W/runs/eval_n.log"
fi
if has report; then
  $PY benchmarks/bench_multi_gpu.py report --work "$W" --out "$OUT"
  for layout in one ddp fsdp; do [ -f "$W/runs/train/$layout/log.jsonl" ] && cp "$W/runs/train/$layout/log.jsonl" "$OUT/train_$layout.jsonl"; done
fi
} 2>&1 | tee "$OUT/log.txt"
