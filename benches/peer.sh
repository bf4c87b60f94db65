#!/usr/bin/env bash
# Cosmopoints against issue 14's Fastify peer (Fastify 5 + better-sqlite3, one fsync per
# issue: benches/peer/server.js) and the bare hyper baseline, in one run on 127.0.0.1.
#
#   bash benches/peer.sh
#
# Installs wrk and the peer's npm packages (pinned in benches/peer/package-lock.json) if
# missing, builds release, starts the three servers (Cosmopoints on a temp database with
# the example config, no partner, log level info), fills Cosmopoints and the peer with
# FILL s of issues (benches/issue.lua), warms each server up with 2 s of GETs, then runs
# ROUNDS rounds of: GET by reference (benches/get.lua), then single issues, each against
# the baseline, Cosmopoints and the peer in turn, wrk -t2 -c64 for DURATION s. Prints
# requests/s and each server's CPU time per request (from /proc); the ratios are against
# the peer and the baseline of the same round. Knobs (defaults): DURATION=6 ROUNDS=2
# FILL=3 CONNS=64.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-6}; ROUNDS=${ROUNDS:-2}; FILL=${FILL:-3}; CONNS=${CONNS:-64}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
command -v node >/dev/null || { echo "peer.sh needs Node.js (20 or newer) and npm" >&2; exit 1; }
[ -d benches/peer/node_modules/fastify ] || npm ci --prefix benches/peer --no-audit --no-fund
cargo build --release --locked --quiet --bin cosmopoints --example baseline_server
W=$(mktemp -d); pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
address() { # LOG: the address of its "listening on" line, waiting for it
  local a=""
  for _ in $(seq 150); do
    a=$(grep -o 'listening on [0-9.:]*' "$1" | head -1 | awk '{print $3}') || true
    [ -n "$a" ] && { echo "$a"; return; }
    sleep 0.1
  done
  cat "$1" >&2; exit 1
}
sed -e 's/^listen = .*/listen = "127.0.0.1:0"/' -e "s|^path = .*|path = \"$W/cosmopoints.redb\"|" \
  -e 's/^token_ttl_seconds = .*/token_ttl_seconds = 86400/' -e '/^max_points *=/d' \
  -e '/^\[programs.partner\]/d' -e '/^sandbox = true/d' config.example.toml >"$W/cosmopoints.toml"
target/release/cosmopoints serve --config "$W/cosmopoints.toml" 2>"$W/cosmopoints.log" & pids+=($!)
target/release/examples/baseline_server >"$W/baseline.log" & pids+=($!)
node benches/peer/server.js 0 "$W/peer.db" >"$W/peer.log" & pids+=($!)
declare -A PID=([baseline]=${pids[1]} [cosmopoints]=${pids[0]} [peer]=${pids[2]})
declare -A URL=()
for server in baseline cosmopoints peer; do
  a=$(address "$W/$server.log") # exits (with the log shown) if the server did not start
  URL[$server]=http://$a
done
declare -A TOKEN=([baseline]=none [peer]=$(sed -n 's/^token //p' "$W/peer.log"))
TOKEN[cosmopoints]=$(curl -sS "${URL[cosmopoints]}/v1/auth" -H 'content-type: application/json' \
  -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' |
  sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p')
HZ=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/${PID[$1]}/stat"; }
# SERVER SCRIPT NAME [env...]: one wrk run; prints "requests/s CPU-us-per-request" and
# keeps wrk's output in $W/NAME.txt.
run() {
  local server=$1 script=$2 name=$3 t0 t1 n
  shift 3
  t0=$(ticks "$server")
  env TOKEN="${TOKEN[$server]}" "$@" wrk -t2 -c"$CONNS" -d"${DURATION}s" -s "$script" \
    "${URL[$server]}${PATH_OF[$script]}" >"$W/$name.txt" 2>&1
  t1=$(ticks "$server")
  n=$(awk '/ requests in / {print $1}' "$W/$name.txt")
  awk -v n="$n" -v t=$((t1 - t0)) -v hz="$HZ" -v f="$W/$name.txt" 'BEGIN {
    while ((getline l < f) > 0) if (l ~ /^Requests\/sec:/) { split(l, p, " "); rps = p[2] }
    printf "%.0f %.1f\n", rps, t * 1e6 / hz / n }'
}
declare -A PATH_OF=([benches/issue.lua]=/v1/transactions [benches/get.lua]=/v1/transactions/)
# The fill: each thread's references are fill-<thread>-<n>, n from 2; get.lua asks for n up
# to REFMAX: below what every thread of both fills stored, less one per connection (a
# request still unanswered when the fill ended may or may not have been stored).
REFMAX=
for server in cosmopoints peer; do
  DURATION=$FILL run "$server" benches/issue.lua "fill-$server" RUN=fill >/dev/null
  grep -q 'other=0' "$W/fill-$server.txt" || { cat "$W/fill-$server.txt" >&2; exit 1; }
  m=$(awk '/^LUA thread=/ { split($4, kv, "="); if (min == "" || kv[2] + 0 < min) min = kv[2] + 0 }
    END { print min }' "$W/fill-$server.txt")
  if [ -z "$REFMAX" ] || [ "$m" -lt "$REFMAX" ]; then REFMAX=$m; fi
done
REFMAX=$((REFMAX - CONNS))
[ "$REFMAX" -gt 100 ] || { echo "the fill stored too little" >&2; exit 1; }
# A warm-up, not counted: Node.js compiles its hot paths in the first seconds.
for server in baseline cosmopoints peer; do
  DURATION=2 run "$server" benches/get.lua "warm-$server" REFRUN=fill REFTHREADS=2 REFMAX="$REFMAX" >/dev/null
done
echo "filled: GETs ask for 2 x $((REFMAX - 1)) references; Node.js $(node --version), wrk -t2 -c$CONNS, ${DURATION}s per run"
for round in $(seq "$ROUNDS"); do
  for kind in get issue; do
    declare -A RPS=() CPU=()
    for server in baseline cosmopoints peer; do
      name=$kind-$server-$round
      if [ "$kind" = get ]; then
        out=$(run "$server" benches/get.lua "$name" REFRUN=fill REFTHREADS=2 REFMAX="$REFMAX") ||
          { cat "$W/$name.txt" >&2; exit 1; }
        want='status200=[1-9][0-9]* status404=0 other=0'
      else
        out=$(run "$server" benches/issue.lua "$name" RUN="r$round") || { cat "$W/$name.txt" >&2; exit 1; }
        want='LUA status201=[1-9][0-9]* status200=0 other=0'
      fi
      [ "$server" = baseline ] || grep -q "$want" "$W/$name.txt" || { cat "$W/$name.txt" >&2; exit 1; }
      read -r "RPS[$server]" "CPU[$server]" <<<"$out"
    done
    awk -v k="$kind" -v r="$round" -v b="${RPS[baseline]} ${CPU[baseline]}" \
      -v c="${RPS[cosmopoints]} ${CPU[cosmopoints]}" -v p="${RPS[peer]} ${CPU[peer]}" 'BEGIN {
      split(b, B, " "); split(c, C, " "); split(p, P, " ");
      printf "round %d, %-5s: cosmopoints %6d/s %5.1f us CPU | peer %6d/s %6.1f us | baseline %6d/s %4.1f us\n", r, k, C[1], C[2], P[1], P[2], B[1], B[2];
      printf "              cosmopoints / peer: throughput %.2fx, CPU per request %.2fx; / baseline: throughput %.2f, CPU %.2fx\n", C[1] / P[1], C[2] / P[2], C[1] / B[1], C[2] / B[2] }'
  done
done
