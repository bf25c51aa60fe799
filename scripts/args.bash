# Argument checks shared by the bench scripts (bench.sh, ttt_sweep.sh, long_val_timing.sh); they source it after defining usage().
# Each failure names the calling script ($0), says what is wrong, and calls usage (exit 2).

# need_bench_data: BENCH_DATA_DIR must be set (to a folder holding datasets/ and tokenizers/).
need_bench_data() {
  if [ -z "${BENCH_DATA_DIR:-}" ]; then
    echo "$(basename "$0"): BENCH_DATA_DIR is not set: point it at the bench data (a folder with datasets/ and tokenizers/)" >&2
    usage
  fi
}

# need_artifact FILE: FILE must exist.
need_artifact() {
  [ -f "$1" ] || { echo "$(basename "$0"): no artifact file at '$1'" >&2; usage; }
}

# need_var_values [WHERE] ARG...: every ARG must be VAR=VALUE (WHERE, if not empty, is appended to the message).
need_var_values() {
  local where=$1 kv; shift
  for kv in "$@"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || { echo "$(basename "$0"): '$kv'${where:+ $where} is not VAR=VALUE" >&2; usage; }
  done
}
