#!/bin/bash
# Eval-only sweep of evaluation settings (TTT_LR, TTT_EPOCHS, ETLB_LR, NGRAM_*, ...) on one artifact,
# with the bench data (scripts/bench.sh):
#   BENCH_DATA_DIR=DIR [GPUS="0 1 2 3"] [SEED=1337] [SWEEP_NAME=sweep] scripts/ttt_sweep.sh ARTIFACT "VAR=V VAR=V" "VAR=V" ...
# Each quoted config is one run (LOAD_ARTIFACT=ARTIFACT plus its settings: the default evaluation);
# its final_score line is printed. With GPUS, configs run in waves of one per listed GPU (more than
# one run per GPU slows the CPU-side stages of all of them); without it, one at a time.
# Runs are named ${SWEEP_NAME}1, ${SWEEP_NAME}2, ...: give sweeps that run side by side different names.
set -u
usage() {
  echo "usage: BENCH_DATA_DIR=DIR [GPUS=\"0 1 ...\"] [SEED=N] [SWEEP_NAME=NAME] scripts/ttt_sweep.sh ARTIFACT \"VAR=V ...\" [\"VAR=V ...\" ...]" >&2
  exit 2
}
source "$(dirname "$0")/args.bash" || exit 2
[ $# -ge 2 ] || usage
need_bench_data
need_artifact "$1"
art=$(readlink -f "$1"); shift
for cfg in "$@"; do
  read -r -a kvs <<< "$cfg"
  [ ${#kvs[@]} -ge 1 ] || { echo "ttt_sweep.sh: an empty config" >&2; usage; }
  need_var_values "in config '$cfg'" "${kvs[@]}"
done
here=$(cd "$(dirname "$0")" && pwd)
read -r -a gpus <<< "${GPUS:-}"
width=${#gpus[@]}
run_one() {  # index, gpu ('' = inherit), config
  local i=$1 g=$2 cfg=$3 n=${SWEEP_NAME:-sweep}$1
  # shellcheck disable=SC2086
  env ${g:+CUDA_VISIBLE_DEVICES=$g} bash "$here/bench.sh" "$n" "${SEED:-1337}" LOAD_ARTIFACT="$art" $cfg
  echo "$n [$cfg]${g:+ gpu$g} rc=$?: $(grep -sE '^final_score ' "${BENCH_RUNS:-/tmp/runs}/$n/console.txt" | cut -c1-120)"
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
