#!/usr/bin/env bash
# HTTP load test of Cosmopoints against a bare hyper baseline, in one run on 127.0.0.1.
#
#   bash benches/load.sh
#
# Installs wrk if missing, builds release, starts the server on a temp database with a
# temp config, mints a token, then (every wrk run bounded by -d, every process killed on
# exit):
#   1. fill: issue-points until FILL transactions are stored (one wrk run, bounded);
#   2. listing: GET /v1/transactions over the whole range (~FILL rows) with curl,
#      transactions/s, server RSS before, during and after;
#   3. ROUNDS x { baseline POST, issue-points, issue-points with a partner (a: the sandbox,
#      delivering while wrk runs; b: a partner that never answers, so the outbox rows are
#      written but delivery does not compete), baseline GET, get-by-reference }, each
#      THREADS x CONNS for DURATION s with --latency; figures as ratios to the baseline
#      measured in the same round (the machine is shared and noisy: absolute numbers
#      drift, ratios much less);
#   4. 256 connections briefly (GET and issue), RSS sampled during;
#   5. the count of 201s that wrk saw against the number of transactions stored;
#   6. delivery catch-up: server (b) restarted on its database with the sandbox partner
#      (pending deliveries resume after a restart); wall time and server CPU per credit
#      delivered until its outbox is drained.
# Each wrk run also reports the CPU time per request of the server (its writer thread
# apart), of the baseline and of wrk itself (from /proc, so noise-resistant), the bytes
# the server wrote to disk per request, where the writer thread spent the run (on a CPU,
# waiting for one, blocked) and, where `perf` works, the number of commits (fdatasync).
#
# Needs in Cargo.toml: [[example]] name = "baseline_server", path = "benches/baseline_server.rs".
#
# Environment knobs (defaults): DURATION=10 THREADS=2 CONNS=64 ROUNDS=2 FILL=100000
# FILL_TIMEOUT=300 LOG_LEVEL=info (the server's log filter; its log goes to a temp file)
# KEEP=0 (1 keeps the temp folder with the database, logs and wrk outputs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DURATION=${DURATION:-10}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-2}
FILL=${FILL:-100000}
FILL_TIMEOUT=${FILL_TIMEOUT:-300}
LOG_LEVEL=${LOG_LEVEL:-info}
KEEP=${KEEP:-0}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BENCHES=$ROOT/benches

say() { printf '%s\n' "$*"; }
die() { printf 'load.sh: %s\n' "$*" >&2; exit 1; }

# ---- tools ---------------------------------------------------------------------------
if ! command -v wrk >/dev/null 2>&1; then
  say "== installing wrk"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y wrk >/dev/null 2>&1 || {
    $SUDO apt-get update >/dev/null && $SUDO apt-get install -y wrk >/dev/null
  } || die "cannot install wrk"
fi
command -v curl >/dev/null || die "curl is needed"

say "== building (release)"
grep -q '^name = "baseline_server"' Cargo.toml ||
  die 'Cargo.toml needs: [[example]] name = "baseline_server" path = "benches/baseline_server.rs"'
cargo build --release --bin cosmopoints --example baseline_server
SERVER_BIN=$TARGET_DIR/release/cosmopoints
BASELINE_BIN=$TARGET_DIR/release/examples/baseline_server
[ -x "$SERVER_BIN" ] && [ -x "$BASELINE_BIN" ] || die "built binaries not found under $TARGET_DIR"

