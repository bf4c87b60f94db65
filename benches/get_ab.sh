#!/usr/bin/env bash
# A/B of GET by reference: two servers side by side, interleaved wrk runs, on 127.0.0.1.
#
#   bash benches/get_ab.sh BIN_A BIN_B                       # two builds, both log_level info
#   LOGA=info LOGB=warn bash benches/get_ab.sh BIN BIN        # the access log's cost
#
# Each server gets the example config (its own temp database, no partner), is
# filled for 2 s with issue-points (the references GET asks for), then REPS rounds of
# wrk -t2 -c64 for DUR s against A then B. Prints requests/s and the server's CPU time per
# GET (from /proc: steadier than throughput on a shared machine). Knobs: REPS=3 DUR=5
# LOGA=info LOGB=info. Ports 18201 and 18202 must be free.
set -euo pipefail
A=$(realpath "$1"); B=$(realpath "$2")
cd "$(dirname "$0")/.."
REPS=${REPS:-3}; DUR=${DUR:-5}; LOGS=(${LOGA:-info} ${LOGB:-info})
W=$(mktemp -d); pids=()
trap 'kill ${pids[@]} 2>/dev/null; rm -rf $W' EXIT
i=0
for bin in "$A" "$B"; do
  i=$((i+1)); port=$((18200+i))
  sed -e "s/^listen = .*/listen = \"127.0.0.1:$port\"/" -e "s|^path = .*|path = \"$W/$i.redb\"|" -e 's/^token_ttl_seconds = .*/token_ttl_seconds = 86400/' -e '/^max_points *=/d' -e '/^\[programs.partner\]/d' -e '/^sandbox = true/d' -e "s/^\[server\]/[server]\nlog_level = \"${LOGS[$((i-1))]}\"/" config.example.toml > $W/$i.toml
  $bin serve --config $W/$i.toml 2>$W/$i.log & pids+=($!)
done
sleep 1
for i in 1 2; do
  port=$((18200+i))
  T=$(curl -sf -X POST -H 'Content-Type: application/json' -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' http://127.0.0.1:$port/v1/auth | sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p')
  echo $T > $W/t$i
  TOKEN=$T RUN=fill wrk -t2 -c16 -d2s -s benches/issue.lua http://127.0.0.1:$port/v1/transactions > $W/fill$i.txt
done
HZ=$(getconf CLK_TCK)
for r in $(seq $REPS); do
  for i in 1 2; do
    port=$((18200+i)); pid=${pids[$((i-1))]}
    refmax=$(awk '$1 == "LUA" && $2 ~ /^thread=/ { split($4, kv, "="); if (min == "" || kv[2] + 0 < min) min = kv[2] + 0 } END {print min - 20}' $W/fill$i.txt)
    t0=$(awk '{print $14+$15}' /proc/$pid/stat)
    out=$(TOKEN=$(cat $W/t$i) REFRUN=fill REFTHREADS=2 REFMAX=$refmax wrk -t2 -c64 -d${DUR}s -s benches/get.lua http://127.0.0.1:$port/v1/transactions/)
    t1=$(awk '{print $14+$15}' /proc/$pid/stat)
    n=$(echo "$out" | awk '/ requests in / {print $1}'); rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    echo "$([ $i = 1 ] && echo A || echo B) round $r: $rps req/s, $(awk -v t=$((t1-t0)) -v n=$n -v hz=$HZ 'BEGIN{printf "%.1f", t/hz*1e6/n}') us CPU/GET $(echo "$out" | grep -o 'other=[0-9]*\|status404=[0-9]*' | tr '\n' ' ')"
  done
done
