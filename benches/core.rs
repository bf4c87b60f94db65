//! Micro-benchmarks of the hot paths under the HTTP layer: `cargo bench --bench core`.
//!
//! - `token/sign`, `token/verify`: one bearer token (HMAC-SHA256 + base64url).
//! - `points/points_for`: the exact points formula (u128 integer math).
//! - `store/insert/N`: N concurrent `Store::issue` calls against a store opened with
//!   `max_batch = N` (queue `2N`), awaited together. Each commit is durable (fsync), so
//!   this measures group commit: time per element falls as N grows, until the writer's
//!   CPU work (redb B-tree inserts, postcard) dominates the fsync. How many commits a
//!   round takes depends on how fast the writer thread wakes; N is the most per commit.
//! - `store/by_reference`, `store/transaction_by_ref`: point reads in a 10k store.
//! - `store/scan_json_10k`: a 10k range scan with serde_json encoding of each row into
//!   one buffer, as the listing endpoint does.
//!
//! The whole run takes about 1–2 minutes (slow groups use small sample sizes and short
//! measurement times). Figures are only comparable within one run on one machine.

use std::future::Future;
use std::hint::black_box;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use cosmopoints::auth::{Claims, TokenKey};
use cosmopoints::clock::Clock;
use cosmopoints::decimal::{points_for, Decimal};
use cosmopoints::domain::{BusinessId, Description, ProgramId, ReferenceNumber, UserId};
use cosmopoints::ledger::NewTransaction;
use cosmopoints::store::{Issue, Issued, Limits, Store, TxQuery};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};

const BUSINESS: &str = "demo";

/// Unique referenceNumbers across the whole process.
static NEXT_REF: AtomicU64 = AtomicU64::new(0);

fn business() -> BusinessId {
    BusinessId::parse(BUSINESS).expect("a valid id")
}

fn issue(reference: String, value: u64) -> Issue {
    Issue {
        business: business(),
        program_name: "Skywards Miles".to_owned(),
        currency: "AED".to_owned(),
        total_points: value / 44,
        request: NewTransaction {
            program_id: ProgramId::parse("skywards").expect("a valid id"),
            value,
            recipient: cosmopoints::ledger::Recipient::Member(
                UserId::parse(format!("user-{:06}", value % 1_000_000)).expect("a valid id"),
            ),
            reference_number: ReferenceNumber::parse(reference).expect("a valid reference"),
            description: Some(
                Description::parse("Flat white and a croissant, table 12").expect("a description"),
            ),
            bonus: false,
        },
        user_id: UserId::parse(format!("user-{:06}", value % 1_000_000)).expect("a valid id"),
        deliver: false,
    }
}

fn fresh_reference() -> String {
    format!("bench-{:010}", NEXT_REF.fetch_add(1, Ordering::Relaxed))
}

/// Awaits every future, polling all of them in each pass, so that all are submitted to
/// the writer before any is awaited (no extra crate needed).
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(
                outputs
                    .iter_mut()
                    .map(|o| o.take().expect("ready"))
                    .collect(),
            )
        }
    })
    .await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Issues `n` new transactions concurrently and checks that all were created.
async fn insert_round(store: &Store, n: usize) {
    let calls: Vec<_> = (0..n)
        .map(|i| store.issue(issue(fresh_reference(), 1_000 + i as u64)))
        .collect();
    for outcome in join_all(calls).await {
        match outcome {
            Ok(Issued::Created(_)) => {}
            other => panic!("issue failed: {other:?}"),
        }
    }
}

fn open(path: &Path, batch: usize) -> Store {
    Store::open(path, Clock::system(), Limits::new(batch, batch * 2)).expect("open the store")
}

fn tokens(c: &mut Criterion) {
    let key = TokenKey::new(&[7u8; 32]);
    let claims = Claims {
        business: BUSINESS.into(),
        client: "demo-pos".into(),
        issued_at: 1_800_000_000,
        expires_at: 1_800_086_400,
    };
    let token = key.sign(&claims).expect("short ids");
    let mut group = c.benchmark_group("token");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign", |b| b.iter(|| key.sign(black_box(&claims))));
    group.bench_function("verify", |b| {
        b.iter(|| key.verify(black_box(&token), black_box(1_800_000_100)))
    });
    group.finish();
}

fn points(c: &mut Criterion) {
    let aed = Decimal::parse("3.6725").expect("decimal");
    let price = Decimal::parse("0.012").expect("decimal");
    let mut group = c.benchmark_group("points");
    group.throughput(Throughput::Elements(1));
    group.bench_function("points_for", |b| {
        b.iter(|| {
            points_for(
                black_box(3_673),
                black_box(2),
                black_box(aed),
                black_box(price),
            )
        })
    });
    group.finish();
}