# ---- processes and cleanup -----------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cosmobench.XXXXXX")
SERVER_PID=""
NOBATCH_PID=""
PARTNER_PID=""
STALLED_PID=""
HUNG_PID=""
BASELINE_PID=""
SAMPLER_PID=""
WRK_PID=""
cleanup() {
  local pid
  for pid in "$WRK_PID" "$SAMPLER_PID" "$SERVER_PID" "$NOBATCH_PID" "$PARTNER_PID" "$STALLED_PID" "$HUNG_PID" "$BASELINE_PID"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "$WRK_PID" "$SAMPLER_PID" "$SERVER_PID" "$NOBATCH_PID" "$PARTNER_PID" "$STALLED_PID" "$HUNG_PID" "$BASELINE_PID"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
  if [ "$KEEP" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Config: the example with a free port, a temp database, the longest token lifetime, no
# max_points (random values must pass) and the chosen log level; the example's sandbox
# partner is taken out (issues are recorded only), and kept in partner.toml.
sed -e 's/^listen = .*/listen = "127.0.0.1:0"/' \
    -e 's/^path = .*/path = "bench.redb"/' \
    -e 's/^token_ttl_seconds = .*/token_ttl_seconds = 86400/' \
    -e '/^max_points *=/d' \
    -e "s/^# *log_level = .*/log_level = \"$LOG_LEVEL\"/" \
    config.example.toml > "$WORK/with-partner.toml"
grep -q '^log_level' "$WORK/with-partner.toml" ||
  sed -i "s/^\[server\]/[server]\nlog_level = \"$LOG_LEVEL\"/" "$WORK/with-partner.toml"
grep -q '^sandbox = true' "$WORK/with-partner.toml" || die "the example config has no sandbox partner"
sed -e '/^\[programs.partner\]/d' -e '/^sandbox = true/d' "$WORK/with-partner.toml" > "$WORK/cosmopoints.toml"
sed -e 's/^path = .*/path = "partner.redb"/' "$WORK/with-partner.toml" > "$WORK/partner.toml"

"$SERVER_BIN" serve --config "$WORK/cosmopoints.toml" 2>"$WORK/server.log" &
SERVER_PID=$!
# The same server with group commit off (one commit per write), on its own database: the
# "before" of group commit, measured in the same run.
sed -e 's/^path = .*/path = "nobatch.redb"/' -e 's/^\[server\]/[server]\nmax_batch = 1/' \
  "$WORK/cosmopoints.toml" > "$WORK/nobatch.toml"
"$SERVER_BIN" serve --config "$WORK/nobatch.toml" 2>"$WORK/nobatch.log" &
NOBATCH_PID=$!
# The same server with its program delivered to a partner (the sandbox: in process, so
# what it costs is the outbox row and the worker's write-backs, not a network), on its
# own database: issue throughput with a partner against without, in the same round.
"$SERVER_BIN" serve --config "$WORK/partner.toml" 2>"$WORK/partner.log" &
PARTNER_PID=$!
# (b) The same again, its partner one that accepts connections and never answers (a
# listening socket nobody accepts from), with concurrency 1: one attempt hangs, every
# other credit's outbox row waits, and the worker reads nothing while its one slot is
# taken. So this measures the outbox row without delivery competing for the CPU; the
# deliveries are measured after the rounds (6.), by restarting it with the sandbox.
command -v python3 >/dev/null || die "python3 is needed (the partner that never answers)"
python3 -c 'import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1024)
print(s.getsockname()[1], flush=True); time.sleep(1e9)' >"$WORK/hung.port" &
HUNG_PID=$!
for i in $(seq 50); do [ -s "$WORK/hung.port" ] && break; sleep 0.1; done
HUNG_PORT=$(cat "$WORK/hung.port")
[ -n "$HUNG_PORT" ] || die "the never-answering partner did not start"
sed -e 's/^path = .*/path = "stalled.redb"/' \
    -e "s|^sandbox = true.*|url = \"http://127.0.0.1:$HUNG_PORT\"\nsecret = \"whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3\"\ntimeout_seconds = 300\nretry_schedule_seconds = [3600]\nconcurrency = 1|" \
    "$WORK/with-partner.toml" > "$WORK/stalled.toml"
sed -e 's/^path = .*/path = "stalled.redb"/' "$WORK/with-partner.toml" > "$WORK/catchup.toml"
"$SERVER_BIN" serve --config "$WORK/stalled.toml" 2>"$WORK/stalled.log" &
STALLED_PID=$!
"$BASELINE_BIN" 127.0.0.1:0 >"$WORK/baseline.out" 2>&1 &
BASELINE_PID=$!

wait_for() { # FILE PATTERN -> the first match, within 15 s
  local i
  for i in $(seq 150); do
    if grep -qo "$2" "$1" 2>/dev/null; then grep -o "$2" "$1" | head -1; return 0; fi
    sleep 0.1
  done
  cat "$1" >&2
  return 1
}
listen_port() { # PID -> the TCP port it listens on (from /proc, whatever the log level)
  local inode hex
  for inode in $(find "/proc/$1/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | tr -dc '0-9\n'); do
    hex=$(awk -v i="$inode" '$4 == "0A" && $10 == i {split($2, a, ":"); print a[2]}' /proc/net/tcp)
    if [ -n "$hex" ]; then echo $((16#$hex)); return 0; fi
  done
  return 1
}
for i in $(seq 150); do
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; die "the server did not start"; }
  PORT=$(listen_port "$SERVER_PID") && break
  sleep 0.1
done
[ -n "${PORT:-}" ] || die "the server is not listening"
for i in $(seq 150); do
  kill -0 "$NOBATCH_PID" 2>/dev/null || { cat "$WORK/nobatch.log" >&2; die "the no-batch server did not start"; }
  NOBATCH_PORT=$(listen_port "$NOBATCH_PID") && break
  sleep 0.1
done
[ -n "${NOBATCH_PORT:-}" ] || die "the no-batch server is not listening"
NOBATCH_URL=http://127.0.0.1:$NOBATCH_PORT
for i in $(seq 150); do
  kill -0 "$PARTNER_PID" 2>/dev/null || { cat "$WORK/partner.log" >&2; die "the partner server did not start"; }
  PARTNER_PORT=$(listen_port "$PARTNER_PID") && break
  sleep 0.1
done
[ -n "${PARTNER_PORT:-}" ] || die "the partner server is not listening"
PARTNER_URL=http://127.0.0.1:$PARTNER_PORT
for i in $(seq 150); do
  kill -0 "$STALLED_PID" 2>/dev/null || { cat "$WORK/stalled.log" >&2; die "the stalled-partner server did not start"; }
  STALLED_PORT=$(listen_port "$STALLED_PID") && break
  sleep 0.1
done
[ -n "${STALLED_PORT:-}" ] || die "the stalled-partner server is not listening"
STALLED_URL=http://127.0.0.1:$STALLED_PORT
ADDR=127.0.0.1:$PORT
BASE_ADDR=$(wait_for "$WORK/baseline.out" 'listening on 127\.0\.0\.1:[0-9]*' | awk '{print $3}') ||
  die "the baseline server did not start"
URL=http://$ADDR
BASE_URL=http://$BASE_ADDR

TOKEN=$(curl -sf --max-time 10 -X POST -H 'Content-Type: application/json' \
  -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' "$URL/v1/auth" |
  sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p')
[ -n "$TOKEN" ] || die "could not mint a token"
export TOKEN
NOBATCH_TOKEN=$(curl -sf --max-time 10 -X POST -H 'Content-Type: application/json' \
  -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' "$NOBATCH_URL/v1/auth" |
  sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p')
[ -n "$NOBATCH_TOKEN" ] || die "could not mint a token on the no-batch server"
PARTNER_TOKEN=$(curl -sf --max-time 10 -X POST -H 'Content-Type: application/json' \
  -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' "$PARTNER_URL/v1/auth" |
  sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p')
[ -n "$PARTNER_TOKEN" ] || die "could not mint a token on the partner server"
STALLED_TOKEN=$(curl -sf --max-time 10 -X POST -H 'Content-Type: application/json' \
  -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' "$STALLED_URL/v1/auth" |
  sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p')
[ -n "$STALLED_TOKEN" ] || die "could not mint a token on the stalled-partner server"

# ---- measuring helpers ---------------------------------------------------------------
status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
mib() { awk -v kb="$1" 'BEGIN {printf "%.1f", kb / 1024}'; }
sampler_start() { # max VmRSS of the server every 50 ms into $WORK/rss.max
  echo 0 >"$WORK/rss.max"
  (
    max=0
    while kill -0 "$SERVER_PID" 2>/dev/null; do
      now=$(status_kb "$SERVER_PID" VmRSS 2>/dev/null || echo 0)
      if [ "${now:-0}" -gt "$max" ]; then max=$now; echo "$max" >"$WORK/rss.max"; fi
      sleep 0.05
    done
  ) &
  SAMPLER_PID=$!
}
sampler_stop() { # sets RSS_MAX (kB)
  kill "$SAMPLER_PID" 2>/dev/null || true
  wait "$SAMPLER_PID" 2>/dev/null || true
  SAMPLER_PID=""
  RSS_MAX=$(cat "$WORK/rss.max")
}
rps() { awk '/^Requests\/sec:/ {print $2}' "$1"; }
p99_ms() { # the 99% line of --latency, in ms
  awk '$1 == "99%" {
    v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
    if (u == "us") v /= 1000; else if (u == "s") v *= 1000; else if (u == "m") v *= 60000;
    printf "%.2f", v }' "$1"
}
lua_field() { # FILE NAME -> NAME=value of the "LUA ..." totals line
  awk -v k="$2" '$1 == "LUA" && $2 !~ /^thread=/ {
    for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) v = kv[2] } }
    END { print v + 0 }' "$1"
}
errors() { awk '/Socket errors|Non-2xx/ {sub(/^ +/, ""); printf "%s; ", $0}' "$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
CLK_TCK=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "$1"; } # utime + stime of a /proc stat file
writer_task() { # the server's writer thread's /proc folder
  local t
  for t in /proc/"$SERVER_PID"/task/*; do
    [ "$(cat "$t/comm" 2>/dev/null)" = cosmopoints-wri ] && { echo "$t"; return; }
  done
}
schedstat() { # on-CPU ns and waiting-for-a-CPU ns of a task
  if [ -r "$1/schedstat" ]; then awk '{print $1, $2}' "$1/schedstat"; else echo 0 0; fi
}
io_written() { awk '$1 == "write_bytes:" {print $2}' "/proc/$1/io"; }
requests() { awk '/ requests in / {print $1}' "$1"; }
# Commits are counted as the writer's fdatasync calls, with perf, where it works.
HAVE_PERF=0
perf stat -e syscalls:sys_enter_fdatasync -o /dev/null -- true >/dev/null 2>&1 && HAVE_PERF=1
# NAME PID SCRIPT URL CONNS DURATION [env...]: runs wrk against the server with pid PID;
# output in $WORK/NAME.txt, and in $WORK/NAME.cpu: requests, server CPU us/request, writer
# thread CPU us/request, wrk CPU us/request, bytes written to disk, the writer's seconds
# on a CPU and waiting for one, wall seconds, commits (fdatasync calls; -1: not counted).
wrk_run() {
  local name=$1 pid=$2 script=$3 url=$4 conns=$5 dur=$6 wtask="" t0 w0 io0 s0 t1 w1 io1 s1 n
  local ppid="" started ended commits=-1
  shift 6
  [ "$pid" = "$SERVER_PID" ] && wtask=$(writer_task)
  t0=$(ticks "/proc/$pid/stat"); io0=$(io_written "$pid")
  w0=$(ticks "${wtask:-/dev/null}/stat" 2>/dev/null || echo 0); s0=$(schedstat "$wtask")
  if [ -n "$wtask" ] && [ "$HAVE_PERF" = 1 ]; then
    perf stat -x, -e syscalls:sys_enter_fdatasync -t "${wtask##*/}" -o "$WORK/$name.perf" \
      -- sleep "$dur" >/dev/null 2>&1 &
    ppid=$!
  fi
  started=$(date +%s.%N)
  { TIMEFORMAT='%U %S'; time env "$@" wrk -t "$THREADS" -c "$conns" -d "${dur}s" --latency \
      -s "$script" "$url" >"$WORK/$name.txt" 2>"$WORK/$name.err"; } 2>"$WORK/$name.time" || true
  ended=$(date +%s.%N)
  t1=$(ticks "/proc/$pid/stat"); io1=$(io_written "$pid")
  w1=$(ticks "${wtask:-/dev/null}/stat" 2>/dev/null || echo 0); s1=$(schedstat "$wtask")
  if [ -n "$ppid" ]; then
    wait "$ppid" 2>/dev/null || true
    commits=$(awk -F, '/fdatasync/ {print $1 + 0}' "$WORK/$name.perf" 2>/dev/null)
  fi
  [ -s "$WORK/$name.err" ] && sed 's/^/  wrk stderr: /' "$WORK/$name.err" | head -3
  [ -n "$(rps "$WORK/$name.txt")" ] || { cat "$WORK/$name.txt" >&2; die "wrk run $name failed"; }
  n=$(requests "$WORK/$name.txt")
  awk -v n="$n" -v t=$((t1 - t0)) -v w=$((${w1:-0} - ${w0:-0})) -v hz="$CLK_TCK" \
    -v io=$((io1 - io0)) -v s="$s0 $s1" -v wall="$started $ended" -v c="${commits:--1}" \
    '{ us = 1e6 / hz / n; split(s, ss, " "); split(wall, ww, " ");
       printf "%d %.1f %.1f %.1f %d %.2f %.2f %.2f %d\n", n, t * us, w * us, ($1 + $2) * 1e6 / n, io,
         (ss[3] - ss[1]) / 1e9, (ss[4] - ss[2]) / 1e9, ww[2] - ww[1], c }' \
    "$WORK/$name.time" >"$WORK/$name.cpu"
}
cpu_line() { # NAME -> a readable summary of NAME.cpu
  awk '{ printf "CPU per request: server %s us", $2; if ($3 > 0) printf " (writer thread %s us)", $3;
         printf ", wrk %s us", $4; if ($5 > 0) printf "; disk writes %.1f KiB/request", $5 / 1024 / $1 }' "$WORK/$1.cpu"
}
writer_line() { # NAME -> where the writer thread spent the run
  awk '$3 > 0 { printf "writer thread: on a CPU %.0f%%, waiting for a CPU %.0f%%, blocked (fsync, idle) %.0f%% of %.1f s",
         100 * $6 / $8, 100 * $7 / $8, 100 * ($8 - $6 - $7) / $8, $8;
       if ($9 > 0) printf "; %d commits, %.1f requests per commit", $9, $1 / $9 }' "$WORK/$1.cpu"
}
TOTAL_201=0
add_201() { TOTAL_201=$((TOTAL_201 + $(lua_field "$1" status201))); }
list_all() { # OUTFILE -> "http_code seconds bytes"
  curl -s --max-time 120 -o "$1" -w '%{http_code} %{time_total} %{size_download}\n' \
    -H "Authorization: Bearer $TOKEN" \
    "$URL/v1/transactions?startDate=0000000000&endDate=9999999999"
}

