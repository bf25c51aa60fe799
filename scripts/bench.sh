#!/bin/bash
# The bench protocol, a 1-GPU proxy of the 8xH100 run (the default configuration, 241 steps):
#   BENCH_DATA_DIR=DIR scripts/bench.sh NAME SEED [VAR=VALUE ...]
# Only the length-dependent settings are scaled (steps, momentum warm-up, EMA horizon); looping
# and warm-down are fractions of training, so they scale by themselves. The PR #1285 anchor's
# protocol also set QK_GAIN_INIT=4.0 MUON_WD=0.090 EMBED_WD=0.090 (its record's values): pass
# them as VAR=VALUE to rerun it.
# BENCH_DATA_DIR is the bench data: a DATA_DIR holding datasets/ and tokenizers/. Everything the
# run writes (logs/NAME.txt, the artifact, the checkpoint, console.txt) goes to
# ${BENCH_RUNS:-/tmp/runs}/NAME. NPROC=4 runs the same protocol on 4 GPUs (same global batch:
# grad accumulation 2). BENCH_CODE: the train_gpt.py to run (default ./train_gpt.py).
set -u
usage() {
  echo "usage: BENCH_DATA_DIR=DIR [NPROC=N] [BENCH_RUNS=DIR] scripts/bench.sh NAME SEED [VAR=VALUE ...]" >&2
  exit 2
}
source "$(dirname "$0")/args.bash" || exit 2
[ $# -ge 2 ] || usage
name=$1; seed=$2; shift 2
[[ $name =~ ^[A-Za-z0-9._-]+$ ]] || { echo "bench.sh: NAME '$name': use letters, digits, '.', '_' or '-'" >&2; usage; }
[[ $seed =~ ^[0-9]+$ ]] || { echo "bench.sh: SEED '$seed' is not a number" >&2; usage; }
need_var_values "" "$@"
need_bench_data
[ -d "$BENCH_DATA_DIR" ] || { echo "bench.sh: BENCH_DATA_DIR=$BENCH_DATA_DIR is not a directory" >&2; exit 2; }
code=${BENCH_CODE:-$(pwd)/train_gpt.py}
[ -f "$code" ] || { echo "bench.sh: no train_gpt.py at $code (run from the project root or set BENCH_CODE)" >&2; exit 2; }
dir=${BENCH_RUNS:-/tmp/runs}/$name
mkdir -p "$dir" && cd "$dir" || exit 1
env SEED="$seed" ITERATIONS=241 MAX_WALLCLOCK_SECONDS=0 MUON_MOMENTUM_WARMUP_STEPS=70 \
  EMA_DECAY=0.93 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50 \
  DATA_DIR="$BENCH_DATA_DIR/" RUN_ID="$name" PYTHONUNBUFFERED=1 "$@" \
  torchrun --standalone --nproc_per_node="${NPROC:-1}" "$code" > console.txt 2>&1
rc=$?
echo "exit_code: $rc" >> console.txt
exit $rc
