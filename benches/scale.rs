//! Reads at scale: opens the database named in a config (filled by `fill_database`) and
//! times what a client waits for, through the store as the server uses it:
//! opening the file (start-up), lookups by reference and by id of transactions spread
//! over the whole file, the same references again, the most recent transactions by
//! reference and by id, and a 10,000-row listing from the middle of the date range. For
//! each look-up pass it also prints how many reads of the file a look-up made.
//!
//! The yardstick, measured in the same run: the same look-ups by position in a
//! `std::collections::BTreeMap` of N entries held wholly in memory, each with a record
//! of about a stored transaction's size. What it costs at 10 million against 10,000 is
//! what size alone costs on this machine (CPU cache and TLB misses), with no file, no
//! page cache and no decoding.
//!
//! Usage: `cargo run --release --example scale_bench -- CONFIG N` (N = how many
//! `fill_database` wrote). `benches/scale.sh` runs it at 10,000 and at 10 million.

use std::time::Instant;

use cosmopoints::clock::Clock;
use cosmopoints::config::Config;
use cosmopoints::domain::BusinessId;
use cosmopoints::store::{Limits, Store, TxQuery};

/// The server's allocator (its default feature): a page read from the file is a fresh
/// allocation, so the look-ups measured here depend on it.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const LOOKUPS: u64 = 20_000;

