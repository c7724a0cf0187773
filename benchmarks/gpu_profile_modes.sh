#!/usr/bin/env bash
# Sourced-build device step: Nsight Compute (full set, source counters) on one v6 backward main kernel per
# (mode, shape), each mode an environment setting of the same build, then tools/ncu_sass_phases.py's split of
# the MMA warps' tile loop. PROFILES is a space-separated list of NAME:SHAPE[:VAR=VALUE[,VAR=VALUE]] with SHAPE
# d128 (FLUX 1024 b1) or d64 (SD3.5-M CFG), as bwd_profile_once.py takes them; each profile's files go to
# $OUT/ncu_NAME_*. Written for the thirty-seventh session: where the DS default's cycles went (d128), and why
# DS lost at D = 64 (d64 with TACA_BWD_V6_DS=1 against the default).
#   PROFILES="ds:d128 d0:d128:TACA_BWD_V6_DS=0 d64:d64 d64ds:d64:TACA_BWD_V6_DS=1" bash benchmarks/gpu_profile_modes.sh
# Packs $OUT at the end (pack_out.sh: the device tool brings back 8 files; the first run lost six profiles to
# that limit); PACK=0 leaves it to the caller.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for p in ${PROFILES:-"ds:d128"}; do
  IFS=: read -r name shape envs <<< "$p"
  t0=$SECONDS
  arg=""; [ "$shape" = d64 ] && arg=d64
  env ${envs//,/ } timeout 120 ncu --clock-control none --kernel-name regex:taca_bwd_sm90 --launch-skip 1 --launch-count 1 \
    --set full --import-source no -f -o "/tmp/prof_$name" python3 benchmarks/bwd_profile_once.py $arg > "$OUT/ncu_${name}_run.txt" 2>&1
  echo "ncu $name ($shape ${envs:-default}) rc=$? ($((SECONDS - t0)) s)"
  ncu --import "/tmp/prof_$name.ncu-rep" --page details > "$OUT/ncu_${name}_details.txt" 2>&1
  ncu --import "/tmp/prof_$name.ncu-rep" --page source --csv --print-source sass 2>/dev/null | gzip -c > "$OUT/ncu_${name}_sass.csv.gz"
  python3 tools/ncu_sass_phases.py "$OUT/ncu_${name}_sass.csv.gz" > "$OUT/ncu_${name}_phases.md" 2>&1
  grep -E "^  [a-zA-Z_].*\(|Duration|Registers Per|Issue Slots Busy" "$OUT/ncu_${name}_details.txt" | head -5
  gzip -f "$OUT/ncu_${name}_details.txt"
done
[ "${PACK:-1}" = 1 ] && bash benchmarks/pack_out.sh "$OUT"
true
