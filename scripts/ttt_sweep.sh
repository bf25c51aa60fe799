#!/bin/bash
# Eval-only sweep of score-first TTT settings on one artifact (bench protocol data):
#   scripts/ttt_sweep.sh ARTIFACT "VAR=V VAR=V" "VAR=V" ...
# Each config runs roundtrip + TTT+ETLB only (sliding off) and prints its final line.
set -u
art=$(readlink -f "$1"); shift
here=$(cd "$(dirname "$0")" && pwd)
i=0
for cfg in "$@"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  bash "$here/bench.sh" "sweep$i" 1337 LOAD_ARTIFACT="$art" SLIDING_WINDOW_ENABLED=0 $cfg
  echo "sweep$i [$cfg]: $(grep -E '^final_int6_ttt' "${BENCH_RUNS:-/tmp/runs}/sweep$i/console.txt" | cut -c1-90)"
done
