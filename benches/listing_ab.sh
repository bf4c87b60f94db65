#!/usr/bin/env bash
# Same-run A/B of the streamed listing (GET /v1/transactions over the whole range) between
# server binaries, on identical data:
#
#   bash benches/listing_ab.sh v1=/tmp/cosmopoints-v1 before=/tmp/old after=target/release/cosmopoints
#
# The first binary fills a database with FILL transactions through its own API (so it must
# be the one with the oldest schema: newer binaries migrate a copy of that file on open,
# and an older one refuses a newer file). Each binary then serves its own copy, all at once,
# and the listing is fetched REPS times from each in turn (interleaved, so that the noise
# of a shared machine falls on all alike). Prints rows/s per run, the median per binary
# and each median as a ratio to the first binary's.
#
# Environment knobs (defaults): FILL=20000 REPS=15 KEEP=0 (1 keeps the temp folder).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FILL=${FILL:-20000}
REPS=${REPS:-15}
KEEP=${KEEP:-0}
[ $# -ge 2 ] || { echo "usage: $0 NAME=BINARY NAME=BINARY..." >&2; exit 2; }
command -v wrk >/dev/null && command -v curl >/dev/null || { echo "needs wrk and curl" >&2; exit 1; }

NAMES=()
BINS=()
for arg in "$@"; do
  NAMES+=("${arg%%=*}")
  BINS+=("$(realpath "${arg#*=}")")
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/listing-ab.XXXXXX")
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

listen_port() { # PID -> the TCP port it listens on
  local inode hex
  for inode in $(find "/proc/$1/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | tr -dc '0-9\n'); do
    hex=$(awk -v i="$inode" '$4 == "0A" && $10 == i {split($2, a, ":"); print a[2]}' /proc/net/tcp)
    if [ -n "$hex" ]; then echo $((16#$hex)); return 0; fi
  done
  return 1
}
start() { # INDEX -> starts server INDEX on $WORK/<name>/, sets PORT
  local dir=$WORK/${NAMES[$1]} pid i
  mkdir -p "$dir"
  # The example config of release 0.1.0, which every later release also reads: no partner.
  sed -e 's/^listen = .*/listen = "127.0.0.1:0"/' -e 's/^path = .*/path = "bench.redb"/' \
      -e 's/^token_ttl_seconds = .*/token_ttl_seconds = 86400/' -e '/^max_points *=/d' \
      -e 's/^\[server\]/[server]\nlog_level = "warn"/' \
      "$WORK/config.toml" >"$dir/cosmopoints.toml"
  "${BINS[$1]}" serve --config "$dir/cosmopoints.toml" 2>"$dir/server.log" &
  pid=$!
  PIDS+=("$pid")
  for i in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    PORT=$(listen_port "$pid") && return 0
    sleep 0.1
  done
  echo "${NAMES[$1]} is not listening" >&2
  exit 1
}
token() { # PORT
  curl -sf --max-time 10 -X POST -H 'Content-Type: application/json' \
    -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' "http://127.0.0.1:$1/v1/auth" |
    sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p'
}

git -C "$ROOT" show 4c77637:config.example.toml >"$WORK/config.toml"

# Fill with the first binary, then stop it so that its file is complete on disk.
start 0
FILL_PID=${PIDS[0]}
export TOKEN
TOKEN=$(token "$PORT")
mkdir -p "$WORK/fill.done"
env RUN=fill QUOTA=$(((FILL + 1) / 2)) DONE_DIR="$WORK/fill.done" \
  wrk -t 2 -c 32 -d 300s -s "$ROOT/benches/issue.lua" "http://127.0.0.1:$PORT/v1/transactions" \
  >"$WORK/fill.txt" 2>&1 &
WRK=$!
while kill -0 "$WRK" 2>/dev/null && [ "$(find "$WORK/fill.done" -type f | wc -l)" -lt 2 ]; do
  sleep 0.2
done
kill -INT "$WRK" 2>/dev/null || true
wait "$WRK" || true
kill "$FILL_PID"
wait "$FILL_PID" || true
PIDS=()
for i in "${!NAMES[@]}"; do
  [ "$i" = 0 ] || { mkdir -p "$WORK/${NAMES[$i]}"; cp "$WORK/${NAMES[0]}/bench.redb" "$WORK/${NAMES[$i]}/"; }
done

PORTS=()
TOKENS=()
for i in "${!NAMES[@]}"; do
  start "$i"
  PORTS+=("$PORT")
  TOKENS+=("$(token "$PORT")")
done

list() { # INDEX OUT -> "seconds bytes"
  curl -s --max-time 120 -o "$2" -w '%{http_code} %{time_total} %{size_download}\n' \
    -H "Authorization: Bearer ${TOKENS[$1]}" \
    "http://127.0.0.1:${PORTS[$1]}/v1/transactions?startDate=0000000000&endDate=9999999999"
}
# Each answer once in full: the row count (all must agree) and a digest of the body (equal
# digests: byte-identical answers).
ROWS=""
for i in "${!NAMES[@]}"; do
  read -r code secs bytes < <(list "$i" "$WORK/${NAMES[$i]}.json")
  [ "$code" = 200 ] || { echo "${NAMES[$i]} answered $code" >&2; exit 1; }
  n=$(grep -o '"referenceNumber"' "$WORK/${NAMES[$i]}.json" | wc -l)
  [ -z "$ROWS" ] || [ "$n" = "$ROWS" ] || { echo "${NAMES[$i]} listed $n rows, not $ROWS" >&2; exit 1; }
  ROWS=$n
  echo "${NAMES[$i]}: $n rows, $bytes bytes, sha256 $(sha256sum <"$WORK/${NAMES[$i]}.json" | cut -c1-16)"
done

for r in $(seq "$REPS"); do
  line="rep $r:"
  for i in "${!NAMES[@]}"; do
    read -r code secs bytes < <(list "$i" /dev/null)
    [ "$code" = 200 ] || { echo "${NAMES[$i]} answered $code" >&2; exit 1; }
    awk -v n="$ROWS" -v s="$secs" 'BEGIN {printf "%.0f\n", n / s}' >>"$WORK/${NAMES[$i]}.rps"
    line="$line ${NAMES[$i]} $(tail -1 "$WORK/${NAMES[$i]}.rps")"
  done
  echo "$line"
done

median() { sort -n "$1" | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
FIRST=$(median "$WORK/${NAMES[0]}.rps")
echo "median rows/s over $REPS interleaved runs of $ROWS rows (ratio to ${NAMES[0]}):"
for i in "${!NAMES[@]}"; do
  m=$(median "$WORK/${NAMES[$i]}.rps")
  printf '  %-10s %8.0f  %.2f\n' "${NAMES[$i]}" "$m" "$(awk -v a="$m" -v b="$FIRST" 'BEGIN {print a / b}')"
done
