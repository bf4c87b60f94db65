#!/usr/bin/env bash
# A/B of issue-points: two servers side by side, interleaved wrk runs, on 127.0.0.1.
#
#   bash benches/issue_ab.sh BIN_A BIN_B
#
# Each server gets the example config (its own temp database under TMPDIR, no partner);
# then REPS rounds of wrk -t2 -c64 for DUR s of issue-points (a new referenceNumber each)
# against A then B. Prints requests/s, the server's CPU time per issue and the writer
# thread's share of it (from /proc), and wrk's mean latency. Knobs: REPS=3 DUR=5
# CONNS=64. Ports 18211 and 18212 must be free.
set -euo pipefail
A=$(realpath "$1"); B=$(realpath "$2")
cd "$(dirname "$0")/.."
REPS=${REPS:-3}; DUR=${DUR:-5}; CONNS=${CONNS:-64}
W=$(mktemp -d "${TMPDIR:-/tmp}/issue_ab.XXXXXX"); pids=()
trap 'kill ${pids[@]} 2>/dev/null; rm -rf $W' EXIT
i=0
for bin in "$A" "$B"; do
  i=$((i+1)); port=$((18210+i))
  sed -e "s/^listen = .*/listen = \"127.0.0.1:$port\"/" -e "s|^path = .*|path = \"$W/$i.redb\"|" -e 's/^token_ttl_seconds = .*/token_ttl_seconds = 86400/' -e '/^max_points *=/d' -e '/^\[programs.partner\]/d' -e '/^sandbox = true/d' config.example.toml > $W/$i.toml
  $bin serve --config $W/$i.toml 2>$W/$i.log & pids+=($!)
done
sleep 1
for i in 1 2; do
  port=$((18210+i))
  curl -sf -X POST -H 'Content-Type: application/json' -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' http://127.0.0.1:$port/v1/auth | sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p' > $W/t$i
done
HZ=$(getconf CLK_TCK)
# utime+stime of the process, and of its writer thread, in clock ticks.
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
wcpu() { for t in /proc/$1/task/*; do if [ "$(cat $t/comm)" = cosmopoints-wri ]; then awk '{print $14+$15}' $t/stat; fi; done; }
for r in $(seq $REPS); do
  for i in 1 2; do
    port=$((18210+i)); pid=${pids[$((i-1))]}
    t0=$(cpu $pid); w0=$(wcpu $pid)
    out=$(TOKEN=$(cat $W/t$i) RUN=r$r wrk -t$(( CONNS < 2 ? 1 : 2 )) -c$CONNS -d${DUR}s -s benches/issue.lua http://127.0.0.1:$port/v1/transactions)
    t1=$(cpu $pid); w1=$(wcpu $pid)
    n=$(echo "$out" | awk '/ requests in / {print $1}'); rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    lat=$(echo "$out" | awk '$1 == "Latency" {print $2}')
    echo "$([ $i = 1 ] && echo A || echo B) round $r: $rps req/s, $(awk -v t=$((t1-t0)) -v w=$((w1-w0)) -v n=$n -v hz=$HZ 'BEGIN{printf "%.1f us CPU/issue (writer %.1f)", t/hz*1e6/n, w/hz*1e6/n}'), mean latency $lat $(echo "$out" | grep -o 'other=[0-9]*' | tr '\n' ' ')"
  done
done
