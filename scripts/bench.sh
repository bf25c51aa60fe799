#!/bin/bash
# The bench protocol of ../shared/bench/README.md (a 1-GPU proxy of the 8xH100 run):
#   scripts/bench.sh NAME SEED [VAR=VALUE ...]
# Needs BENCH_DATA_DIR (set by `source .bench/device_prep.sh`). Everything the run writes
# (logs/NAME.txt, the artifact, the checkpoint, console.txt) goes to ${BENCH_RUNS:-/tmp/runs}/NAME.
# NPROC=4 runs the same protocol on 4 GPUs (same global batch: grad accumulation 2).
set -u
name=$1; seed=$2; shift 2
code=${BENCH_CODE:-$(pwd)/train_gpt.py}
dir=${BENCH_RUNS:-/tmp/runs}/$name
mkdir -p "$dir" && cd "$dir" || exit 1
env SEED="$seed" ITERATIONS=241 MAX_WALLCLOCK_SECONDS=0 RECUR_START_STEP=140 MUON_MOMENTUM_WARMUP_STEPS=70 \
  EMA_DECAY=0.93 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50 MUON_WD=0.090 EMBED_WD=0.090 QK_GAIN_INIT=4.0 \
  DATA_DIR="$BENCH_DATA_DIR/" RUN_ID="$name" PYTHONUNBUFFERED=1 "$@" \
  torchrun --standalone --nproc_per_node="${NPROC:-1}" "$code" > console.txt 2>&1
rc=$?
echo "exit_code: $rc" >> console.txt
exit $rc
