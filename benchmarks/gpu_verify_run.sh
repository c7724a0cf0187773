#!/usr/bin/env bash
# Run: run(command="bash benchmarks/gpu_verify_run.sh", carry=[".whl"]); files under $OUT.
# Lean verification of the default kernels: build, CUDA tests, memcheck + racecheck (and the racecheck
# probes), the Hopper backward per kernel (v5 / v6, deterministic or not), fwd+bwd against cuDNN.
# Env: QUICK=1 (short timing windows, three shapes) or the full table of every PERFORMANCE.md shape;
# TRAIN=1 adds the FLUX.1-dev-sized LoRA training step (stock attention vs taca, batch 1 and 4);
# VARIANTS=1 the forward's variants 0, 10 (persistent), 14 (one CTA per item), 15 / 16 (wider key tiles), 17 (three
# consumer warpgroups at D = 64: the default there), 18 (D = 64's two-consumer default before), 19 / 20 (D = 128: three
# consumers on 64-key tiles) in one process;
# BREAKDOWN=0 skips the per-kernel times of a fwd + bwd iteration (taca vs cuDNN, bwd_breakdown.py; BREAKDOWN_SHAPES
# picks its shapes, default flux1024_b1,sd35m_cfg); PIPELINE=1 adds the FLUX.1-dev-sized transformer call and 28-step
# schedule, stock and TACA interleaved (bench_pipeline.py). TRAIN=1 PIPELINE=1 re-measures both end-to-end numbers
# of the kernel issue in the same call (about 500 s in all).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 280 python3 -m pytest -q tests/test_cuda_bwd.py tests/test_cuda_features.py tests/test_cuda.py > "$OUT/pytest.txt" 2>&1; tail -1 "$OUT/pytest.txt"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -8
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fwd.py > "$OUT/$tool.txt" 2>&1
  echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|calls done' "$OUT/$tool.txt" | tr '\n' ' ')"
done
mkdir -p build && nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Icsrc/cuda \
  tests/cuda_harness/bulkring_racecheck.cu -o build/bulkring_racecheck \
  && for m in lane0 all; do compute-sanitizer --tool racecheck build/bulkring_racecheck $m 2>&1 \
    | grep -E "RACECHECK SUMMARY|mismatches" | tr '\n' ' '; echo; done
python3 benchmarks/bench_bwd_handoff.py --rounds 3 --modes "v6,v6:rows,v6:tensor,v5,v6+nd" --out "$OUT" 2>&1 | tail -4
if [ "${QUICK:-0}" = 1 ]; then
  python3 benchmarks/bench_attention_gpu.py --quick --shapes flux1024_b1,sd35m_cfg,flux1024_b2 --methods "taca|split" --out "$OUT" --tag verify 2>&1 | grep "^|" | grep -v "plain_eff"
else
  python3 benchmarks/bench_attention_gpu.py --methods "taca|split" --out "$OUT" --tag verify 2>&1 | grep -v "^$" > "$OUT/bench.txt"; grep "^|" "$OUT/bench.txt" | grep -v plain_eff
fi
if [ "${VARIANTS:-0}" = 1 ]; then  # forward variants in one process: 0 (the default), 10 (persistent, 128-key tiles),
  # 14 (one CTA per item), 15 / 16 (wider key tiles), 17 (D = 64: three consumer warpgroups, 192-row CTAs, = 0; at
  # D = 128 the default again), 18 (D = 64: 10, 15 or 16 by key count), 19 / 20 (D = 128: three consumers, 64-key tiles)
  python3 benchmarks/bench_attention_gpu.py --quick --no-bwd --variants --methods "taca_ctypes_v(0|10|14|15|16|17|18|19|20)$" \
    --shapes flux1024_b1,flux1024_b2,sd35m_cfg,sd35l_cfg,flux2048_b1,sd35m_cfg_768,sd35m_cfg_1536,sd35m_cfg_2048 \
    --out "$OUT" --tag variants 2>&1 | grep "^|" | grep -E "ctypes|cudnn" | grep -v plain_eff
fi
if [ "${BREAKDOWN:-1}" = 1 ]; then  # per-kernel device times against cuDNN (bwd_breakdown.py, about 30 s)
  timeout 150 python3 benchmarks/bwd_breakdown.py --shapes "${BREAKDOWN_SHAPES:-flux1024_b1,sd35m_cfg}" --out "$OUT" \
    > "$OUT/breakdown.txt" 2>&1
  grep -E "total|us  " "$OUT/breakdown.txt" | grep -v "CUDAFunctor_add" | cut -c1-120
fi
if [ "${TRAIN:-0}" = 1 ]; then  # the LoRA training step, FLUX.1-dev size (bench_train_step.py), stock vs taca
  timeout 240 python3 benchmarks/bench_train_step.py --models flux --batches 1,4 --methods stock,taca --out "$OUT" 2>&1 \
    | grep -v "^$" > "$OUT/bench_train.txt"; echo "train bench rc=$?"; grep "^|" "$OUT/bench_train.txt"
fi
if [ "${PIPELINE:-0}" = 1 ]; then  # a FLUX.1-dev-sized transformer call and the 28-step schedule (bench_pipeline.py)
  timeout 200 python3 benchmarks/bench_pipeline.py --models flux --repeats 10 --schedule-repeats 2 --out "$OUT/pipeline" \
    > "$OUT/pipeline.txt" 2>&1; echo "pipeline rc=$?"; grep -A3 "^model" "$OUT/pipeline.txt"
fi
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"  # at most 8 files come back from the device: the rest in files.tgz
