#!/usr/bin/env bash
# Bulk issuance: POST /v1/transactions/batch from ONE client against the release binary,
# beside single issues from 64 connections (wrk) on the same build, in one run.
#
#   bash benches/bulk.sh
#
# Starts the server on a temp database (the example config without its sandbox partner,
# so that what is measured is the issue path, not deliveries), runs `bulk_bench` (BATCHES
# batches of ITEMS items, one request at a time on one connection), and reports
# transactions/s and the server's CPU time per transaction (from /proc: steadier than
# throughput on a shared machine). Then the same server takes single issues from wrk for
# DURATION s, for the ratio. Knobs (defaults): BATCHES=200 ITEMS=1000 DURATION=8
# IN_FLIGHT="1 4" (the client's requests at a time: one run each, on one server).
set -euo pipefail
cd "$(dirname "$0")/.."
BATCHES=${BATCHES:-200}
ITEMS=${ITEMS:-1000}
DURATION=${DURATION:-8}
IN_FLIGHT=${IN_FLIGHT:-"1 4"}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release --locked --quiet --bin cosmopoints --example bulk_bench
WORK=$(mktemp -d)
SERVER_PID=
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
sed -e 's/^listen = .*/listen = "127.0.0.1:0"/' -e 's/^path = .*/path = "bulk.redb"/' \
    -e 's/^token_ttl_seconds = .*/token_ttl_seconds = 86400/' -e '/^max_points *=/d' \
    -e '/^\[programs.partner\]/d' -e '/^sandbox = true/d' \
    config.example.toml > "$WORK/cosmopoints.toml"
target/release/cosmopoints serve --config "$WORK/cosmopoints.toml" 2>"$WORK/server.log" &
SERVER_PID=$!
ADDR=
for _ in $(seq 150); do
  ADDR=$(grep -o 'listening on [0-9.:]*' "$WORK/server.log" | head -1 | awk '{print $3}') || true
  [ -n "$ADDR" ] && break
  sleep 0.1
done
[ -n "$ADDR" ] || { cat "$WORK/server.log" >&2; exit 1; }
ticks() { awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"; }
# The writer thread's CPU: with requests in flight it is the bound (one thread applies
# every write), so 1e6 / this is the most transactions/s the store could take.
writer_ticks() {
  for t in /proc/"$SERVER_PID"/task/*; do
    [ "$(cat "$t/comm" 2>/dev/null)" = cosmopoints-wri ] && { awk '{print $14 + $15}' "$t/stat"; return; }
  done
  echo 0
}
HZ=$(getconf CLK_TCK)
total=$((BATCHES * ITEMS))
for k in $IN_FLIGHT; do
  before=$(ticks)
  writer_before=$(writer_ticks)
  out=$(target/release/examples/bulk_bench "http://$ADDR" demo-pos cosmo-demo-secret "$BATCHES" "$ITEMS" "$k")
  after=$(ticks)
  writer_after=$(writer_ticks)
  rate=$(sed -n 's/.*per_second=\([0-9]*\).*/\1/p' <<<"$out")
  cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$total" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
  writer=$(awk -v t=$((writer_after - writer_before)) -v hz="$HZ" -v n="$total" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
  echo "bulk, $k request(s) in flight: $out; server CPU $cpu us per transaction (writer thread $writer us)"
  # The first run's figures are the ones compared with single issues below.
  bulk_rate=${bulk_rate:-$rate}
  bulk_cpu=${bulk_cpu:-$cpu}
done

TOKEN=$(curl -sS "http://$ADDR/v1/auth" -H 'content-type: application/json' \
  -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' |
  sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p')
cat > "$WORK/issue.lua" <<LUA
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer $TOKEN"
local n = 0
request = function()
  n = n + 1
  local ref = string.format("single-%d-%d-%d", os.time(), math.random(1, 1000000000), n)
  return wrk.format(nil, "/v1/transactions", nil,
    '{"programId":"skywards","value":3673,"userId":"EK1","referenceNumber":"' .. ref .. '"}')
end
LUA
before=$(ticks)
wrk -t2 -c64 -d"${DURATION}s" -s "$WORK/issue.lua" "http://$ADDR" > "$WORK/wrk.txt"
after=$(ticks)
single_rate=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$WORK/wrk.txt")
single_n=$(awk '/ requests in / {print $1}' "$WORK/wrk.txt")
single_cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$single_n" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
echo "single issues (wrk -t2 -c64, ${DURATION}s): $single_rate req/s; server CPU $single_cpu us per transaction"
awk -v b="$bulk_rate" -v s="$single_rate" -v bc="$bulk_cpu" -v sc="$single_cpu" \
  'BEGIN {printf "bulk / single: throughput %.1fx, CPU per transaction %.2fx\n", b / s, bc / sc}'
