#!/bin/bash
# Full-size evaluation timing on a stand-in validation set as long as the real one (timing only:
# the artifact was trained on these tokens, so the scores mean nothing):
#   BENCH_DATA_DIR=DIR [NPROC=4] [LONGVAL_TOKENS=45514753] scripts/long_val_timing.sh ARTIFACT [VAR=V ...]
# BENCH_DATA_DIR is the bench data (datasets/ and tokenizers/). Writes ${LONGVAL_DIR:-/tmp/longval}
# whose validation shard is the first LONGVAL_TOKENS tokens of the bench's training shard (default:
# the 45,514,752 targets + 1 of the FineWeb validation set, 1,389 TTT chunks), or with
# LONGVAL_SOURCE=val the bench's validation documents repeated to that length (the real documents'
# lengths, which set the per-document LoRA TTT's cost; the training shard holds whole books), then runs the default
# evaluation of ARTIFACT on NPROC GPUs as run longval_np$NPROC (scripts/bench.sh); its stage:* and
# eval_time_total lines are the measurement.
set -u
usage() {
  echo "usage: BENCH_DATA_DIR=DIR [NPROC=N] [LONGVAL_TOKENS=N] scripts/long_val_timing.sh ARTIFACT [VAR=VALUE ...]" >&2
  exit 2
}
source "$(dirname "$0")/args.bash" || exit 2
[ $# -ge 1 ] || usage
need_bench_data
need_artifact "$1"
art=$(readlink -f "$1"); shift
here=$(cd "$(dirname "$0")" && pwd)
out=${LONGVAL_DIR:-/tmp/longval}
src=$(ls "$BENCH_DATA_DIR"/datasets/fineweb10B_sp*/fineweb_train_000000.bin 2>/dev/null | head -1)
[ -n "$src" ] || { echo "long_val_timing.sh: no training shard under $BENCH_DATA_DIR/datasets" >&2; exit 2; }
ds=$(basename "$(dirname "$src")")
mkdir -p "$out/datasets/$ds" && rm -rf "$out/tokenizers" && cp -r "$BENCH_DATA_DIR/tokenizers" "$out/" || exit 1
ln -sf "$src" "$out/datasets/$ds/fineweb_train_000000.bin"
case ${LONGVAL_SOURCE:-train} in
  train) ;;
  val) src=$(dirname "$src")/fineweb_val_000000.bin
       [ -f "$src" ] || { echo "long_val_timing.sh: no validation shard $src" >&2; exit 2; } ;;
  *) echo "long_val_timing.sh: LONGVAL_SOURCE=${LONGVAL_SOURCE}: use train or val" >&2; exit 2 ;;
esac
dst="$out/datasets/$ds/fineweb_val_000000.bin"
python3 - "$here/../data" "$src" "$dst.tmp" "${LONGVAL_TOKENS:-45514753}" "${LONGVAL_SOURCE:-train}" <<'PY' || exit 1
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
from shard_io import read_shard_tokens, shard_problem, write_shard  # the project's shard format
src, dst, n, source = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
problem = shard_problem(src)
if problem:
    sys.exit(f"long_val_timing.sh: {src}: {problem}")
tokens = read_shard_tokens(src)
if source == "val":  # whole copies of the documents, then a prefix of one more
    tokens = np.tile(tokens, -(-n // max(tokens.size, 1)))
if tokens.size < n:
    sys.exit(f"long_val_timing.sh: {src} is not a shard of at least {n} tokens ({tokens.size})")
write_shard(dst, tokens[:n])
print(f"long validation shard: {n} tokens from {src.name} ({source}) -> {dst.with_suffix('')}")
PY
mv "$dst.tmp" "$dst" || exit 1
NPROC=${NPROC:-1} bash "$here/bench.sh" "longval_np${NPROC:-1}" "${SEED:-1337}" LOAD_ARTIFACT="$art" DATA_DIR="$out/" "$@"
rc=$?
grep -hE '^(val_tokens|stage:|legality:|final_|eval_time_total|ngram:|ttt[a-z_]*: loop)' "${BENCH_RUNS:-/tmp/runs}/longval_np${NPROC:-1}/console.txt"
exit $rc
