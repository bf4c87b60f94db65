#!/usr/bin/env bash
# Bytes written to disk per single issue (write_bytes in /proc/PID/io, the pages the
# kernel writes back for the server), in two states of the same database:
#   warm: a fresh file, issues straight after a fill;
#   cold: the server stopped, the OS page cache dropped (needs root; skipped otherwise),
#         the server started again, 3 s of GETs by reference over the fill, then issues.
# The second shows what readahead costs a writer: pages read through it are cached in big
# folios, and a commit writes back a whole folio for each page it changes.
#
#   bash benches/write_amp.sh [BIN]       # BIN defaults to target/release/cosmopoints
#
# Knobs: FILL=150000 (issues before the restart), DUR=4 (s of issues measured).
# Port 18230 must be free. The database lives in a new folder of TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/release/cosmopoints}")
FILL=${FILL:-150000}; DUR=${DUR:-4}
W=$(mktemp -d "${TMPDIR:-/tmp}/write_amp.XXXXXX"); PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf $W' EXIT
sed -e 's/^listen = .*/listen = "127.0.0.1:18230"/' -e "s|^path = .*|path = \"$W/p.redb\"|" \
    -e 's/^token_ttl_seconds = .*/token_ttl_seconds = 86400/' -e '/^max_points *=/d' \
    -e '/^\[programs.partner\]/d' -e '/^sandbox = true/d' config.example.toml > $W/c.toml
start() {
  $BIN serve --config $W/c.toml 2>>$W/server.log & PID=$!
  for _ in $(seq 50); do curl -sf http://127.0.0.1:18230/v1/openapi.json >/dev/null && return; sleep 0.1; done
  echo "the server did not start" >&2; exit 1
}
stop() { kill $PID; wait $PID || true; PID=; }
field() { awk -v f="$2:" '$1 == f {print $2}' /proc/$1/io; }
issues() { # $1: label
  local w0 w1 out n
  w0=$(field $PID write_bytes)
  out=$(TOKEN=$TOKEN RUN=$1 wrk -t2 -c64 -d${DUR}s -s benches/issue.lua http://127.0.0.1:18230/v1/transactions)
  w1=$(field $PID write_bytes)
  n=$(echo "$out" | sed -n 's/.*status201=\([0-9]*\).*/\1/p' | head -1)
  awk -v l="$1" -v b=$((w1 - w0)) -v n="$n" 'BEGIN {printf "%s: %d issues, %.1f KiB written to disk per issue\n", l, n, b / 1024 / n}'
}
start
TOKEN=$(curl -sS http://127.0.0.1:18230/v1/auth -H 'content-type: application/json' -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' | sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p')
TOKEN=$TOKEN RUN=fill QUOTA=$FILL wrk -t2 -c64 -d30s -s benches/issue.lua http://127.0.0.1:18230/v1/transactions > $W/fill.txt
issues warm
stop
sync
if echo 1 > /proc/sys/vm/drop_caches 2>/dev/null; then echo "(page cache dropped)"; else echo "(page cache not dropped: not root)"; fi
start
refmax=$(awk '$1 == "LUA" && $2 ~ /^thread=/ { split($4, kv, "="); if (min == "" || kv[2] + 0 < min) min = kv[2] + 0 } END {print min - 20}' $W/fill.txt)
TOKEN=$TOKEN REFRUN=fill REFTHREADS=2 REFMAX=$refmax wrk -t2 -c64 -d3s -s benches/get.lua http://127.0.0.1:18230/v1/transactions/ >/dev/null
issues cold
echo "file: $(du -k $W/p.redb | cut -f1) KiB on disk, $(stat -c %s $W/p.redb) bytes long"
