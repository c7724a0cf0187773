#!/usr/bin/env bash
# A/B timing of the working tree against a base, built side by side in one device call:
#   git diff BASE -- csrc > ab.patch   (here; the file travels with the tree, do not commit it; csrc only,
#   so that both sides run the tree's benchmark scripts)
#   run(command="BASE_PATCH=ab.patch bash benchmarks/gpu_ab_run.sh", carry=[".whl"])
# The working tree ("new") is verified as gpu_verify_run.sh does (QUICK=1, no breakdown: build, CUDA
# tests, memcheck + racecheck); a copy with the patch reversed ("base") is built in /tmp/base meanwhile.
# Then, ROUNDS times, new and base alternate in separate processes: the backward alone
# (bench_bwd_handoff.py, modes $MODES, shapes $BWD_SHAPES) and forward / forward+backward against cuDNN
# (bench_attention_gpu.py --quick, $SHAPES). VERIFY=0 skips the verification (both sides built in place);
# PIPELINE=1 adds bench_pipeline.py on the new tree; BWD=0 skips the backward-alone timing; HASH=1 first compares
# the two sides' outputs and gradients bitwise (benchmarks/out_hash.py: for changes that must not move them);
# SUSTAINED=1 adds bench_sustained.py phases ($SUS_PHASES on $SUS_SHAPES) per side and round; ATTN=0 skips the
# isolated forward / forward+backward against cuDNN. The in-process controls (v5 and cuDNN, which the patch does
# not touch) tell a real difference from the GPU's drift between processes. Files under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PATCH=$PWD/${BASE_PATCH:?set BASE_PATCH to the diff of the tree against the base}
ROUNDS=${ROUNDS:-2}
MODES=${MODES:-v6,v5,v6+nd}
SHAPES=${SHAPES:-flux1024_b1,sd35m_cfg,flux1024_b2}
BWD_SHAPES=${BWD_SHAPES:-flux1024_b1,sd35m_cfg}
{
rm -rf /tmp/base && cp -r . /tmp/base && (cd /tmp/base && patch -s -R -p1 < "$PATCH") || { echo "patch -R failed"; exit 1; }
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
build() { (cd "$1" && TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=8 python3 setup.py build_clib build_ext --inplace \
  > "$OUT/build_$2.txt" 2>&1; echo "$2 build rc=$?"); }
build /tmp/base base &
if [ "${VERIFY:-1}" = 1 ]; then
  QUICK=1 BREAKDOWN=0 OUT="$OUT/new_verify" bash benchmarks/gpu_verify_run.sh 2>&1 | grep -v "^|"
else
  source benchmarks/gpu_build.sh  # reuses a warm machine's build of these sources (build/.srchash)
fi
wait
unset TACA_CUDA_LIB
(cd /tmp/base && python3 -c 'import sys, torch; sys.path.insert(0, "."); import taca._C as c; print("base imports", c.__file__)')
if [ "${HASH:-0}" = 1 ]; then  # outputs that must not move (benchmarks/out_hash.py): both sides' digests, compared
  for side in new base; do d=$PWD; [ $side = base ] && d=/tmp/base
    (cd "$d" && timeout 120 python3 benchmarks/out_hash.py > "$OUT/hash_$side.txt" 2>&1); done
  if cmp -s "$OUT/hash_new.txt" "$OUT/hash_base.txt" && grep -q "fwd" "$OUT/hash_new.txt"; then
    echo "outputs bitwise equal new / base ($(wc -l < "$OUT/hash_new.txt") cases)"
  else echo "OUTPUTS DIFFER new / base:"; diff "$OUT/hash_new.txt" "$OUT/hash_base.txt" | head -12; fi
fi
for r in $(seq 1 "$ROUNDS"); do
  for side in new base; do
    d=$PWD; [ $side = base ] && d=/tmp/base
    [ "${BWD:-1}" = 1 ] && (cd "$d" && timeout 150 python3 benchmarks/bench_bwd_handoff.py --rounds 2 --modes "$MODES" --shapes "$BWD_SHAPES" --out "$OUT/$side$r" 2>&1 \
      | grep -E "^\| [a-z0-9]+_" | sed "s/^/$side$r bwd /")
    [ "${ATTN:-1}" = 1 ] && (cd "$d" && python3 benchmarks/bench_attention_gpu.py --quick --shapes "$SHAPES" --methods "^taca_cuda$" \
      --out "$OUT/$side$r" --tag ab 2>&1 | grep -E "^\| [a-z0-9]+_" | grep -v plain_eff | sed "s/^/$side$r attn /")
    # SUSTAINED=1: the same side back to back under the power cap too (bench_sustained.py, $SUS_PHASES, 3 s each)
    [ "${SUSTAINED:-0}" = 1 ] && (cd "$d" && timeout 200 python3 benchmarks/bench_sustained.py --shapes "${SUS_SHAPES:-flux1024_b1,sd35m_cfg}" \
      --only "${SUS_PHASES:-taca fwd,cudnn fwd}" --seconds 3 --rounds 1 --out "$OUT/${side}${r}_sus" 2>&1 \
      | grep -E "^\| [a-z0-9]+_" | sed "s/^/$side$r sustained /")
  done
done
if [ "${PIPELINE:-0}" = 1 ]; then  # end to end on the new tree (bench_pipeline.py: stock and TACA interleaved)
  timeout 300 python3 benchmarks/bench_pipeline.py --models flux,sd3 --repeats 10 --schedule-repeats 2 \
    --out "$OUT/pipeline" > "$OUT/pipeline.txt" 2>&1; echo "pipeline rc=$?"; grep -A3 "^model" "$OUT/pipeline.txt"
fi
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"  # at most 8 files come back from the device: the rest in files.tgz
