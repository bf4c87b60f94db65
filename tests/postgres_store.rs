//! The PostgreSQL backend through the store's own interface, and what only it does: the
//! schema version, `check` on a damaged database, claims on the shared outbox, the url
//! kept out of every message, backups refused. A throwaway cluster per test process
//! (`common::pg`: initdb into a temp dir, a free port, as the `postgres` system user when
//! run as root); without PostgreSQL's binaries these print "skipped" (under CI: fail).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;

use common::{config_text, pg, Binary};
use cosmopoints::clock::Clock;
use cosmopoints::config::PostgresConfig;
use cosmopoints::delivery::{Attempt, DeliveryStatus};
use cosmopoints::domain::{BusinessId, ProgramId, ReferenceNumber, UserId};
use cosmopoints::ledger::{NewReversal, NewTransaction, Recipient};
use cosmopoints::store::{
    check_postgres, Due, Issue, Issued, Limits, OpenError, Reverse, Reversed, Store,
};

fn config(url: &str) -> PostgresConfig {
    PostgresConfig {
        url: url.to_owned(),
        pool_size: 2,
    }
}

fn issue(reference: &str, value: u64, deliver: bool) -> Issue {
    Issue {
        business: BusinessId::parse("acme").expect("valid"),
        program_name: "Skywards".into(),
        currency: "AED".into(),
        total_points: value / 10,
        request: NewTransaction {
            program_id: ProgramId::parse("skywards").expect("valid"),
            value,
            recipient: Recipient::Member(UserId::parse("u").expect("valid")),
            reference_number: ReferenceNumber::parse(reference).expect("valid"),
            description: None,
            bonus: false,
        },
        user_id: UserId::parse("u").expect("valid"),
        deliver,
    }
}