fn store_insert(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("store/insert");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    for batch in [1usize, 10, 100, 1000] {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = open(&dir.path().join("bench.redb"), batch);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &n| {
            b.iter(|| rt.block_on(insert_round(&store, n)))
        });
        rt.block_on(store.shutdown());
    }
    group.finish();
}

/// Bytes this process has caused to be written to storage so far (Linux; 0 elsewhere).
fn disk_bytes_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Batches of 32 (what 64 keep-alive connections give the writer: two batches in flight)
/// into a store that already holds 100k transactions, as after a day of traffic. The
/// bytes written to disk per insert are printed: each commit rewrites every B-tree page it
/// touches (copy on write), so this shows how many pages one insert dirties.
fn store_insert_large(c: &mut Criterion) {
    const ROWS: usize = 100_000;
    const BATCH: usize = 32;
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let (store, _) = filled_store(&rt, &dir.path().join("large.redb"), ROWS, BATCH);
    let mut group = c.benchmark_group("store/insert_after_100k");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(BATCH as u64));
    let mut rounds = 0u64;
    let before = disk_bytes_written();
    group.bench_with_input(BenchmarkId::from_parameter(BATCH), &BATCH, |b, &n| {
        b.iter(|| {
            rounds += 1;
            rt.block_on(insert_round(&store, n))
        })
    });
    let written = disk_bytes_written() - before;
    group.finish();
    if rounds > 0 {
        eprintln!(
            "store/insert_after_100k/{BATCH}: {:.1} KiB written to disk per insert ({rounds} batches)",
            written as f64 / 1024.0 / (rounds * BATCH as u64) as f64
        );
    }
    rt.block_on(store.shutdown());
}

/// A store holding `n` transactions, and their referenceNumbers.
fn filled_store(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    n: usize,
    max_batch: usize,
) -> (Store, Vec<String>) {
    let store = open(path, max_batch);
    let mut references = Vec::with_capacity(n);
    rt.block_on(async {
        for chunk in (0..n).collect::<Vec<_>>().chunks(max_batch) {
            let calls: Vec<_> = chunk
                .iter()
                .map(|&i| {
                    let reference = fresh_reference();
                    references.push(reference.clone());
                    store.issue(issue(reference, 1_000 + i as u64))
                })
                .collect();
            for outcome in join_all(calls).await {
                assert!(matches!(outcome, Ok(Issued::Created(_))), "{outcome:?}");
            }
        }
    });
    (store, references)
}

fn store_reads(c: &mut Criterion) {
    const ROWS: usize = 10_000;
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let (store, references) = filled_store(&rt, &dir.path().join("reads.redb"), ROWS, 1000);

    let business = business();
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("by_reference", |b| {
        b.iter(|| {
            i = (i + 7919) % ROWS;
            let reference = ReferenceNumber::parse(references[i].as_str()).expect("valid");
            let found = rt
                .block_on(store.by_reference(&business, &reference))
                .expect("read");
            assert!(found.is_some());
            found
        })
    });
    group.bench_function("transaction_by_ref", |b| {
        b.iter(|| {
            i = (i + 7919) % ROWS;
            let found = rt
                .block_on(store.transaction(&business, &references[i]))
                .expect("read");
            assert!(found.is_some());
            found
        })
    });

    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(ROWS as u64));
    let mut buf = Vec::with_capacity(8 << 20);
    group.bench_function("scan_json_10k", |b| {
        b.iter(|| {
            buf.clear();
            buf.push(b'[');
            let mut rows = 0usize;
            let query = TxQuery {
                business: business.clone(),
                program: None,
                start: 0,
                end: u64::MAX,
                after: None,
                limit: None,
                status: None,
            };
            rt.block_on(async {
                // Encoded where the rows are read, as the API's streamed listing does.
                let mut first = true;
                let encode = move |batch: &[cosmopoints::ledger::Transaction]| {
                    let mut out = Vec::with_capacity(batch.len() * 400);
                    for tx in batch {
                        if !first {
                            out.push(b',');
                        }
                        first = false;
                        cosmopoints::api::write_transaction_json(tx, &mut out).expect("encode");
                    }
                    (batch.len(), out)
                };
                let mut listing = store.list(query, encode).expect("list");
                while let Some(batch) = listing.next().await {
                    let (n, bytes) = batch.expect("scan");
                    rows += n;
                    buf.extend_from_slice(&bytes);
                }
            });
            buf.push(b']');
            assert_eq!(rows, ROWS);
            buf.len()
        })
    });
    group.finish();
    rt.block_on(store.shutdown());
}

criterion_group!(
    benches,
    tokens,
    points,
    store_insert,
    store_insert_large,
    store_reads
);
criterion_main!(benches);
