#!/usr/bin/env bash
# Issue and GET throughput on PostgreSQL with one and with two server processes, against
# redb and a bare hyper baseline, all in one run on 127.0.0.1.
#
#   bash benches/postgres.sh
#
# Starts a throwaway PostgreSQL cluster (Debian's postgresql package: initdb into a temp
# dir, a free port, as the `postgres` user when run as root), the bare hyper baseline,
# Cosmopoints on redb, Cosmopoints on Postgres (one process, database `one`) and two
# Cosmopoints processes on one Postgres database (`two`). Each target is filled for
# FILL_SECONDS with issue-points (the references GET asks for), then ROUNDS x { POST and
# GET of the baseline, issue-points and GET by reference on each target }, each wrk
# -t THREADS -c CONNS for DURATION s. The two-process target gets two wrk runs at once
# (half the threads and connections each, one per process) and their sum.
#
# Reported per run: requests/s, the ratio to the baseline measured in the same round, the
# CPU time per request of the server process(es) and of PostgreSQL (all its processes),
# from /proc. Every process is killed and the cluster removed on exit.
#
# Environment knobs (defaults): DURATION=8 THREADS=2 CONNS=64 ROUNDS=2 FILL_SECONDS=8
# POOL=16 (each Postgres server's pool_size) KEEP=0 (1 keeps the temp folder) ANALYZE=1
# (0: no ANALYZE after the fill).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DURATION=${DURATION:-8}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-2}
FILL_SECONDS=${FILL_SECONDS:-8}
POOL=${POOL:-16}
KEEP=${KEEP:-0}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BENCHES=$ROOT/benches

say() { printf '%s\n' "$*"; }
die() { printf 'postgres.sh: %s\n' "$*" >&2; exit 1; }

command -v wrk >/dev/null || die "wrk is needed (apt-get install wrk)"
command -v curl >/dev/null || die "curl is needed"
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)}
[ -x "$PGBIN/initdb" ] || die "PostgreSQL's binaries are needed (apt-get install postgresql)"

