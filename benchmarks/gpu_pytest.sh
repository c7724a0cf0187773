#!/usr/bin/env bash
# Sourced by the device scripts. pytest_step TAG TIMEOUT LABEL PYTEST_ARGS...: `python3 -m pytest -q PYTEST_ARGS` under
# `timeout TIMEOUT`, its output in $OUT/TAG.txt, one summary line printed (LABEL, the exit status, the seconds, the
# failures and the counts).
pytest_step() {
  local tag=$1 limit=$2 label=$3 rc t0=$SECONDS
  shift 3
  timeout "$limit" python3 -m pytest -q "$@" > "$OUT/$tag.txt" 2>&1
  rc=$?
  echo "$label rc=$rc ($((SECONDS - t0)) s): $(grep -E '^(FAILED|ERROR)|passed|failed|skipped|Error' "$OUT/$tag.txt" | tail -6 | tr '\n' ' ')"
}
