#!/usr/bin/env bash
# Timing switches of one build compared across processes: each process times ONE mode of
# bench_bwd_handoff.py (backward alone, every shape of $SHAPES), the modes alternate process by process for
# $ROUNDS rounds, and a table gives every mode's per-round times and their median. In-process comparisons
# between modes carried offsets of up to 2% that followed the mode's position, not its kernel
# (ab_H200_20261204_run4/: the same kernel under two names); here every mode runs in a fresh process with the
# same allocation sequence as the others' of its kind.
#   run(command="bash benchmarks/gpu_modes_xproc.sh", carry=[".whl"], timeout_s=600)
# Env: MODES (default "v6,v6@s6,v6:tensor,v6@g3"), SHAPES (default flux1024_b1,flux1024_b2,sd35m_cfg), ROUNDS (3),
# BUILD=0 to use an existing in-place build, APPLY=FILE.patch to apply a patch to the tree first (a prepared
# experiment in one call: `git show af35c58:benchmarks/results/prepared_dkv_every_kernel.patch` was one), OUT.
# Shapes take "+kmask" (a bool key mask: bench_bwd_handoff.py) for the masked kernels.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODES=${MODES:-v6,v6@s6,v6:tensor,v6@g3}
SHAPES=${SHAPES:-flux1024_b1,flux1024_b2,sd35m_cfg}
ROUNDS=${ROUNDS:-3}
{
if [ -n "${APPLY:-}" ]; then git apply "$APPLY" && echo "applied $APPLY" || { echo "git apply $APPLY failed"; exit 1; }; fi
if [ "${BUILD:-1}" = 1 ]; then STEPS=build OUT=/tmp/hw bash benchmarks/gpu_features_run.sh 2>&1 | grep -E "rc=|has_cuda"; fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for r in $(seq 1 "$ROUNDS"); do
  mkdir -p "$OUT/r$r"
  for m in ${MODES//,/ }; do
    timeout 100 python3 benchmarks/bench_bwd_handoff.py --rounds 1 --modes "$m" --shapes "$SHAPES" \
      --out "$OUT/r$r/$m" > "$OUT/r$r/$m.txt" 2>&1 || echo "round $r mode $m: rc=$?"
  done
done
python3 - "$OUT" "$MODES" "$ROUNDS" <<'PY'
import json, os, statistics, sys
out, modes, rounds = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
t = {}
for r in range(1, rounds + 1):
    for m in modes:
        p = os.path.join(out, f"r{r}", m, "bench_bwd_handoff.json")
        if not os.path.exists(p):
            continue
        res = json.load(open(p))
        for shape, v in res["shapes"].items():
            t.setdefault(shape, {}).setdefault(m, []).append(v["ms"][m])
json.dump(t, open(os.path.join(out, "modes_xproc.json"), "w"), indent=1)
print("backward alone, ms, one mode per process; per round, then the median (ratio to the first mode)")
print("| shape | " + " | ".join(modes) + " |")
print("|---|" + "---|" * len(modes))
for shape, v in t.items():
    base = statistics.median(v[modes[0]]) if v.get(modes[0]) else None
    cells = []
    for m in modes:
        x = v.get(m, [])
        if not x:
            cells.append("-")
            continue
        med = statistics.median(x)
        ratio = f" ({med / base:.3f})" if base else ""
        cells.append(" / ".join(f"{y:.3f}" for y in x) + f" -> **{med:.3f}**{ratio}")
    print(f"| {shape} | " + " | ".join(cells) + " |")
PY
} 2>&1 | tee "$OUT/log.txt"
bash benchmarks/pack_out.sh "$OUT"
