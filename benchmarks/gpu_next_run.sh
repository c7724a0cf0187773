#!/usr/bin/env bash
# The next device session's first call, steps in order of priority under one wall-clock deadline (LIMIT seconds,
# default 540), so that a short budget still buys the most important answers. Written after a session (the thirtieth)
# in which no machine could be started (16 failed starts at 90 s each spent the budget).
# Here, first (the experiment applied to csrc; ab.patch untracked, it travels with the tree; do not commit it;
# the thirty-first session ran it with the early-dV and spans-overlap patches, s31_20261206/call1_H200_next/).
# (The thirty-second session verified the three-chain rule with one build instead, gpu_verify_one.sh: when the base
# side of an A/B was measured already, that call is ~140 s shorter.) Usage:
#   git apply benchmarks/results/prepared_X.patch && git diff HEAD -- csrc > ab.patch
#   run(command="LIMIT=540 AB_SHAPES=flux1024_b2,flux1024_b1 bash benchmarks/gpu_next_run.sh", carry=[".whl"],
#       timeout_s=560)
# (ab.patch holds csrc only: the base side of the A/B is HEAD's kernels, the tests are the applied tree's.)
# Steps, each skipped when too little time is left:
#   1. build (gpu_build.sh), the CUDA tests (test_cuda*.py, with whatever the applied patch adds; -rs lists skips),
#      memcheck + racecheck (sanitize_fwd.py);
#   2. the A/B against HEAD (gpu_ab_run.sh VERIFY=0 ATTN=0: outputs and gradients bitwise, out_hash.py; the backward
#      alone, bench_bwd_handoff.py, v6 with v5 as the in-process control; fwd+bwd sustained against cuDNN), two rounds;
# (The thirty-first session's third step, the spans instances' overlap timing, is gpu_overlap_run.sh SPANS=1.)
# Files under $OUT: verify/log.txt, verify/files.tgz (pytest.txt, all.memcheck.txt, all.racecheck.txt), ab/log.txt,
# ab/files.tgz.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LIMIT=${LIMIT:-540}
left() { echo $((LIMIT - SECONDS)); }
[ -f "${BASE_PATCH:-ab.patch}" ] || { echo "no ${BASE_PATCH:-ab.patch}: make it here first (see the header)"; exit 2; }
# step 1: build, CUDA tests, memcheck + racecheck (gpu_verify_one.sh without its timing steps), in $OUT/verify
env -u MODES -u SUS_NSEG OUT="$OUT/verify" LIMIT="$LIMIT" bash benchmarks/gpu_verify_one.sh
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
t=$(( $(left) - 45 )); AB_SHAPES=${AB_SHAPES:-flux1024_b1}
[ "$t" -gt 60 ] && SHAPES=$AB_SHAPES BWD_SHAPES=$AB_SHAPES SUS_SHAPES=$AB_SHAPES MODES=v6,v5 ATTN=0 VERIFY=0 HASH=1 \
  SUSTAINED=1 SUS_PHASES='taca f+b,cudnn f+b' ROUNDS=2 BASE_PATCH=${BASE_PATCH:-ab.patch} OUT=$OUT/ab timeout "$t" \
  bash benchmarks/gpu_ab_run.sh
bash benchmarks/pack_out.sh "$OUT/ab" 2>/dev/null  # also when the deadline cut the A/B short
echo "all done at $SECONDS s"