say ""
say "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), kernel $(uname -r)"
say "   server $URL (pid $SERVER_PID, log_level=$LOG_LEVEL), baseline $BASE_URL (pid $BASELINE_PID)"
say "   wrk: $THREADS threads, $CONNS connections, ${DURATION}s per run, $ROUNDS rounds"
sleep 1
IDLE_RSS=$(status_kb "$SERVER_PID" VmRSS)
BASE_IDLE_RSS=$(status_kb "$BASELINE_PID" VmRSS)
say "   idle RSS: server $(mib "$IDLE_RSS") MiB, baseline $(mib "$BASE_IDLE_RSS") MiB"

# ---- 1. fill -------------------------------------------------------------------------
QUOTA=$(((FILL + THREADS - 1) / THREADS))
say ""
say "== fill: issue-points until $FILL transactions are stored (at most ${FILL_TIMEOUT}s)"
sampler_start
# wrk always runs for its whole -d: each thread that reaches its quota stops and drops a
# marker file, and wrk is interrupted (SIGINT: it stops and reports) once all have.
mkdir -p "$WORK/fill.done"
env RUN=fill QUOTA="$QUOTA" DONE_DIR="$WORK/fill.done" \
  wrk -t "$THREADS" -c "$CONNS" -d "${FILL_TIMEOUT}s" --latency -s "$BENCHES/issue.lua" \
  "$URL/v1/transactions" >"$WORK/fill.txt" 2>"$WORK/fill.err" &
