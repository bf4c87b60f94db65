#!/usr/bin/env bash
# `cosmopoints migrate` at scale: a redb file of N transactions copied into PostgreSQL.
#
#   bash benches/migrate.sh                # 1,000,000 transactions
#   N=100000 bash benches/migrate.sh
#
# fill_database writes N transactions through the store (5,000 per commit) into a fresh
# redb file; a throwaway PostgreSQL cluster is started (Debian's postgresql package:
# initdb into a temp dir, a free port, as the `postgres` user when run as root); then
# `cosmopoints migrate` is timed (wall clock, and its own and PostgreSQL's CPU), followed
# by `cosmopoints check` on the copy. Printed: the times, transactions per second, and
# the redb file's and the PostgreSQL database's bytes per transaction. Everything lives
# in a temp folder removed at the end (KEEP=1 keeps it).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
N=${N:-1000000}
KEEP=${KEEP:-0}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)}
[ -x "$PGBIN/initdb" ] || { echo "migrate.sh: PostgreSQL's binaries are needed" >&2; exit 1; }

cargo build --release --locked --quiet --bin cosmopoints --example fill_database
BIN=$TARGET_DIR/release/cosmopoints
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cosmomig.XXXXXX")
chmod 755 "$WORK"
AS_PG=()
[ "$(id -u)" -eq 0 ] && { chown postgres "$WORK"; AS_PG=(runuser -u postgres --); }
cleanup() {
  "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  if [ "$KEEP" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

PGPORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${AS_PG[@]}" "$PGBIN/initdb" -D "$WORK/pg" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
"${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w \
  -o "-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1 -c shared_buffers=256MB" start >/dev/null
"$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -X -q -c "CREATE DATABASE copy"
POSTMASTER=$(head -n1 "$WORK/pg/postmaster.pid")

sed -e "s|^path = .*|path = \"$WORK/source.redb\"|" config.example.toml >"$WORK/redb.toml"
sed -e "s|^path = .*|backend = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:$PGPORT/copy\"|" \
  config.example.toml >"$WORK/pg.toml"
grep -q 'backend = "postgres"' "$WORK/pg.toml" || { echo "the example config changed shape" >&2; exit 1; }

echo "== filling $N transactions into redb"
"$TARGET_DIR/release/examples/fill_database" "$WORK/redb.toml" "$N"
SOURCE_BYTES=$(stat -c %s "$WORK/source.redb")

pg_ticks() { # the postmaster's own and its exited children's CPU, and its live children's
  local t pid
  t=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$POSTMASTER/stat")
  for pid in $(awk -v p="$POSTMASTER" '$4 == p {print $1}' /proc/[0-9]*/stat 2>/dev/null); do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
CLK_TCK=$(getconf CLK_TCK)
echo "== cosmopoints migrate"
PG0=$(pg_ticks)
START=$(date +%s.%N)
/usr/bin/time -f '%U %S' -o "$WORK/time" "$BIN" migrate --from "$WORK/source.redb" --config "$WORK/pg.toml"
END=$(date +%s.%N)
sleep 1 # the backend of the copy exits and is reaped: its CPU is then in the postmaster's cutime
PG1=$(pg_ticks)
read -r USER_S SYS_S <"$WORK/time"
DB_BYTES=$("$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -X -At -c "SELECT pg_database_size('copy')")
echo "== cosmopoints check on the copy"
CHECK_START=$(date +%s.%N)
"$BIN" check --config "$WORK/pg.toml"
CHECK_END=$(date +%s.%N)
python3 - "$N" "$START" "$END" "$USER_S" "$SYS_S" "$PG0" "$PG1" "$CLK_TCK" "$SOURCE_BYTES" "$DB_BYTES" "$CHECK_START" "$CHECK_END" <<'PY'
import sys
n, start, end, user, sys_, pg0, pg1, tck, src, db, c0, c1 = sys.argv[1:]
n = int(n); wall = float(end) - float(start)
print(f"migrate: {n:,} transactions in {wall:.1f} s wall ({n / wall:,.0f}/s); "
      f"cosmopoints CPU {float(user) + float(sys_):.1f} s, PostgreSQL CPU {(int(pg1) - int(pg0)) / int(tck):.1f} s")
print(f"check of the copy: {float(c1) - float(c0):.1f} s")
print(f"bytes per transaction: redb file {int(src) / n:.0f}, PostgreSQL database {int(db) / n:.0f}")
PY