say "== building (release)"
cargo build --release --bin cosmopoints --example baseline_server
SERVER_BIN=$TARGET_DIR/release/cosmopoints
BASELINE_BIN=$TARGET_DIR/release/examples/baseline_server

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cosmopg.XXXXXX")
chmod 755 "$WORK"
PIDS=()
AS_PG=()
[ "$(id -u)" -eq 0 ] && { chown postgres "$WORK"; AS_PG=(runuser -u postgres --); }
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  if [ "$KEEP" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PGPORT=$(free_port)
"${AS_PG[@]}" "$PGBIN/initdb" -D "$WORK/pg" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
"${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w \
  -o "-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1 -c shared_buffers=256MB -c max_connections=200" start >/dev/null
for db in one two; do
  "$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -X -q -c "CREATE DATABASE $db"
done
POSTMASTER=$(head -n1 "$WORK/pg/postmaster.pid")

# Configs: the example with a free port, the longest token lifetime, no max_points, the
# sandbox partner taken out (issues are recorded only), and each its own storage.
base_config() {
  sed -e 's/^listen = .*/listen = "127.0.0.1:0"/' \
      -e 's/^token_ttl_seconds = .*/token_ttl_seconds = 86400/' \
      -e '/^max_points *=/d' -e '/^\[programs.partner\]/d' -e '/^sandbox = true/d' \
      config.example.toml
}
base_config | sed -e 's/^path = .*/path = "bench.redb"/' >"$WORK/redb.toml"
for db in one two; do
  base_config | sed -e "s|^path = .*|backend = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:$PGPORT/$db\"\npool_size = $POOL|" \
    >"$WORK/$db.toml"
  grep -q 'backend = "postgres"' "$WORK/$db.toml" || die "the example config changed shape"
done

listen_port() { # PID -> the TCP port it listens on
  local inode hex
  for inode in $(find "/proc/$1/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | tr -dc '0-9\n'); do
    hex=$(awk -v i="$inode" '$4 == "0A" && $10 == i {split($2, a, ":"); print a[2]}' /proc/net/tcp)
    if [ -n "$hex" ]; then echo $((16#$hex)); return 0; fi
  done
  return 1
}
start() { # NAME CONFIG -> sets PID_<NAME> and URL_<NAME>
  local pid port i
  "$SERVER_BIN" serve --config "$2" 2>"$WORK/$1.log" &
  pid=$!
  PIDS+=("$pid")
  for i in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || { cat "$WORK/$1.log" >&2; die "$1 did not start"; }
    port=$(listen_port "$pid") && break
    sleep 0.05
  done
  [ -n "${port:-}" ] || die "$1 is not listening"
  printf -v "PID_$1" '%s' "$pid"
  printf -v "URL_$1" '%s' "http://127.0.0.1:$port"
}
start redb "$WORK/redb.toml"
start one "$WORK/one.toml"
start twoa "$WORK/two.toml"
start twob "$WORK/two.toml"
"$BASELINE_BIN" 127.0.0.1:0 >"$WORK/baseline.out" 2>&1 &
PID_base=$!
PIDS+=("$PID_base")
for i in $(seq 100); do grep -q 'listening on' "$WORK/baseline.out" && break; sleep 0.1; done
URL_base=http://$(grep -o 'listening on 127\.0\.0\.1:[0-9]*' "$WORK/baseline.out" | awk '{print $3}')

token() {
  curl -sf --max-time 10 -X POST -H 'Content-Type: application/json' \
    -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' "$1/v1/auth" |
    sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p'
}
TOKEN_redb=$(token "$URL_redb")
TOKEN_one=$(token "$URL_one")
# A token of one process of the pair is used on both: the signing key is shared.
TOKEN_two=$(token "$URL_twoa")
[ -n "$TOKEN_redb" ] && [ -n "$TOKEN_one" ] && [ -n "$TOKEN_two" ] || die "could not mint tokens"

CLK_TCK=$(getconf CLK_TCK)
ticks_of() { # PIDS... -> their utime + stime summed
  local t=0 pid
  for pid in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0))); done
  echo "$t"
}
pg_pids() { # the postmaster and its children, now
  echo "$POSTMASTER"
  awk -v p="$POSTMASTER" '$4 == p {print $1}' /proc/[0-9]*/stat 2>/dev/null
}
pg_ticks() { # PostgreSQL's CPU, counted over processes alive at both ends and the ones that ended
  awk '{s += $14 + $15 + $16 + $17} END {print s}' $(printf '/proc/%s/stat ' $(pg_pids)) 2>/dev/null
}
rps() { awk '/^Requests\/sec:/ {print $2}' "$1"; }
requests() { awk '/ requests in / {print $1}' "$1"; }
thread_min() { awk '$1 == "LUA" && $2 ~ /^thread=/ { split($4, kv, "="); if (min == "" || kv[2] + 0 < min) min = kv[2] + 0 } END {print min + 0}' "$1"; }

# NAME SCRIPT ENV... over TARGET (base, redb, one, two): runs wrk; writes NAME.res:
# requests/s, server CPU us/request, PostgreSQL CPU us/request.
run() {
  local name=$1 target=$2 script=$3 path=$4 t0 t1 p0 p1 n r
  shift 4
  local pids url token
  case $target in
    two) pids=("$PID_twoa" "$PID_twob"); token=$TOKEN_two ;;
    *) eval "pids=(\"\$PID_$target\")"; eval "token=\${TOKEN_$target:-}" ;;
  esac
  t0=$(ticks_of "${pids[@]}"); p0=$(pg_ticks)
  if [ "$target" = two ]; then
    env TOKEN="$token" "$@" RUN="$name-a" wrk -t $((THREADS > 1 ? THREADS / 2 : 1)) -c $((CONNS / 2)) -d "${DURATION}s" \
      -s "$script" "$URL_twoa$path" >"$WORK/$name.a.txt" 2>&1 &
    local w=$!
    env TOKEN="$token" "$@" RUN="$name-b" wrk -t $((THREADS > 1 ? THREADS / 2 : 1)) -c $((CONNS / 2)) -d "${DURATION}s" \
      -s "$script" "$URL_twob$path" >"$WORK/$name.b.txt" 2>&1 || true
    wait "$w" || true
    r=$(awk -v a="$(rps "$WORK/$name.a.txt")" -v b="$(rps "$WORK/$name.b.txt")" 'BEGIN {printf "%.2f", a + b}')
    n=$(( $(requests "$WORK/$name.a.txt") + $(requests "$WORK/$name.b.txt") ))
  else
    eval "url=\$URL_$target"
    env TOKEN="$token" "$@" RUN="$name" wrk -t "$THREADS" -c "$CONNS" -d "${DURATION}s" \
      -s "$script" "$url$path" >"$WORK/$name.txt" 2>&1 || true
    r=$(rps "$WORK/$name.txt"); n=$(requests "$WORK/$name.txt")
  fi
  t1=$(ticks_of "${pids[@]}"); p1=$(pg_ticks)
  awk -v r="$r" -v n="$n" -v t=$((t1 - t0)) -v p=$((p1 - p0)) -v hz="$CLK_TCK" \
    'BEGIN { us = 1e6 / hz / n; printf "%s %.1f %.1f\n", r, t * us, (p > 0 ? p : 0) * us }' >"$WORK/$name.res"
}

