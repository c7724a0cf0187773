#!/usr/bin/env bash
# One device call (about 7-8 min): the v6 backward's CTA pairs (TACA_BWD_PAIR=1, opt-in). Build (reused on a warm
# machine); one pair backward under a 60 s timeout first (a hang stops the call there); test_sm90_v6_pair and the
# default v6 tests; memcheck + racecheck of sanitize_bwd_pair.py and racecheck of the hand-off alone
# (pair_relay_racecheck.cu, pull / push / async); bench_bwd_handoff.py at FLUX 1024 b1 / b2 (and FLUX 2048 b1 with
# LONG=1): v6 (default), v6@pr (pairs, rank 0 pulls), v6@p3 / v6@p4 (rank 1 pushes; by st.async), v6@p2 (pull
# without the peer's loads: a diagnostic, wrong dQ), v6@s2@pr (pairs in 2 chains), v6+nd (unordered), 5 rotated rounds. First run
# (twenty-seventh session): the first form, with cluster-scope waits in the MMA threads, 49% slower; the relay
# forms (cluster scope in relay lanes only) since. Then, where a pair form is faster than the default at FLUX 1024
# b1 and b2 by 1% or more, fwd+bwd against cuDNN with and without it (FB=0: not).
# Run: run(command="bash benchmarks/gpu_bwd_pair_run.sh", carry=[".whl"]).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
source benchmarks/gpu_build.sh  # (reused on a warm machine when the sources match)
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site:$PWD/tests/cuda_harness PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
rc=0
for m in 1 2 3 4; do [ $rc = 0 ] || break; TACA_BWD_PAIR=$m timeout 60 python3 - <<'PY' || rc=$?
import torch, taca
q, k, v = (torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
o = taca.joint_attention(q, k, v, text_len=512, gamma=1.2, backend="cuda")
o.backward(torch.ones_like(o)); torch.cuda.synchronize()
import os; print("pair smoke", os.environ["TACA_BWD_PAIR"], "ok, dq finite", bool(torch.isfinite(q.grad).all()))
PY
done; echo "smoke rc=$rc"
if [ $rc = 0 ]; then
  timeout 240 python3 -m pytest -q tests/test_cuda_bwd.py -k "pair or v6_kernel or dq_overlap or matches_reference" \
    > "$OUT/pytest.txt" 2>&1; echo "pytest: $(tail -1 "$OUT/pytest.txt")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -12
  source benchmarks/gpu_sanitize.sh
  sanitize tests/cuda_harness/sanitize_bwd_pair.py taca_bwd pair
  # the hand-off alone (tests/cuda_harness/pair_relay_racecheck.cu): does racecheck follow it?
  nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Icsrc/cuda tests/cuda_harness/pair_relay_racecheck.cu \
    -o build/pair_relay_racecheck && for m in pull push async; do timeout 60 compute-sanitizer --tool racecheck \
    build/pair_relay_racecheck $m > "$OUT/probe.$m.txt" 2>&1
    echo "pair relay probe $m: $(grep -E 'RACECHECK SUMMARY|mismatches' "$OUT/probe.$m.txt" | tr '\n' ' ')"; done
  timeout 200 python3 benchmarks/bench_bwd_handoff.py --shapes flux1024_b1,flux1024_b2$([ "${LONG:-0}" = 1 ] && echo ,flux2048_b1) \
    --modes v6,v6@pr,v6@p3,v6@p4,v6@p2,v6@s2@pr,v6+nd --rounds "${ROUNDS:-5}" --out "$OUT" > "$OUT/bench.txt" 2>&1; echo "bench rc=$?"; tail -5 "$OUT/bench.txt"
  # the fastest correct pair form (1, 3 or 4) where it beats the default at FLUX 1024 b1 and b2: fwd+bwd against
  # cuDNN with it and without (bench_attention_gpu.py, one process each)
  best=$(python3 - "$OUT/bench_bwd_handoff.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))["shapes"]
except Exception:
    sys.exit(0)
forms = {"v6@pr": "1", "v6@p3": "3", "v6@p4": "4"}
ms = lambda m: max(d[s]["ms"][m] / d[s]["ms"]["v6"] for s in ("flux1024_b1", "flux1024_b2"))
ok = [m for m in forms if all(m in d[s]["ms"] for s in ("flux1024_b1", "flux1024_b2")) and ms(m) < 0.99]
print(forms[min(ok, key=ms)] if ok else "")
PY
)
  echo "pair form faster than the default at FLUX 1024 b1 and b2 (by 1% or more): ${best:-none}"
  if [ -n "$best" ] && [ "${FB:-1}" = 1 ]; then
    for pr in "" "$best"; do
      TACA_BWD_PAIR=$pr timeout 150 python3 benchmarks/bench_attention_gpu.py --methods "taca" \
        --shapes flux1024_b1,flux1024_b2 --out "$OUT" --tag "pair${pr:-0}" > "$OUT/fb_pair${pr:-0}.txt" 2>&1
      echo "fwd+bwd TACA_BWD_PAIR=${pr:-unset} rc=$?"; grep "^|" "$OUT/fb_pair${pr:-0}.txt" | grep -v plain_eff | cut -c1-150
    done
  fi
fi
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