WRK_PID=$!
while kill -0 "$WRK_PID" 2>/dev/null &&
  [ "$(find "$WORK/fill.done" -type f | wc -l)" -lt "$THREADS" ]; do
  sleep 0.2
done
kill -INT "$WRK_PID" 2>/dev/null || true
wait "$WRK_PID" || true
WRK_PID=""
[ -n "$(rps "$WORK/fill.txt")" ] || { cat "$WORK/fill.txt" "$WORK/fill.err" >&2; die "the fill run failed"; }
sampler_stop; FILL_RSS_MAX=$RSS_MAX
add_201 "$WORK/fill.txt"
# get.lua asks for "fill-<thread>-<n>" with n <= REFMAX: below each thread's count of 201s,
# less a margin for requests that were still in flight when the thread stopped.
REFMAX=$(awk -v margin="$CONNS" '$1 == "LUA" && $2 ~ /^thread=/ { split($4, kv, "=");
  if (min == "" || kv[2] + 0 < min) min = kv[2] + 0 } END {print min - margin}' "$WORK/fill.txt")
say "   $(lua_field "$WORK/fill.txt" status201) x 201 at $(rps "$WORK/fill.txt") req/s, p99 $(p99_ms "$WORK/fill.txt") ms; $(errors "$WORK/fill.txt")max RSS $(mib "$FILL_RSS_MAX") MiB"
[ "$REFMAX" -gt 0 ] || die "the fill step stored nothing"

