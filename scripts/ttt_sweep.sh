#!/bin/bash
# Eval-only sweep of TTT/ETLB settings on one artifact (bench protocol data):
#   [GPUS="0 1 2 3"] [SEED=1337] [SWEEP_NAME=sweep] scripts/ttt_sweep.sh ARTIFACT "VAR=V VAR=V" "VAR=V" ...
# Needs BENCH_DATA_DIR: `source .bench/device_prep.sh` in the same shell first. Each config
# runs roundtrip + TTT+ETLB only (sliding off) and prints its final line. With GPUS, configs
# run in waves of one per listed GPU (more than one run per GPU slows the CPU-side stages of
# all of them: 8 runs on 4 GPUs once took 263 s to deserialize); without it, one at a time.
# Runs are named ${SWEEP_NAME}1, ${SWEEP_NAME}2, ...: give sweeps that run side by side different names.
set -u
: "${BENCH_DATA_DIR:?is not set: run 'source .bench/device_prep.sh' in this shell first}"
[ $# -ge 1 ] && [ -f "$1" ] || { echo "ttt_sweep.sh: no artifact file at '${1:-}'" >&2; exit 2; }
art=$(readlink -f "$1"); shift
here=$(cd "$(dirname "$0")" && pwd)
read -r -a gpus <<< "${GPUS:-}"
width=${#gpus[@]}
run_one() {  # index, gpu ('' = inherit), config
  local i=$1 g=$2 cfg=$3 n=${SWEEP_NAME:-sweep}$1
  # shellcheck disable=SC2086
  env ${g:+CUDA_VISIBLE_DEVICES=$g} bash "$here/bench.sh" "$n" "${SEED:-1337}" \
    LOAD_ARTIFACT="$art" SLIDING_WINDOW_ENABLED=0 $cfg
  echo "$n [$cfg]${g:+ gpu$g} rc=$?: $(grep -sE '^final_int6_ttt' "${BENCH_RUNS:-/tmp/runs}/$n/console.txt" | cut -c1-90)"
}
i=0
for cfg in "$@"; do
  if [ "$width" -eq 0 ]; then
    i=$((i + 1)); run_one "$i" "" "$cfg"
  else
    g=${gpus[$((i % width))]}
    i=$((i + 1)); run_one "$i" "$g" "$cfg" &
    [ $((i % width)) -eq 0 ] && wait
  fi
done
wait