/// The database name in a url of the cluster.
fn database(url: &str) -> &str {
    url.rsplit('/').next().expect("a database name")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_a_newer_schema_is_refused_by_serve_and_check() {
    if !pg::available_or_skip("a_database_of_a_newer_schema_is_refused…") {
        return;
    }
    let cluster = pg::cluster();
    let url = cluster.create_database();
    let store = Store::open_postgres(&config(&url), Clock::system(), Limits::new(8, 8))
        .expect("a new database opens");
    store.issue(issue("a", 100, false)).await.expect("issued");
    store.shutdown().await;
    store.close().await;
    drop(store);
    let report = check_postgres(&config(&url)).expect("checks");
    assert_eq!(
        (report.schema, report.transactions),
        (cosmopoints::store::PG_SCHEMA_VERSION, 1)
    );
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    cluster.psql_in(
        database(&url),
        "UPDATE meta SET number = 99 WHERE name = 'schema_version'",
    );
    match Store::open_postgres(&config(&url), Clock::system(), Limits::new(8, 8)) {
        Err(OpenError::NewerSchema(99)) => {}
        Err(other) => panic!("unexpected {other}"),
        Ok(_) => panic!("a newer schema was opened"),
    }
    assert!(matches!(
        check_postgres(&config(&url)),
        Err(OpenError::NewerSchema(99))
    ));
    let dir = tempfile::tempdir().expect("dir");
    let path = write_config(dir.path(), &url, "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("schema version 99, newer"), "{err}");
}

/// A config file for the database at `url`, with `extra` appended.
fn write_config(dir: &std::path::Path, url: &str, extra: &str) -> std::path::PathBuf {
    let text = config_text("unused.redb").replace(
        "[storage]\npath = \"unused.redb\"\n",
        &pg::storage_section(url),
    ) + extra;
    let path = dir.join("cosmopoints.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_reversals_that_do_not_add_up_and_deliveries_without_their_rows() {
    if !pg::available_or_skip("check_finds_reversals_that_do_not_add_up…") {
        return;
    }
    let cluster = pg::cluster();
    let url = cluster.create_database();
    let store =
        Store::open_postgres(&config(&url), Clock::manual(100), Limits::new(8, 8)).expect("opens");
    let Issued::Created(tx) = store.issue(issue("a", 10_000, true)).await.expect("a") else {
        panic!("not created")
    };
    for (reference, value) in [("r-1", Some(2_500)), ("r-2", None)] {
        let reversed = store
            .reverse(Reverse {
                business: BusinessId::parse("acme").expect("valid"),
                transaction_seq: tx.seq,
                request: NewReversal {
                    reference_number: ReferenceNumber::parse(reference).expect("valid"),
                    value,
                    reason: None,
                },
            })
            .await
            .expect("stored");
        assert!(matches!(reversed, Reversed::Created(_)), "{reversed:?}");
    }
    // Nothing is left: a third is refused, and the same request again is its replay.
    let again = store
        .reverse(Reverse {
            business: BusinessId::parse("acme").expect("valid"),
            transaction_seq: tx.seq,
            request: NewReversal {
                reference_number: ReferenceNumber::parse("r-2").expect("valid"),
                value: None,
                reason: None,
            },
        })
        .await
        .expect("read");
    assert!(matches!(again, Reversed::Replayed(_)), "{again:?}");
    let report = store.check().expect("check");
    assert_eq!((report.reversals, report.deliveries), (2, 3));
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    store.shutdown().await;
    store.close().await;

    let db = database(&url);
    cluster.psql_in(
        db,
        "UPDATE transactions SET reversed_value = reversed_value + 1",
    );
    cluster.psql_in(
        db,
        "INSERT INTO deliveries (kind, id, status, attempts, step, next_attempt_at) \
         VALUES (1, 99, 0, 0, 0, 5)",
    );
    cluster.psql_in(
        db,
        "UPDATE deliveries SET next_attempt_at = NULL WHERE kind = 0",
    );
    let report = check_postgres(&config(&url)).expect("readable");
    let problems = report.problems.join("\n");
    assert!(
        problems.contains("reversals add up to value 10000"),
        "{problems}"
    );
    assert!(
        problems.contains("debit 99 names a missing reversal"),
        "{problems}"
    );
    assert!(
        problems.contains("is pending with no due time"),
        "{problems}"
    );
    let dir = tempfile::tempdir().expect("dir");
    let (code, out) = common::run_check(&write_config(dir.path(), &url, ""));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1 transactions"), "{out}");
    assert!(!out.contains(&url), "the url is never shown: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_jobs_are_claimed_by_one_process_until_their_outcome_is_recorded() {
    if !pg::available_or_skip("due_jobs_are_claimed_by_one_process…") {
        return;
    }
    let url = pg::cluster().create_database();
    let clock = Clock::manual(1_000);
    let a = Store::open_postgres(&config(&url), clock.clone(), Limits::new(8, 8)).expect("a");
    let b = Store::open_postgres(&config(&url), clock.clone(), Limits::new(8, 8)).expect("b");
    let mut seqs = Vec::new();
    for i in 0..3 {
        let Issued::Created(tx) = a
            .issue(issue(&format!("d{i}"), 100, true))
            .await
            .expect("i")
        else {
            panic!("not created")
        };
        seqs.push(tx.seq);
    }
    a.issue(issue("no-partner", 100, false)).await.expect("i");
    assert_eq!(a.outbox_depth().await.expect("depth"), (3, Some(1_000)));
    let none = HashSet::new();
    let claimed = a.due(1_000, 10, &none).await.expect("due");
    assert_eq!(claimed.len(), 3);
    // The other process sees none of them while the claim lasts…
    assert!(b.due(1_000, 10, &none).await.expect("due").is_empty());
    // …while the claimant reads them again, less those it has in flight.
    let in_flight: HashSet<(u8, u64)> = [(0, seqs[0])].into();
    assert_eq!(a.due(1_000, 10, &in_flight).await.expect("due").len(), 2);

    // An outcome recorded ends the claim: due again 5 s later, for anyone.
    let retry = Attempt::Retry {
        http_status: Some(503),
        detail: "busy".into(),
        retry_after: None,
    };
    let (after, changed) = a
        .update_delivery(
            seqs[0],
            move |d, now| Some(d.after(retry.clone(), now, &[5])),
            |_, _| Vec::new(),
        )
        .await
        .expect("written")
        .expect("has a delivery");
    assert!(changed);
    assert_eq!(after.status(), DeliveryStatus::Pending);
    clock.set(1_005);
    let taken = b.due(1_005, 10, &none).await.expect("due");
    assert!(
        matches!(taken.as_slice(), [Due::Credit(tx)] if tx.seq == seqs[0]),
        "{taken:?}"
    );
    // A claim that outlives its lease (a process that died mid-attempt) lapses.
    let later = 1_000 + cosmopoints::store::LEASE_SECONDS;
    assert_eq!(b.due(later, 10, &none).await.expect("due").len(), 3);
    // A process that stops gives its claims back at once.
    let c = Store::open_postgres(&config(&url), clock.clone(), Limits::new(8, 8)).expect("c");
    assert!(c.due(later, 10, &none).await.expect("due").is_empty());
    b.shutdown().await;
    assert_eq!(c.due(later, 10, &none).await.expect("due").len(), 3);
    for store in [a, b, c] {
        store.shutdown().await;
        store.close().await;
    }
}

#[test]
fn the_url_is_never_shown_and_file_backups_are_refused() {
    if !pg::available_or_skip("the_url_is_never_shown…") {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    // Nothing listens on port 1: the server cannot start, and says so without the url.
    let secret_url = "postgres://app:hunter2-secret@127.0.0.1:1/points";
    let path = write_config(dir.path(), secret_url, "");
    for args in [vec!["serve", "--config"], vec!["check", "--config"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
            .args(&args)
            .arg(&path)
            .output()
            .expect("runs");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        assert!(!said.contains("hunter2"), "{args:?}: {said}");
        assert!(said.contains("PostgreSQL"), "{args:?}: {said}");
    }

    // A real database: the admin listener's backup is for redb files only.
    let url = pg::cluster().create_database();
    let path = write_config(dir.path(), &url, "\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    let server = Binary::serve(&path);
    let admin = admin_address(&server);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let reply = rt.block_on(common::request(
        admin,
        hyper::Method::GET,
        "/backup",
        None,
        None,
        &[],
    ));
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert!(reply.text().contains("pg_dump"), "{}", reply.text());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
        .args(["restore", "--from", "whatever.redb", "--config"])
        .arg(&path)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pg_dump"));
    let logged = server.stderr.lock().expect("lines").join("\n");
    assert!(!logged.contains(&url), "the url is never logged: {logged}");
}

/// The admin address the binary logged.
fn admin_address(server: &Binary) -> SocketAddr {
    for _ in 0..200 {
        {
            let lines = server.stderr.lock().expect("lines");
            if let Some(line) = lines.iter().find(|l| l.contains("admin listening at ")) {
                let at =
                    line.find("admin listening at ").expect("found") + "admin listening at ".len();
                let rest = &line[at..];
                let end = rest.find(' ').unwrap_or(rest.len());
                return rest[..end].parse().expect("an address");
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("no admin line: {:?}", server.stderr.lock().expect("lines"));
}

/// A write PostgreSQL refuses for its own data (here a delivery detail with a NUL byte,
/// which no `text` holds) fails alone: the batch it shared runs again without it, and
/// every other write in it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_postgres_refuses_fails_alone_and_the_rest_of_its_batch_commits() {
    if !pg::available_or_skip("a_write_postgres_refuses_fails_alone…") {
        return;
    }
    let url = pg::cluster().create_database();
    let store = std::sync::Arc::new(
        Store::open_postgres(&config(&url), Clock::manual(1_000), Limits::new(1024, 256))
            .expect("opens"),
    );
    let Issued::Created(target) = store.issue(issue("target", 100, true)).await.expect("i") else {
        panic!("not created")
    };
    let (before_commits, before_writes) = store.commit_stats();
    let mut issues = Vec::new();
    let mut bad = None;
    for i in 0..200 {
        if i == 100 {
            let store = store.clone();
            bad = Some(tokio::spawn(async move {
                let retry = Attempt::Retry {
                    http_status: Some(400),
                    detail: "binary\0body".into(),
                    retry_after: None,
                };
                store
                    .update_delivery(
                        target.seq,
                        move |d, now| Some(d.after(retry.clone(), now, &[5])),
                        |_, _| Vec::new(),
                    )
                    .await
            }));
        }
        let store = store.clone();
        issues.push(tokio::spawn(async move {
            store.issue(issue(&format!("ok-{i}"), 100, false)).await
        }));
    }
    let bad = bad.expect("spawned").await.expect("task");
    assert!(bad.is_err(), "a NUL byte was stored: {bad:?}");
    for (i, issued) in issues.into_iter().enumerate() {
        let issued = issued.await.expect("task");
        assert!(
            matches!(issued, Ok(Issued::Created(_))),
            "ok-{i}: {issued:?}"
        );
    }
    let (commits, writes) = store.commit_stats();
    assert_eq!(
        writes - before_writes,
        200,
        "the refused write is not counted"
    );
    assert!(
        commits - before_commits < 200,
        "no batch was shared, nothing was shown: {} commits",
        commits - before_commits
    );
    // The delivery is as it was.
    let business = BusinessId::parse("acme").expect("valid");
    let tx = store
        .transaction(&business, "target")
        .await
        .expect("read")
        .expect("found");
    assert_eq!(tx.delivery.expect("delivery").attempts, 0);
    let report = check_postgres(&config(&url)).expect("checks");
    assert_eq!(report.transactions, 201);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Listings hold a connection each while their reader is slow; they get slots of their
/// own (half of `pool_size`), so lookups never wait for them, and one more listing is
/// Busy (503 with Retry-After) instead of waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_listings_never_take_the_connections_lookups_need() {
    if !pg::available_or_skip("slow_listings_never_take_the_connections…") {
        return;
    }
    let url = pg::cluster().create_database();
    let config = PostgresConfig {
        url: url.clone(),
        pool_size: 4,
    };
    let store =
        Store::open_postgres(&config, Clock::manual(1_000), Limits::new(64, 64)).expect("opens");
    let business = BusinessId::parse("acme").expect("valid");
    let many: Vec<Issue> = (0..1_000)
        .map(|i| issue(&format!("l-{i}"), 100, false))
        .collect();
    store.issue_many(many).await.expect("issued");
    let query = || cosmopoints::store::TxQuery {
        business: business.clone(),
        program: None,
        start: 0,
        end: u64::MAX,
        after: None,
        limit: None,
        status: None,
    };
    // Two listings (pool_size 4 / 2) whose readers never read: each scan stops with its
    // connection held, as behind a slow client.
    let held: Vec<_> = (0..2)
        .map(|_| store.list(query(), |rows| rows.len()).expect("a slot"))
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(store.running_listings(), 2);
    assert!(matches!(
        store.list(query(), |rows| rows.len()),
        Err(cosmopoints::store::StoreError::Busy)
    ));
    // Lookups find connections at once (the pool's wait is 5 s, then 503).
    let started = std::time::Instant::now();
    for i in 0..16 {
        let found = store
            .transaction(&business, &format!("l-{i}"))
            .await
            .expect("read")
            .expect("found");
        assert_eq!(found.reference_number.as_str(), format!("l-{i}"));
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "lookups waited for the listings' connections"
    );
    drop(held);
    store.shutdown().await;
    store.close().await;
}

/// An attempt's outcome that comes after its lease ran out, while another process has
/// claimed the job and is sending it, is not recorded: it neither ends that claim nor
/// makes the job due again beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_outcome_does_not_end_another_process_claim() {
    if !pg::available_or_skip("a_late_outcome_does_not_end_another_process_claim") {
        return;
    }
    let url = pg::cluster().create_database();
    let clock = Clock::manual(1_000);
    let a = Store::open_postgres(&config(&url), clock.clone(), Limits::new(8, 8)).expect("a");
    let b = Store::open_postgres(&config(&url), clock.clone(), Limits::new(8, 8)).expect("b");
    let Issued::Created(tx) = a.issue(issue("late", 100, true)).await.expect("i") else {
        panic!("not created")
    };
    let none = HashSet::new();
    assert_eq!(a.due(1_000, 10, &none).await.expect("due").len(), 1);
    // a stalls past its lease; b takes the job.
    let later = 1_000 + cosmopoints::store::LEASE_SECONDS + 1;
    clock.set(later);
    assert_eq!(b.due(later, 10, &none).await.expect("due").len(), 1);
    // a's late outcome: a transient failure that would make the job due at once.
    let retry = Attempt::Retry {
        http_status: Some(503),
        detail: "busy".into(),
        retry_after: None,
    };
    a.record_outcomes(vec![cosmopoints::store::JobOutcome {
        job: (0, tx.seq),
        step: Box::new(move |d, now| Some(d.after(retry.clone(), now, &[0]))),
        events: None,
    }])
    .await
    .expect("written");
    // Not recorded: the delivery is untouched and still b's alone.
    let business = BusinessId::parse("acme").expect("valid");
    let read = a
        .transaction(&business, "late")
        .await
        .expect("read")
        .expect("found");
    assert_eq!(read.delivery.expect("delivery").attempts, 0);
    assert!(a.due(later, 10, &none).await.expect("due").is_empty());
    // b's own outcome is recorded.
    b.record_outcomes(vec![cosmopoints::store::JobOutcome {
        job: (0, tx.seq),
        step: Box::new(|d, now| {
            Some(d.after(
                Attempt::Delivered {
                    partner_transaction_id: Some("p-1".into()),
                },
                now,
                &[5],
            ))
        }),
        events: None,
    }])
    .await
    .expect("written");
    let read = a
        .transaction(&business, "late")
        .await
        .expect("read")
        .expect("found");
    assert_eq!(
        read.delivery.expect("delivery").status,
        DeliveryStatus::Completed
    );
    for store in [a, b] {
        store.shutdown().await;
        store.close().await;
    }
}
