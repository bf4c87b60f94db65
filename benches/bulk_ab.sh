#!/usr/bin/env bash
# A/B of bulk issuance and of single issues: two servers side by side, interleaved runs,
# on 127.0.0.1.
#
#   bash benches/bulk_ab.sh BIN_A BIN_B
#
# Each server gets the example config (its own temp database, no partner). Then ROUNDS
# rounds of: bulk_bench (BATCHES batches of 1,000 items, one client) with each count of
# requests in flight in IN_FLIGHT, against A then B; and, with SINGLE=1, wrk -t2 -cCONNS
# for DUR s of single issues against A then B. Prints transactions/s, the server's CPU
# time per transaction and its writer thread's (from /proc: steadier than throughput on a
# shared machine; with requests in flight the writer is the bound, 1e6 / its µs per
# transaction), and for single issues wrk's mean latency. Knobs: ROUNDS=3 BATCHES=150
# IN_FLIGHT="1 4" SINGLE=1 DUR=5 CONNS=64 (1: one wrk thread). Single issues only:
#
#   IN_FLIGHT= REPS=4 bash benches/bulk_ab.sh BIN_A BIN_B
#
# The databases are in a new folder of TMPDIR (a filesystem to compare: TMPDIR=/mnt/x).
# Ports 18211 and 18212 must be free. Builds bulk_bench (release) if needed.
set -euo pipefail
A=$(realpath "$1"); B=$(realpath "$2")
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-${REPS:-3}}; BATCHES=${BATCHES:-150}; IN_FLIGHT=${IN_FLIGHT-"1 4"}
SINGLE=${SINGLE:-1}; DUR=${DUR:-5}; CONNS=${CONNS:-64}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release --locked --quiet --example bulk_bench
W=$(mktemp -d); pids=()
trap 'kill ${pids[@]} 2>/dev/null; rm -rf $W' EXIT
i=0
for bin in "$A" "$B"; do
  i=$((i+1)); port=$((18210+i))
  sed -e "s/^listen = .*/listen = \"127.0.0.1:$port\"/" -e "s|^path = .*|path = \"$W/$i.redb\"|" -e 's/^token_ttl_seconds = .*/token_ttl_seconds = 86400/' -e '/^max_points *=/d' -e '/^\[programs.partner\]/d' -e '/^sandbox = true/d' config.example.toml > $W/$i.toml
  $bin serve --config $W/$i.toml 2>$W/$i.log & pids+=($!)
done
sleep 1
HZ=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
writer_ticks() { # the writer thread's, of server pid $1
  for t in /proc/"$1"/task/*; do
    [ "$(cat "$t/comm" 2>/dev/null)" = cosmopoints-wri ] && { awk '{print $14 + $15}' "$t/stat"; return; }
  done
  echo 0
}
per_tx() { awk -v t="$1" -v n="$2" -v hz="$HZ" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}'; }
for i in 1 2; do
  curl -sf -X POST -H 'Content-Type: application/json' -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' \
    http://127.0.0.1:$((18210+i))/v1/auth | sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p' > $W/t$i
done
n=$((BATCHES * 1000))
for r in $(seq "$ROUNDS"); do
  for k in $IN_FLIGHT; do
    for i in 1 2; do
      port=$((18210+i)); pid=${pids[$((i-1))]}
      t0=$(ticks $pid); w0=$(writer_ticks $pid)
      out=$(target/release/examples/bulk_bench "http://127.0.0.1:$port" demo-pos cosmo-demo-secret "$BATCHES" 1000 "$k")
      t1=$(ticks $pid); w1=$(writer_ticks $pid)
      rate=$(sed -n 's/.*per_second=\([0-9]*\).*/\1/p' <<<"$out")
      echo "$([ $i = 1 ] && echo A || echo B) round $r: bulk, $k in flight: $rate tx/s, $(per_tx $((t1-t0)) $n) us CPU/tx, writer $(per_tx $((w1-w0)) $n) us/tx"
    done
  done
  [ "$SINGLE" = 1 ] || continue
  for i in 1 2; do
    port=$((18210+i)); pid=${pids[$((i-1))]}
    t0=$(ticks $pid); w0=$(writer_ticks $pid)
    out=$(TOKEN=$(cat $W/t$i) RUN=ab$r wrk -t$(( CONNS < 2 ? 1 : 2 )) -c$CONNS -d${DUR}s -s benches/issue.lua http://127.0.0.1:$port/v1/transactions)
    t1=$(ticks $pid); w1=$(writer_ticks $pid)
    count=$(echo "$out" | awk '/ requests in / {print $1}'); rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    lat=$(echo "$out" | awk '$1 == "Latency" {print $2}')
    echo "$([ $i = 1 ] && echo A || echo B) round $r: single issues: $rps req/s, $(per_tx $((t1-t0)) $count) us CPU/issue, writer $(per_tx $((w1-w0)) $count) us/issue, mean latency $lat $(echo "$out" | grep -o 'other=[0-9]*' | tr '\n' ' ')"
  done
done
