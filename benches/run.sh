#!/usr/bin/env bash
# Runs the benchmark set and keeps one JSON file per run
# in $OUT (default target/bench-results). Handlers alternate run by run, so
# the adapter and its references see the same machine load.
#
#   bash benches/run.sh            # everything but the Python example
#   REPS=1 DURATION=5 bash benches/run.sh load
#   bash benches/run.sh scale
#   REPS=5 bash benches/run.sh rate   # latency only, after a load run
#
# A handler started elsewhere is measured with --handler-url and --handler-pid.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-target/bench-results}
REPS=${REPS:-3}
DURATION=${DURATION:-10}
WHAT=${1:-all}
mkdir -p "$OUT"

cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/exproto-adapter

run() { # name, then bench flags
  local name=$1
  shift
  echo "== $name: $*  (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  "$BIN" bench --json --duration "$DURATION" "$@" >"$OUT/$name.json"
  cat "$OUT/$name.json"
}

if [[ $WHAT == all || $WHAT == load ]]; then
  for rep in $(seq 1 "$REPS"); do
    for service in unary stream; do
      run "adapter-$service-$rep" --handler adapter --service "$service"
      run "echo-$service-$rep" --handler echo --service "$service"
    done
    run "noop-hop-$rep" --handler noop
  done
fi

if [[ $WHAT == all || $WHAT == load || $WHAT == rate ]]; then
  # Latency at half the echo reference's best unary rate (from the load
  # runs above, or kept from an earlier `load` run).
  best=$(for f in "$OUT"/echo-unary-*.json; do
    sed -E 's/.*"messages_per_sec":([0-9.]+).*/\1/' "$f"
  done | sort -g | tail -1)
  if [[ -z $best ]]; then
    echo "no echo-unary-*.json in $OUT: run the load set first" >&2
    exit 1
  fi
  half=$(awk -v b="$best" 'BEGIN { printf "%d", b / 2 }')
  for rep in $(seq 1 "$REPS"); do
    run "adapter-rate-$rep" --handler adapter --rate "$half"
    run "echo-rate-$rep" --handler echo --rate "$half"
  done
fi

if [[ $WHAT == all || $WHAT == scale ]]; then
  for n in 10000 50000 100000; do
    run "scale-unary-$n" --mode scale --connections "$n"
  done
  # Streaming holds two HTTP/2 streams per idle connection. A failed run is
  # reported and the rest go on.
  for n in 10000 50000; do
    run "scale-stream-$n" --mode scale --service stream --connections "$n" ||
      echo "scale-stream-$n failed" >&2
  done
fi