say ""
say "== fill: issue-points for ${FILL_SECONDS}s on each target (the references GET asks for)"
for target in redb one two; do
  D=$DURATION; DURATION=$FILL_SECONDS
  run "fill_$target" "$target" "$BENCHES/issue.lua" /v1/transactions
  DURATION=$D
  if [ "$target" = two ]; then
    REFMAX_two=$(( $(thread_min "$WORK/fill_two.a.txt") < $(thread_min "$WORK/fill_two.b.txt") ? $(thread_min "$WORK/fill_two.a.txt") : $(thread_min "$WORK/fill_two.b.txt") ))
  else
    printf -v "REFMAX_$target" '%s' "$(thread_min "$WORK/fill_$target.txt")"
  fi
  say "   $target: $(cut -d' ' -f1 "$WORK/fill_$target.res") req/s while filling"
done
# Statistics after the fill, as autovacuum takes them within a minute or so of the first
# rows: without them, the servers' generic plans made while the tables were empty scan
# a whole business per lookup (docs/API.md, "PostgreSQL backend"). ANALYZE=0 skips it.
if [ "${ANALYZE:-1}" = 1 ]; then
  for db in one two; do
    "$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -X -q -d "$db" -c "ANALYZE"
  done
  say "   ANALYZE after the fill (ANALYZE=0 skips it)"
fi

say ""
printf '%-22s %10s %8s %14s %14s\n' "run" "req/s" "ratio" "server us/req" "postgres us/req"
for r in $(seq "$ROUNDS"); do
  run "base_post$r" base "$BENCHES/issue.lua" /
  run "base_get$r" base "$BENCHES/get.lua" / REFRUN=fill_redb REFTHREADS="$THREADS" REFMAX=100 PREFIX=/
  for target in redb one two; do
    run "issue_${target}$r" "$target" "$BENCHES/issue.lua" /v1/transactions
    eval "refmax=\$REFMAX_$target"
    margin=$((CONNS))
    if [ "$target" = two ]; then
      # Each process's fill ran with its own RUN; GET asks the references of fill_two-a.
      run "get_${target}$r" "$target" "$BENCHES/get.lua" /v1/transactions/ REFRUN=fill_two-a \
        REFTHREADS=$((THREADS > 1 ? THREADS / 2 : 1)) REFMAX=$((refmax > margin + 2 ? refmax - margin : 2))
    else
      run "get_${target}$r" "$target" "$BENCHES/get.lua" /v1/transactions/ REFRUN="fill_$target" \
        REFTHREADS="$THREADS" REFMAX=$((refmax > margin + 2 ? refmax - margin : 2))
    fi
  done
  for kind in post get; do
    base=$(cut -d' ' -f1 "$WORK/base_${kind}$r.res")
    printf '%-22s %10s %8s %14s %14s\n' "round $r baseline $kind" "$base" "1.00" "$(cut -d' ' -f2 "$WORK/base_${kind}$r.res")" "-"
    for target in redb one two; do
      name=$([ "$kind" = post ] && echo "issue_${target}$r" || echo "get_${target}$r")
      read -r rr cpu pg <"$WORK/$name.res"
      printf '%-22s %10s %8s %14s %14s\n' "round $r $name" "$rr" \
        "$(awk -v a="$rr" -v b="$base" 'BEGIN {printf "%.2f", a / b}')" "$cpu" "$([ "$target" = redb ] && echo - || echo "$pg")"
    done
  done
done

# Statuses: every issue a 201, every GET a 200 (get.lua and issue.lua print their counts).
bad=$(grep -h '^LUA' "$WORK"/issue_*.txt "$WORK"/issue_*.a.txt "$WORK"/issue_*.b.txt "$WORK"/get_*.txt 2>/dev/null |
  grep -v 'thread=' | grep -Eo '(other|missing|status404)=[1-9][0-9]*' | head -3 || true)
[ -z "$bad" ] || say "!! unexpected statuses: $bad"
say ""
say "(the Fastify 5 + better-sqlite3 peer in BENCHMARKS.md: 4,974 issue req/s, 39,274 GET req/s)"
