#!/usr/bin/env bash
# Scale: the same reads on a small and a large database, in one run.
#
#   bash benches/scale.sh            # 10,000 and 10,000,000 transactions
#   SIZES="10000 1000000" bash benches/scale.sh
#   CACHE_MIB=1024 bash benches/scale.sh   # storage.cache_mib for both sizes
#
# For each size, fill_database writes the transactions through the store (5,000 per
# commit; not the HTTP API) into a fresh file, then scale_bench opens it and times the
# start-up open, 20,000 lookups by reference and by id spread over the file, the same
# 20,000 by reference again (now in the page cache if it holds them), the 20,000 most
# recent by reference and by id, and a 10,000-row listing; it prints the file reads per
# look-up of each look-up pass and the file size per transaction. Then, as the yardstick
# in the same run, the same spread of look-ups in a std BTreeMap of N records held in
# memory (in_memory_map_us): what size alone costs on this machine. The databases live in
# a temp folder removed at the end (10M transactions take about 2.3 GB on disk, and the
# yardstick map about 4.5 GB of memory while it is built).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"10000 10000000"}
cargo build --release --locked --quiet --example fill_database --example scale_bench
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for n in $SIZES; do
  sed -e "s|^path = .*|path = \"$WORK/scale-$n.redb\"|" config.example.toml > "$WORK/c-$n.toml"
  if [ -n "${CACHE_MIB:-}" ]; then
    sed -i "s|^path = .*|&\ncache_mib = $CACHE_MIB|" "$WORK/c-$n.toml"
  fi
  target/release/examples/fill_database "$WORK/c-$n.toml" "$n"
  target/release/examples/scale_bench "$WORK/c-$n.toml" "$n"
  rm -f "$WORK/scale-$n.redb"
done
