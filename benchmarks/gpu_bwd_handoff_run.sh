#!/usr/bin/env bash
# gpu_bwd_handoff_run.sh: one device call for the Hopper backward's dQ hand-offs
# (TACA_BWD_SM90_HANDOFF = bulk (default) / mbarrier / mbarrier-eager / rendezvous / arrive / none, see
# csrc/cuda/taca_bwd_sm90.cu). Run from the repo root: OUT=... bash benchmarks/gpu_bwd_handoff_run.sh
# Env: SMOKE_MODES (modes smoke-tested; a mode that fails or hangs is left out of the rest),
#      SAN_EXTRA ("mode:tool ..." sanitizer runs of the backward kernels besides the default's),
#      BENCH_MODES (modes timed, the default first).
#   1. build (gpu_run.sh's build step: extension + ctypes forward library)
#   2. smoke: one small multi-tile backward per mode under a timeout (a hang drops that mode below)
#   3. in parallel (nothing is timed here): pytest test_cuda.py + test_cuda_bwd.py, memcheck and
#      racecheck of sanitize_fwd.py with the default hand-off, the SAN_EXTRA runs
#   4. alone: bench_attention_gpu.py --quick (fwd+bwd of the public op vs FA2 / cuDNN) and
#      bench_bwd_handoff.py (bwd alone per mode, interleaved, bitwise comparison)
# Files back in $OUT: log.txt, pytest.txt, sanitize.txt, bench.txt, bench_bwd_handoff.json.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/hw; mkdir -p $W
export PYTHONUNBUFFERED=1 TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so HF_HUB_OFFLINE=1
{
STEPS=build OUT=$W bash benchmarks/gpu_run.sh
SMOKE_MODES=${SMOKE_MODES:-"bulk mbarrier mbarrier-eager rendezvous arrive none"}
SAN_EXTRA=${SAN_EXTRA:-"mbarrier:racecheck mbarrier-eager:racecheck rendezvous:racecheck arrive:racecheck none:racecheck"}
BENCH_MODES=${BENCH_MODES:-"bulk mbarrier mbarrier-eager rendezvous arrive none"}
ok=""; bad=""
for m in $SMOKE_MODES; do
  if TACA_BWD_SM90_HANDOFF=$m timeout 40 python3 -c "
import torch, taca
torch.manual_seed(0)
q, k, v = (torch.randn(1, 2, 700, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
o = taca.joint_attention(q, k, v, text_len=77, gamma=1.2, layout='bhnd', backend='cuda')
o.backward(torch.randn_like(o)); torch.cuda.synchronize(); print('smoke $m ok', float(q.grad.float().abs().sum()))
"; then ok="$ok $m"; else echo "smoke $m FAILED or hung: dropped"; bad="$bad $m"; fi
done
echo "smoke passed:$ok; failed:${bad:- none}"
deselect=""; for m in $bad; do deselect="$deselect and not $m"; done
t0=$SECONDS
timeout 150 python3 -m pytest -q -rs tests/test_cuda.py tests/test_cuda_bwd.py ${deselect:+-k "${deselect# and }"} > $W/pytest.txt 2>&1 &
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fwd.py > $W/san_default_$tool.txt 2>&1 &
done
for mt in $SAN_EXTRA; do
  m=${mt%%:*}; tool=${mt#*:}
  [[ " $bad " == *" $m "* ]] && continue
  TACA_BWD_SM90_HANDOFF=$m timeout 150 compute-sanitizer --tool $tool --kernel-name kns=taca_bwd_sm90_kernel python3 tests/cuda_harness/sanitize_fwd.py > $W/san_${m}_$tool.txt 2>&1 &
done
wait
echo "tests + sanitizers done ($((SECONDS - t0)) s)"
cp $W/pytest.txt "$OUT/"; grep -E "^(FAILED|ERROR)|passed|failed" $W/pytest.txt | tail -20
for f in $W/san_*.txt; do echo "== $(basename $f)"; cat $f; done > "$OUT/sanitize.txt"
for f in $W/san_*.txt; do echo "$(basename $f .txt): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|kernel calls done' $f | tr '\n' ' ')"; done
python3 benchmarks/bench_attention_gpu.py --quick --shapes flux1024_b1,sd35m_cfg --methods taca --out $W 2>&1 | grep -v "^$" > "$OUT/bench.txt"
echo "bench rc=$?"; tail -25 "$OUT/bench.txt"
bm=""; for m in $BENCH_MODES; do [[ " $bad " == *" $m "* ]] || bm="$bm $m"; done
python3 benchmarks/bench_bwd_handoff.py --rounds 3 --modes "$bm" --out "$OUT" 2>&1 | tail -8
} 2>&1 | tee "$OUT/log.txt"