# ---- 2. listing of ~FILL transactions --------------------------------------------------
say ""
say "== listing: GET /v1/transactions?startDate=0000000000&endDate=9999999999"
LIST_RSS_BEFORE=$(status_kb "$SERVER_PID" VmRSS)
sampler_start
BEST_LIST=""
for i in 1 2 3; do
  read -r code secs bytes < <(list_all /dev/null)
  [ "$code" = 200 ] || die "listing answered $code"
  say "   run $i: $secs s, $(mib $((bytes / 1024))) MiB"
  if [ -z "$BEST_LIST" ] || awk -v a="$secs" -v b="$BEST_LIST" 'BEGIN {exit !(a < b)}'; then
    BEST_LIST=$secs
  fi
done
read -r code secs bytes < <(list_all "$WORK/list.json")
sampler_stop; LIST_RSS_MAX=$RSS_MAX
LIST_RSS_AFTER=$(status_kb "$SERVER_PID" VmRSS)
LISTED=$(grep -o '"referenceNumber"' "$WORK/list.json" | wc -l)
LIST_TPS=$(awk -v n="$LISTED" -v s="$BEST_LIST" 'BEGIN {printf "%.0f", n / s}')
say "   $LISTED transactions in $BEST_LIST s (best of 3) = $LIST_TPS transactions/s, $(mib $((bytes / 1024))) MiB"
say "   RSS before $(mib "$LIST_RSS_BEFORE") MiB, max during $(mib "$LIST_RSS_MAX") MiB, after $(mib "$LIST_RSS_AFTER") MiB"
rm -f "$WORK/list.json"

