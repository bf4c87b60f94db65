//! Crash soak: rounds of kill -9 at random moments during concurrent issuance (16
//! clients) against the real binary. After each kill, `cosmopoints check` must pass; after each restart, every
//! acknowledged transaction must be there exactly once, and a request whose answer was
//! lost in the crash, sent again, must come back as that same single transaction.
//!
//! `COSMOPOINTS_SOAK_ROUNDS` sets the round count (default 20); `COSMOPOINTS_SOAK_SEED`
//! replays a run's kill moments.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{issue_body, try_request, write_config, Binary};
use hyper::Method;

/// xorshift64*: enough randomness for kill moments, and replayable from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[derive(Default)]
struct Ledger {
    /// reference → id, for every 200/201 seen.
    acknowledged: HashMap<String, String>,
    /// References sent whose answer never came (in flight at the kill).
    unknown: HashSet<String>,
}

#[test]
fn kill_9_soak_loses_and_duplicates_nothing() {
    let rounds: u32 = std::env::var("COSMOPOINTS_SOAK_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("COSMOPOINTS_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    println!("soak: {rounds} rounds, COSMOPOINTS_SOAK_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path());
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    for round in 0..rounds {
        let mut server = Binary::serve(&config);
        if round == 0 && !common::pg::enabled() {
            // While a server holds the file, check says so in one line and exits 2 (a
            // PostgreSQL database is checked from a snapshot while servers run).
            let (code, report) = common::run_check(&config);
            assert_eq!(code, 2, "{report}");
            assert!(report.contains("in use by another process"), "{report}");
        }
        rt.block_on(async {
            let token = server.token("acme-pos", "acme-secret").await;
            verify(&server, &token, &ledger, round).await;
            let mut clients = Vec::new();
            for c in 0..16 {
                let (addr, token, ledger) = (server.addr, token.clone(), ledger.clone());
                clients.push(tokio::spawn(async move {
                    for i in 0.. {
                        let reference = format!("soak-{round}-{c}-{i}");
                        let body = issue_body(&reference).to_string().into_bytes();
                        ledger
                            .lock()
                            .expect("ledger")
                            .unknown
                            .insert(reference.clone());
                        let Some(r) = try_request(
                            addr,
                            Method::POST,
                            "/v1/transactions",
                            Some(&token),
                            Some(body),
                        )
                        .await
                        else {
                            break;
                        };
                        let mut l = ledger.lock().expect("ledger");
                        l.unknown.remove(&reference);
                        assert!(
                            r.status == 201 || r.status == 503,
                            "round {round}: {} {}",
                            r.status,
                            r.text()
                        );
                        if r.status == 201 {
                            l.acknowledged
                                .insert(reference, r.json()["id"].as_str().expect("id").to_owned());
                        }
                    }
                }));
            }
            tokio::time::sleep(Duration::from_millis(50 + rng.next() % 400)).await;
            server.kill9();
            for client in clients {
                client.await.expect("client");
            }
        });
        let (code, report) = common::run_check(&config);
        assert_eq!(
            code, 0,
            "round {round}: check failed (seed {seed}): {report}"
        );
    }
    let server = Binary::serve(&config);
    rt.block_on(async {
        let token = server.token("acme-pos", "acme-secret").await;
        verify(&server, &token, &ledger, rounds).await;
    });
    let l = ledger.lock().expect("ledger");
    println!(
        "soak: {rounds} rounds passed, {} transactions acknowledged",
        l.acknowledged.len()
    );
    assert!(l.acknowledged.len() as u32 > rounds, "the load ran");
}

/// Every acknowledged transaction is listed exactly once with its id; every request whose
/// answer was lost is resent and resolves to exactly one transaction.
async fn verify(server: &Binary, token: &str, ledger: &Mutex<Ledger>, round: u32) {
    let unknown: Vec<String> = ledger.lock().expect("ledger").unknown.drain().collect();
    for reference in unknown {
        let body = issue_body(&reference).to_string().into_bytes();
        let r = try_request(
            server.addr,
            Method::POST,
            "/v1/transactions",
            Some(token),
            Some(body),
        )
        .await
        .expect("answer");
        assert!(
            r.status == 200 || r.status == 201,
            "round {round}: resend of {reference}: {}",
            r.status
        );
        ledger
            .lock()
            .expect("ledger")
            .acknowledged
            .insert(reference, r.json()["id"].as_str().expect("id").to_owned());
    }
    let r = try_request(
        server.addr,
        Method::GET,
        "/v1/transactions?startDate=0000000000&endDate=9999999999",
        Some(token),
        None,
    )
    .await
    .expect("listing");
    assert_eq!(r.status, 200);
    let mut listed = HashMap::new();
    for t in r.json().as_array().expect("array") {
        let reference = t["referenceNumber"].as_str().expect("ref").to_owned();
        let id = t["id"].as_str().expect("id").to_owned();
        assert!(
            listed.insert(reference.clone(), id).is_none(),
            "round {round}: {reference} listed twice"
        );
    }
    let l = ledger.lock().expect("ledger");
    for (reference, id) in &l.acknowledged {
        assert_eq!(
            listed.get(reference),
            Some(id),
            "round {round}: acknowledged {reference} lost"
        );
    }
    assert_eq!(
        listed.len(),
        l.acknowledged.len(),
        "round {round}: transactions nobody asked for"
    );
}
