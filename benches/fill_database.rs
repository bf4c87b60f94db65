//! Fills the database named in a config with N transactions through the store itself
//! (`Store::issue_many`, 5,000 per commit), much faster than over HTTP: the data set
//! for timing backups and restores (see BENCHMARKS.md).
//!
//! Usage: `cargo run --release --example fill_database -- CONFIG N`. The transactions
//! belong to the config's first business, spread over its enabled programs, ten per
//! second of a manual clock that starts at 2026-11-27T10:15:00Z; references are
//! `fill-<i>`, so a second run with the same N writes nothing new (all replays).

use std::sync::Arc;

use cosmopoints::clock::Clock;
use cosmopoints::config::Config;
use cosmopoints::domain::{ReferenceNumber, UserId};
use cosmopoints::ledger::{quote, NewTransaction, Recipient};
use cosmopoints::store::{Issue, Limits, Store};

/// Transactions per write (per commit); `PER_COMMIT=n` in the environment sets another
/// (a small one, as single issues under load make, measures the per-commit cost).
const IN_FLIGHT: usize = 5_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, count] = args.as_slice() else {
        eprintln!("usage: fill_database CONFIG N");
        std::process::exit(2);
    };
    let count: u64 = count.parse().expect("N is a whole number");
    let per_commit: usize = std::env::var("PER_COMMIT")
        .map(|n| n.parse().expect("PER_COMMIT is a whole number"))
        .unwrap_or(IN_FLIGHT);
    let config = Config::load(std::path::Path::new(config)).expect("the config loads");
    let clock = Clock::manual(1_795_774_500);
    let store = Arc::new(
        Store::open(
            &config.storage_path,
            clock.clone(),
            Limits {
                max_batch: per_commit,
                queue: per_commit,
                cache_bytes: config.storage_cache_bytes,
            },
        )
        .expect("the database opens (is a server running on it?)"),
    );
    let business = config.businesses[0].clone();
    let currency = config.currency(&business.currency).clone();
    let programs: Vec<_> = business
        .programs
        .iter()
        .map(|id| config.programs[id].clone())
        .collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let started = std::time::Instant::now();
    runtime.block_on(async {
        let mut next = 0u64;
        while next < count {
            let end = (next + per_commit as u64).min(count);
            clock.set(1_795_774_500 + next / 10);
            let mut batch = Vec::with_capacity((end - next) as usize);
            for i in next..end {
                let program = programs[i as usize % programs.len()].clone();
                // Values whose points fall within every example program's limits.
                let value = 100_000 + (i % 1000) * 100;
                let total_points = quote(&currency, &program, value).expect("a valid quote");
                let issue = Issue {
                    business: business.id.clone(),
                    program_name: program.name.clone(),
                    currency: currency.code.clone(),
                    total_points,
                    request: NewTransaction {
                        program_id: program.id.clone(),
                        value,
                        recipient: Recipient::Member(
                            UserId::parse(format!("member-{}", i % 5000)).expect("valid"),
                        ),
                        reference_number: ReferenceNumber::parse(format!("fill-{i}"))
                            .expect("valid"),
                        description: None,
                        bonus: i % 7 == 0,
                    },
                    user_id: UserId::parse(format!("member-{}", i % 5000)).expect("valid"),
                    deliver: false,
                };
                batch.push(issue);
            }
            // One write (one commit) per chunk, as a bulk issuance makes.
            store.issue_many(batch).await.expect("stored");
            next = end;
        }
        store.shutdown().await;
        store.close().await;
    });
    let (commits, writes) = store.commit_stats();
    println!(
        "{count} transactions in {:.1} s ({commits} commits, {writes} writes)",
        started.elapsed().as_secs_f64()
    );
}
