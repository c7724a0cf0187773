#!/usr/bin/env bash
# Sourced by the device scripts. sanitize HARNESS KERNELS TAG [TIMEOUT]: compute-sanitizer memcheck, then racecheck
# (SAN_TOOLS: the tools, e.g. "memcheck racecheck synccheck"), of `python3 HARNESS` on the kernels whose names start
# with KERNELS; each tool's output in $OUT/TAG.<tool>.txt, a summary line printed (exit status, seconds, the error /
# hazard summary and the harness's call count).
sanitize() {
  local tool t0 rc
  for tool in ${SAN_TOOLS:-memcheck racecheck}; do
    t0=$SECONDS
    timeout "${4:-150}" compute-sanitizer --tool $tool --kernel-name kns="$2" python3 "$1" > "$OUT/$3.$tool.txt" 2>&1
    rc=$?
    echo "$(basename "$1" .py) $tool (rc $rc, $((SECONDS - t0)) s): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|calls done' \
      "$OUT/$3.$tool.txt" | tr '\n' ' ')"
  done
}