/// The read system calls this process has made so far (`syscr` in `/proc/self/io`; 0
/// where that file is missing, and then every pass shows 0). The look-ups run on this
/// thread and the store's writer is idle, so the difference over a pass, per look-up, is
/// how many pages the look-ups read from the file rather than from redb's cache (redb
/// reads a page per call).
fn read_calls() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|line| line.strip_prefix("syscr: ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One pass of look-ups: µs and file reads per look-up.
struct Pass {
    us: f64,
    reads: f64,
}

impl Pass {
    /// The pass that began at `started`, with `reads` read calls made before it.
    fn since(started: Instant, reads: u64, lookups: usize) -> Pass {
        let lookups = lookups.max(1) as f64;
        Pass {
            us: started.elapsed().as_secs_f64() * 1e6 / lookups,
            reads: read_calls().saturating_sub(reads) as f64 / lookups,
        }
    }
}

/// Looks up each of `ids`.
async fn by_id(store: &Store, business: &BusinessId, ids: &[String]) -> Pass {
    let (reads, started) = (read_calls(), Instant::now());
    for id in ids {
        let tx = store.transaction(business, id).await.expect("read");
        assert!(tx.is_some());
    }
    Pass::since(started, reads, ids.len())
}

/// Looks up the `LOOKUPS` references `fill-{pick(k)}`; with the ids found.
async fn by_reference(
    store: &Store,
    business: &BusinessId,
    pick: impl Fn(u64) -> String,
) -> (Pass, Vec<String>) {
    let mut ids = Vec::with_capacity(LOOKUPS as usize);
    let (reads, started) = (read_calls(), Instant::now());
    for k in 0..LOOKUPS {
        let reference = format!("fill-{}", pick(k));
        let tx = store
            .transaction(business, &reference)
            .await
            .expect("read")
            .expect("found");
        ids.push(tx.id.to_string());
    }
    (Pass::since(started, reads, ids.len()), ids)
}

/// A stored record's size, about: the yardstick map's value.
const RECORD_BYTES: usize = 200;

/// The yardstick: a `BTreeMap` of `count` records, looked up at the positions `pick`
/// gives (the same spread as the store's passes); µs per look-up, best of two passes.
fn in_memory_map(count: u64, pick: impl Fn(u64) -> u64) -> f64 {
    let map: std::collections::BTreeMap<u64, [u8; RECORD_BYTES]> = (0..count)
        .map(|seq| (seq, [seq as u8; RECORD_BYTES]))
        .collect();
    let mut best = f64::MAX;
    for _ in 0..2 {
        let started = Instant::now();
        let mut sum = 0u64;
        for k in 0..LOOKUPS {
            let record = map.get(&pick(k)).expect("every position is in the map");
            sum += u64::from(record[0]) + u64::from(record[RECORD_BYTES - 1]);
        }
        std::hint::black_box(sum);
        best = best.min(started.elapsed().as_secs_f64() * 1e6 / LOOKUPS as f64);
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, count] = args.as_slice() else {
        eprintln!("usage: scale_bench CONFIG N");
        std::process::exit(2);
    };
    let count: u64 = count.parse().expect("N is a whole number");
    let config = Config::load(std::path::Path::new(config)).expect("the config loads");
    let opened = Instant::now();
    let store = Store::open(
        &config.storage_path,
        Clock::manual(1_795_774_500),
        Limits {
            max_batch: 1000,
            queue: 1000,
            cache_bytes: config.storage_cache_bytes,
        },
    )
    .expect("the database opens");
    let open_ms = opened.elapsed().as_secs_f64() * 1e3;
    let business = config.businesses[0].id.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // Positions spread over the file (a multiplicative step visits them out of order),
        // and their references.
        let position = |k: u64| k.wrapping_mul(2_654_435_761) % count.max(1);
        let pick = |k: u64| position(k).to_string();
        let (first, ids) = by_reference(&store, &business, pick).await;
        let ids_pass = by_id(&store, &business, &ids).await;
        // The same references again: the pages they need are now in the page cache if it
        // holds them (a working set of recent transactions, as a live server has).
        let (again, _) = by_reference(&store, &business, pick).await;
        // The most recent transactions (the last 20,000 written, or all N when fewer, in
        // a scrambled order): what a point of sale mostly asks about is a transaction it
        // has just issued. Their records are neighbours in the file whatever their
        // references; their references are neighbours in the index only because
        // fill_database numbers them in order (`fill-<i>`).
        let recent = LOOKUPS.min(count.max(1));
        let pick_recent = |k: u64| {
            let back = k.wrapping_mul(2_654_435_761) % recent;
            (count.max(1) - 1 - back).to_string()
        };
        let (recent, recent_ids) = by_reference(&store, &business, pick_recent).await;
        let recent_ids_pass = by_id(&store, &business, &recent_ids).await;
        // fill_database writes ten transactions per second of its clock.
        let middle = 1_795_774_500 + count.saturating_sub(10_000) / 20;
        let started = Instant::now();
        let mut listing = store
            .list(
                TxQuery {
                    business: business.clone(),
                    program: None,
                    start: middle,
                    end: u64::MAX / 2,
                    after: None,
                    limit: Some(10_000),
                    status: None,
                },
                |rows| rows.len(),
            )
            .expect("listing");
        let mut rows = 0;
        while let Some(batch) = listing.next().await {
            rows += batch.expect("rows");
        }
        let listing_ms = started.elapsed().as_secs_f64() * 1e3;
        let bytes = std::fs::metadata(&config.storage_path)
            .map(|m| m.len())
            .unwrap_or(0);
        let map_us = in_memory_map(count.max(1), position);
        println!(
            "transactions={count} open_ms={open_ms:.1} by_reference_us={:.1} by_id_us={:.1} \
             by_reference_again_us={:.1} by_reference_recent_us={:.1} by_id_recent_us={:.1} \
             file_reads_per_lookup={:.2}/{:.2}/{:.2}/{:.2}/{:.2} \
             listing_{rows}_rows_ms={listing_ms:.1} \
             file_bytes={bytes} bytes_per_transaction={:.0} in_memory_map_us={map_us:.2}",
            first.us,
            ids_pass.us,
            again.us,
            recent.us,
            recent_ids_pass.us,
            first.reads,
            ids_pass.reads,
            again.reads,
            recent.reads,
            recent_ids_pass.reads,
            bytes as f64 / count.max(1) as f64
        );
        store.shutdown().await;
        store.close().await;
    });
}
