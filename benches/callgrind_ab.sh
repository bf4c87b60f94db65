#!/usr/bin/env bash
# Instructions per request, two builds, under callgrind: repeatable where CPU time on a
# shared machine is not (the same workload gives the same count to within about 1%).
#
#   bash benches/callgrind_ab.sh BIN_A BIN_B              # bulk issuance
#   WORKLOAD=get bash benches/callgrind_ab.sh BIN_A BIN_B # GET by reference
#
# Each server runs under `valgrind --tool=callgrind` on its own fresh database (the example
# config, log level LOG_LEVEL, no partner) and is stopped with SIGTERM (callgrind writes its
# counts when the process exits). Start-up (the demo client's PBKDF2 check) is left out.
# - bulk: BATCHES batches of ITEMS new items from bulk_bench, one request in flight;
#   prints the instructions per transaction of the request side (the batch's handler,
#   `router::dispatch`, which `api::issue_batch` may be inlined into) and of the writer
#   thread (`Writer::run`).
# - get: 50 issues, then GETS requests GET /v1/transactions/{reference} over one
#   keep-alive connection (curl); prints the instructions per GET of the connection's
#   task (hyper's parsing and writing and the handler, user space only) and of the
#   handler (`router::dispatch`).
# Knobs: WORKLOAD=bulk BATCHES=10 ITEMS=1000 GETS=2000 LOG_LEVEL=warn (info: with the
# access log, whose lines go to a file in the temp folder) KEEP=0 (1 keeps the callgrind
# files, printed).
# Ports 18331 and 18332 must be free. Needs valgrind (Debian's `valgrind`).
set -euo pipefail
A=$(realpath "$1"); B=$(realpath "$2")
cd "$(dirname "$0")/.."
BATCHES=${BATCHES:-10}; ITEMS=${ITEMS:-1000}; GETS=${GETS:-2000}; KEEP=${KEEP:-0}
WORKLOAD=${WORKLOAD:-bulk}; LOG_LEVEL=${LOG_LEVEL:-warn}
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
cargo build --release --locked --quiet --example bulk_bench
W=$(mktemp -d); pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; [ "$KEEP" = 1 ] || rm -rf "$W"' EXIT
n=$((BATCHES * ITEMS)); [ "$WORKLOAD" = get ] && n=$GETS
i=0
for bin in "$A" "$B"; do
  i=$((i+1)); port=$((18330+i))
  sed -e "s/^listen = .*/listen = \"127.0.0.1:$port\"/" -e "s|^path = .*|path = \"$W/$i.redb\"|" \
    -e 's/^token_ttl_seconds = .*/token_ttl_seconds = 86400/' -e '/^max_points *=/d' \
    -e '/^\[programs.partner\]/d' -e '/^sandbox = true/d' \
    -e "s/^\\[server\\]/[server]\\nlog_level = \"$LOG_LEVEL\"/" config.example.toml > "$W/$i.toml"
  valgrind --tool=callgrind --callgrind-out-file="$W/$i.out" "$bin" serve --config "$W/$i.toml" 2>"$W/$i.log" &
  pid=$!
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.5; done
  if [ "$WORKLOAD" = get ]; then
    url=http://127.0.0.1:$port
    token=$(curl -sf -X POST -H 'Content-Type: application/json' \
      -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' "$url/v1/auth" |
      sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p')
    for r in $(seq 0 49); do
      curl -sf -o /dev/null -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
        -d "{\"programId\":\"skywards\",\"value\":3673,\"userId\":\"EK1\",\"referenceNumber\":\"g-$r\"}" \
        "$url/v1/transactions"
    done
    for r in $(seq 0 $((GETS - 1))); do
      [ "$r" = 0 ] || echo next
      printf 'url = "%s/v1/transactions/g-%d"\nheader = "Authorization: Bearer %s"\noutput = "/dev/null"\nwrite-out = "%%{http_code}\\n"\n' \
        "$url" $((r % 50)) "$token"
    done > "$W/curl.cfg"
    ok=$(curl -s --config "$W/curl.cfg" | grep -c '^200$' || true)
    [ "$ok" = "$GETS" ] || echo "only $ok of $GETS GETs answered 200" >&2
  else
    target/release/examples/bulk_bench "http://127.0.0.1:$port" demo-pos cosmo-demo-secret "$BATCHES" "$ITEMS" 1 >/dev/null
  fi
  kill -TERM "$pid"; wait "$pid" || true; pid=""
  callgrind_annotate --inclusive=yes "$W/$i.out" 2>/dev/null > "$W/$i.txt"
  count() { # inclusive instructions of function $1: the largest of its lines (callgrind
    # lists a function once per source file that code of it was inlined from)
    awk -v f=":$1" '$0 !~ /=>/ && (index($0, f " [") || substr($0, length($0) - length(f) + 1) == f) {
      gsub(",", "", $1); if ($1 + 0 > max) max = $1 + 0 } END { print max + 0 }' "$W/$i.txt"
  }
  per() { awk -v c="${1:-0}" -v n="$n" 'BEGIN {printf "%.0f", c / n}'; }
  name=$([ $i = 1 ] && echo A || echo B)
  if [ "$WORKLOAD" = get ]; then
    echo "$name: $n GETs: connection task $(per "$(count "cosmopoints::server::serve::{{closure}}::{{closure}}")") instructions per GET, handler $(per "$(count "cosmopoints::router::dispatch::{{closure}}")")"
  else
    echo "$name: $n transactions: request side $(per "$(count "cosmopoints::router::dispatch::{{closure}}")") instructions per transaction, writer $(per "$(count "cosmopoints::store::writer::Writer::run")")"
  fi
done
[ "$KEEP" = 1 ] && echo "callgrind files: $W/1.out $W/2.out"
exit 0