# OURS BASE TARGET CODE: prints the comparison of two wrk runs (to the terminal) and a
# "name ratio" line (to stdout, for the summary).
report() {
  local o=$WORK/$1.txt b=$WORK/$2.txt rt verdict
  rt=$(ratio "$(rps "$o")" "$(rps "$b")")
  verdict=$(awk -v x="$rt" -v t="$3" 'BEGIN {print (x >= t) ? "met" : "NOT met"}')
  {
    printf '   %-8s %9s req/s p99 %7s ms | baseline %9s req/s p99 %7s ms | ratio %s (target >= %s: %s)\n' \
      "$1" "$(rps "$o")" "$(p99_ms "$o")" "$(rps "$b")" "$(p99_ms "$b")" "$rt" "$3" "$verdict"
    printf '            statuses: %s=%s other=%s; %s\n' "$4" "$(lua_field "$o" "status$4")" \
      "$(($(lua_field "$o" other) + $(lua_field "$o" status404)))" "$(errors "$o")"
    printf '            %s | baseline %s\n' "$(cpu_line "$1")" "$(cpu_line "$2")"
    [ "$4" = 201 ] && printf '            %s\n' "$(writer_line "$1")"
  } >&2
  echo "${1%%[0-9]*} $rt"
}

# ---- 3. rounds against the baseline ------------------------------------------------------
GET_ENV=(REFRUN=fill REFTHREADS="$THREADS" REFMAX="$REFMAX")
for r in $(seq "$ROUNDS"); do
  say ""
  say "== round $r"
  wrk_run "base_post$r" "$BASELINE_PID" "$BENCHES/issue.lua" "$BASE_URL/" "$CONNS" "$DURATION" RUN="base$r"
  wrk_run "issue$r" "$SERVER_PID" "$BENCHES/issue.lua" "$URL/v1/transactions" "$CONNS" "$DURATION" RUN="issue$r"
  add_201 "$WORK/issue$r.txt"
  wrk_run "partner$r" "$PARTNER_PID" "$BENCHES/issue.lua" "$PARTNER_URL/v1/transactions" "$CONNS" "$DURATION" RUN="partner$r" TOKEN="$PARTNER_TOKEN"
  wrk_run "stalled$r" "$STALLED_PID" "$BENCHES/issue.lua" "$STALLED_URL/v1/transactions" "$CONNS" "$DURATION" RUN="stalled$r" TOKEN="$STALLED_TOKEN"
  wrk_run "base_get$r" "$BASELINE_PID" "$BENCHES/get.lua" "$BASE_URL/" "$CONNS" "$DURATION" "${GET_ENV[@]}" PREFIX=/
  wrk_run "get$r" "$SERVER_PID" "$BENCHES/get.lua" "$URL/v1/transactions/" "$CONNS" "$DURATION" "${GET_ENV[@]}"
  report "issue$r" "base_post$r" 0.5 201 >>"$WORK/ratios"
  report "get$r" "base_get$r" 0.7 200 >>"$WORK/ratios"
  say "   issue-points with a partner (sandbox) against without, same round (target: the outbox costs <= 15%):"
  report "partner$r" "issue$r" 0.85 201 >>"$WORK/ratios_partner"
  say "   (b) the outbox row alone: a partner that never answers, delivery not competing, same round:"
  report "stalled$r" "issue$r" 0.85 201 >>"$WORK/ratios_stalled"
done

