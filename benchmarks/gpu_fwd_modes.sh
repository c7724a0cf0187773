#!/usr/bin/env bash
# The forward's timing switches across processes: each process times ONE mode (bench_fwd_modes.py: taca's forward and
# plain cuDNN's in that process), the modes alternate process by process for $ROUNDS rounds, then a table of each
# mode's median ms and its speed against cuDNN (the median over rounds of the per-process ratios).
#   run(command="bash benchmarks/gpu_fwd_modes.sh", carry=[".whl"])
# Env: MODES (default "base,pvw0"): "base" the defaults, else "+"-joined switches: pvw (TACA_FWD_PVW=1), pvw0
# (TACA_FWD_PVW=0: lz without PVW too), lz (TACA_FWD_LZ=1: IL and the lazy max), ov0 / ov1 (TACA_FWD_OVERLAP=0 / 1), sp0
# (TACA_FWD_SPLIT=0), turn (TACA_FWD_TURN=1: the consumers' turn across items); SHAPES (default
# flux1024_b1,flux1024_b2,flux2048_b1; a name may end in +spans or +mask, bench_fwd_modes.py), ROUNDS (3), BUILD=0 to reuse an in-place build (gpu_build.sh reuses a matching one anyway), TESTS
# (a pytest -k expression, e.g. "forms or overlap or split": those CUDA tests first, into $OUT/tests.txt; TEST_FILES the
# test files, default tests/test_cuda.py, and with MEMCHECK (another -k expression) compute-sanitizer memcheck over
# those, into $OUT/memcheck.txt; their tails go into the log), OUT. The log is $OUT/log.txt (tee): redirect the call's
# other output elsewhere.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODES=${MODES:-base,pvw0}
SHAPES=${SHAPES:-flux1024_b1,flux1024_b2,flux2048_b1}
ROUNDS=${ROUNDS:-3}
menv() {  # mode -> env assignments
  local m=$1 e=""
  [ "$m" = base ] && { echo ""; return; }
  for s in ${m//+/ }; do
    case $s in
      pvw) e="$e TACA_FWD_PVW=1" ;;
      pvw0) e="$e TACA_FWD_PVW=0" ;;
      lz) e="$e TACA_FWD_LZ=1" ;;
      ov0) e="$e TACA_FWD_OVERLAP=0" ;;
      ov1) e="$e TACA_FWD_OVERLAP=1" ;;
      sp0) e="$e TACA_FWD_SPLIT=0" ;;
      turn) e="$e TACA_FWD_TURN=1" ;;
      *) echo "unknown switch $s in mode $m" >&2; return 1 ;;
    esac
  done
  echo "$e"
}
{
if [ "${BUILD:-1}" = 1 ]; then source benchmarks/gpu_build.sh; fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
if [ -n "${TESTS:-}" ]; then
  python3 -m pytest -q ${TEST_FILES:-tests/test_cuda.py} -k "$TESTS" > "$OUT/tests.txt" 2>&1; echo "tests ($TESTS): rc=$?"; tail -4 "$OUT/tests.txt"
fi
if [ -n "${MEMCHECK:-}" ]; then
  # (the profiler records no kernels under compute-sanitizer: the tests skip their kernel-name checks there)
  TACA_TEST_KERNEL_NAMES=0 compute-sanitizer --tool memcheck python3 -m pytest -q -x ${TEST_FILES:-tests/test_cuda.py} -k "$MEMCHECK" > "$OUT/memcheck.txt" 2>&1
  echo "memcheck ($MEMCHECK): rc=$?"; tail -3 "$OUT/memcheck.txt"
fi
for r in $(seq 1 "$ROUNDS"); do
  mkdir -p "$OUT/r$r"
  for m in ${MODES//,/ }; do
    e=$(menv "$m") || exit 1
    env $e timeout 150 python3 benchmarks/bench_fwd_modes.py --shapes "$SHAPES" --out "$OUT/r$r/$m" > "$OUT/r$r/$m.txt" 2>&1 ||
      { echo "round $r mode $m: rc=$?"; tail -3 "$OUT/r$r/$m.txt"; }
  done
done
python3 - "$OUT" "$MODES" "$ROUNDS" <<'PY'
import json, os, statistics, sys
out, modes, rounds = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
t = {}
for r in range(1, rounds + 1):
    for m in modes:
        p = os.path.join(out, f"r{r}", m, "bench_fwd_modes.json")
        if os.path.exists(p):
            for s, c in json.load(open(p))["shapes"].items():
                t.setdefault(s, {}).setdefault(m, []).append((c["taca"], c["cudnn"]))
print("| shape | mode | taca ms per round | median | cuDNN ms median | speed vs cuDNN (median of rounds) | vs " + modes[0] + " |")
print("|---|---|---|---|---|---|---|")
for s, bym in t.items():
    base = statistics.median(x for x, _ in bym.get(modes[0], [(float("nan"), 1)]))
    for m, xs in bym.items():
        med = statistics.median(x for x, _ in xs)
        print(f"| {s} | {m} | {' / '.join(f'{x:.4f}' for x, _ in xs)} | {med:.4f} | {statistics.median(c for _, c in xs):.4f} | "
              f"{statistics.median(c / x for x, c in xs):.3f}x | {med / base:.3f} |")
json.dump(t, open(os.path.join(out, "modes.json"), "w"), indent=1)
PY
} 2>&1 | tee "$OUT/log.txt"