# ---- 3b. group commit off ------------------------------------------------------------------
say ""
say "== group commit off (max_batch = 1, its own database), against round 1's baseline"
wrk_run issue_nobatch "$NOBATCH_PID" "$BENCHES/issue.lua" "$NOBATCH_URL/v1/transactions" "$CONNS" "$DURATION" RUN=nobatch TOKEN="$NOBATCH_TOKEN"
report issue_nobatch base_post1 0.5 201 >"$WORK/ratios_nobatch"
kill "$NOBATCH_PID" 2>/dev/null || true
wait "$NOBATCH_PID" 2>/dev/null || true
NOBATCH_PID=""

# ---- 4. 256 connections ----------------------------------------------------------------
say ""
say "== 256 connections, ${DURATION}s per run (RSS sampled during the server's runs)"
say "   RSS before: $(mib "$(status_kb "$SERVER_PID" VmRSS)") MiB"
wrk_run base_post256 "$BASELINE_PID" "$BENCHES/issue.lua" "$BASE_URL/" 256 "$DURATION" RUN=base256
sampler_start
wrk_run issue256 "$SERVER_PID" "$BENCHES/issue.lua" "$URL/v1/transactions" 256 "$DURATION" RUN=c256
sampler_stop; C256_RSS_MAX=$RSS_MAX
add_201 "$WORK/issue256.txt"
wrk_run base_get256 "$BASELINE_PID" "$BENCHES/get.lua" "$BASE_URL/" 256 "$DURATION" "${GET_ENV[@]}" PREFIX=/
sampler_start
wrk_run get256 "$SERVER_PID" "$BENCHES/get.lua" "$URL/v1/transactions/" 256 "$DURATION" "${GET_ENV[@]}"
sampler_stop
if [ "$RSS_MAX" -gt "$C256_RSS_MAX" ]; then C256_RSS_MAX=$RSS_MAX; fi
report issue256 base_post256 0.5 201 >"$WORK/ratios256"
report get256 base_get256 0.7 200 >>"$WORK/ratios256"
say "   max RSS during: $(mib "$C256_RSS_MAX") MiB"

# ---- 5. acknowledged vs stored -----------------------------------------------------------
read -r code secs bytes < <(list_all "$WORK/list.json")
[ "$code" = 200 ] || die "listing answered $code"
STORED=$(grep -o '"referenceNumber"' "$WORK/list.json" | wc -l)
rm -f "$WORK/list.json"
PEAK=$(status_kb "$SERVER_PID" VmHWM)
FINAL_RSS=$(status_kb "$SERVER_PID" VmRSS)
ISSUE_RUNS=$((1 + ROUNDS + 1))
say ""
say "== summary"
say "   201s seen by wrk: $TOTAL_201; transactions stored (listing): $STORED; stored - seen = $((STORED - TOTAL_201))"
say "   (responses in flight when a wrk run ends are committed but not counted: 0 <= difference <= $((ISSUE_RUNS * 256)) expected)"
if [ "$STORED" -lt "$TOTAL_201" ]; then say "   !! fewer stored than acknowledged: a durability bug"; fi
awk '{n[$1]++; s[$1] += $2; if (min[$1] == "" || $2 < min[$1]) min[$1] = $2}
     END {for (k in n) printf "   %-6s ratio to baseline: mean %.2f, worst %.2f over %d rounds\n", k, s[k] / n[k], min[k], n[k]}' "$WORK/ratios" | sort
awk '{printf "   %-6s ratio to baseline at 256 connections: %s\n", $1, $2}' "$WORK/ratios256"
awk '{printf "   issue-points with group commit off (max_batch = 1): ratio %s; with it on (round 1): %s\n", $2, on}' \
  on="$(awk '$1 == "issue" {print $2; exit}' "$WORK/ratios")" "$WORK/ratios_nobatch"
awk '{n++; s += $2; if (min == "" || $2 < min) min = $2}
     END {printf "   issue-points with a partner / without: mean %.2f, worst %.2f over %d rounds (>= 0.85 wanted)\n", s / n, min, n}' "$WORK/ratios_partner"
PENDING=$(curl -s --max-time 60 -H "Authorization: Bearer $PARTNER_TOKEN" \
  "$PARTNER_URL/v1/transactions?startDate=0000000000&endDate=9999999999&status=pending&limit=1000" |
  grep -o '"referenceNumber"' | wc -l || true)
awk '{n++; s += $2; if (min == "" || $2 < min) min = $2}
     END {printf "   (b) outbox row alone (partner not answering, delivery not competing) / without: mean %.2f, worst %.2f over %d rounds (>= 0.85 wanted)\n", s / n, min, n}' "$WORK/ratios_stalled"
for r in $(seq "$ROUNDS"); do
  awk -v r="$r" -v f="$WORK/issue$r.cpu" -v g="$WORK/stalled$r.cpu" 'FNR == 1 && FILENAME == ARGV[1] {p = $2} FNR == 1 && FILENAME == f {i = $2} FNR == 1 && FILENAME == g {s = $2}
    END {printf "   round %d server CPU per issue: without %s us, outbox row only %s us, with delivery (a) %s us: delivery ~ %.1f us per credit while issuing\n", r, i, s, p, p - s}' \
    "$WORK/partner$r.cpu" "$WORK/issue$r.cpu" "$WORK/stalled$r.cpu"
done
say "   partner server: $PENDING transactions still pending at the end (of the last page of 1000 at most)"
say "   listing: $LIST_TPS transactions/s"
say "   RSS: idle $(mib "$IDLE_RSS") MiB, 256 connections $(mib "$C256_RSS_MAX") MiB, listing $(mib "$LIST_RSS_MAX") MiB, now $(mib "$FINAL_RSS") MiB, peak (VmHWM) $(mib "$PEAK") MiB"
say "   baseline peak RSS (VmHWM): $(mib "$(status_kb "$BASELINE_PID" VmHWM)") MiB"
say "   database file: $(mib $(($(stat -c %s "$WORK/bench.redb") / 1024))) MiB for $STORED transactions"
say "   server log: $(wc -l <"$WORK/server.log") lines, partner server log: $(wc -l <"$WORK/partner.log") lines"
say "   server log: $(wc -l <"$WORK/server.log") lines, $(mib $(($(stat -c %s "$WORK/server.log") / 1024))) MiB"

# ---- 6. delivery catch-up ----------------------------------------------------------------
pending_on() { # URL TOKEN -> pending transactions (the whole listing)
  curl -s --max-time 120 -H "Authorization: Bearer $2" \
    "$1/v1/transactions?startDate=0000000000&endDate=9999999999&status=pending" |
    grep -o '"referenceNumber"' | wc -l || true
}
say ""
say "== delivery catch-up: the stalled-partner server restarted with the sandbox partner"
QUEUED=$(pending_on "$STALLED_URL" "$STALLED_TOKEN")
kill -TERM "$STALLED_PID" 2>/dev/null || true
wait "$STALLED_PID" 2>/dev/null || true
"$SERVER_BIN" serve --config "$WORK/catchup.toml" 2>"$WORK/catchup.log" &
STALLED_PID=$!
CATCHUP_PORT=""
for i in $(seq 300); do
  kill -0 "$STALLED_PID" 2>/dev/null || { cat "$WORK/catchup.log" >&2; die "the catch-up server did not start"; }
  CATCHUP_PORT=$(listen_port "$STALLED_PID") && break
  sleep 0.02
done
[ -n "$CATCHUP_PORT" ] || die "the catch-up server is not listening"
t0=$(ticks "/proc/$STALLED_PID/stat"); started=$(date +%s.%N)
CATCHUP_URL=http://127.0.0.1:$CATCHUP_PORT
CATCHUP_TOKEN=$(curl -sf --max-time 10 -X POST -H 'Content-Type: application/json' \
  -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' "$CATCHUP_URL/v1/auth" |
  sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p')
# The one attempt that hung waits an hour for its retry: drained means at most 1 left.
# The poll asks for one row every 0.2 s: its own cost is small against the deliveries'.
LEFT=$QUEUED
for i in $(seq 3000); do
  LEFT=$(curl -s --max-time 30 -H "Authorization: Bearer $CATCHUP_TOKEN" \
    "$CATCHUP_URL/v1/transactions?startDate=0000000000&endDate=9999999999&status=pending&limit=2" |
    grep -o '"referenceNumber"' | wc -l || true)
  [ "$LEFT" -le 1 ] && break
  sleep 0.2
done
ended=$(date +%s.%N); t1=$(ticks "/proc/$STALLED_PID/stat")
awk -v q="$QUEUED" -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v a="$started" -v b="$ended" -v left="$LEFT" \
  'BEGIN { d = q - left; if (d < 1) d = 1;
    printf "   %d credits queued; drained (%d left) in %.2f s = %.0f credits/s; server CPU %.1f us per credit delivered\n",
      q, left, b - a, d / (b - a), t * 1e6 / hz / d }'
