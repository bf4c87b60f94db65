//! Crash test of partner delivery: the real binary is killed with `kill -9` while hundreds
//! of deliveries are queued or in flight (once while the partner answers, once while it
//! fails). After a restart every acknowledged transaction ends `completed`, and the
//! partner simulator (which dedupes on `webhook-id`) has credited each exactly once, and
//! nothing else.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::partner::{Behaviour, PartnerSim, SECRET};
use common::{config_text, run_check, spawn_issue, Binary};
use serde_json::json;

const PER_ROUND: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_deliveries_in_flight_loses_none_and_credits_each_once() {
    let sim = PartnerSim::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("cosmopoints.toml");
    // Real time here (the binary's own clock): short waits between attempts.
    let text = config_text("db/cosmopoints.redb").replace(
        "max_points = 1000000\n",
        &format!(
            "max_points = 1000000\n[programs.partner]\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\
             timeout_seconds = 2\nretry_schedule_seconds = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n",
            sim.url()
        ),
    );
    std::fs::write(&config, text).expect("config");

    let mut acknowledged = BTreeSet::new();
    for round in 0..2 {
        let mut server = Binary::serve(&config);
        let token = server.token("acme-pos", "acme-secret").await;
        if round == 0 {
            // These never answer: their attempts are surely in flight at the kill.
            for i in 0..20 {
                sim.set_member(&format!("EK-0-{i}"), Behaviour::Hang);
            }
        } else {
            // The partner is failing while these are issued and the server dies.
            sim.set(Behaviour::Unavailable { retry_after: None });
        }
        let issues: Vec<_> = (0..PER_ROUND)
            .map(|i| {
                spawn_issue(
                    server.addr,
                    &token,
                    json!({"programId": "skywards", "value": 3673 + i as u64,
                           "userId": format!("EK-{round}-{i}"),
                           "referenceNumber": format!("crash-{round}-{i}")}),
                )
            })
            .collect();
        for issue in issues {
            let r = issue.await.expect("task");
            assert_eq!(r.status, 201, "{}", r.text());
            acknowledged.insert(r.json()["id"].as_str().expect("id").to_owned());
        }
        // Deliveries are running now (the first ones done, many queued or in flight).
        tokio::time::sleep(Duration::from_millis(30)).await;
        let hung = (0..20)
            .filter(|i| {
                !sim.attempts_of_member(&format!("EK-{round}-{i}"))
                    .is_empty()
            })
            .count();
        server.kill9();
        let (code, out) = run_check(&config);
        assert_eq!(code, 0, "check after kill -9 in round {round}: {out}");
        if round == 0 {
            assert!(hung > 0, "no attempt was in flight at the kill");
            for i in 0..20 {
                sim.set_member(&format!("EK-0-{i}"), Behaviour::Accept);
            }
        } else {
            sim.set(Behaviour::Accept);
        }
    }
    assert_eq!(acknowledged.len(), 2 * PER_ROUND);

    let server = Binary::serve(&config);
    let token = server.token("acme-pos", "acme-secret").await;
    let mut completed = 0;
    for _ in 0..600 {
        let r = common::request(
            server.addr,
            hyper::Method::GET,
            "/v1/transactions?startDate=0000000000&endDate=9999999999&status=completed",
            Some(&token),
            None,
            &[],
        )
        .await;
        completed = r.json().as_array().expect("array").len();
        if completed == acknowledged.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        completed,
        acknowledged.len(),
        "not every transaction completed"
    );
    let credited: BTreeSet<String> = sim.credits().keys().cloned().collect();
    assert_eq!(
        credited, acknowledged,
        "the partner credited exactly the acknowledged transactions"
    );
    assert!(sim.credits().values().all(|c| c.path == "/credits"));
    assert_eq!(sim.bad_signatures(), 0);
    drop(server);
}

/// Reversals in flight at `kill -9`: requests not yet answered, debits queued, and debits
/// hanging at the partner. After a restart every acknowledged reversal exists and
/// completes, the partner has debited each exactly once and after its credit, and it was
/// sent no debit for a reversal the database does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_reversals_in_flight_loses_none_and_debits_each_once() {
    const N: usize = 200;
    let sim = PartnerSim::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("cosmopoints.toml");
    let text = config_text("db/cosmopoints.redb").replace(
        "max_points = 1000000\n",
        &format!(
            "max_points = 1000000\n[programs.partner]\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\
             timeout_seconds = 2\nretry_schedule_seconds = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n",
            sim.url()
        ),
    );
    std::fs::write(&config, text).expect("config");

    let mut server = Binary::serve(&config);
    let token = server.token("acme-pos", "acme-secret").await;
    let mut transactions = Vec::new();
    for i in 0..N {
        let r = spawn_issue(
            server.addr,
            &token,
            json!({"programId": "skywards", "value": 10_000 + i as u64,
                   "userId": format!("EK-{i}"), "referenceNumber": format!("sale-{i}")}),
        )
        .await
        .expect("task");
        assert_eq!(r.status, 201, "{}", r.text());
        transactions.push(r.json()["id"].as_str().expect("id").to_owned());
    }
    // The debits of the first 20 members hang at the partner: in flight at the kill.
    for i in 0..20 {
        sim.set_member(&format!("EK-{i}"), Behaviour::Hang);
    }
    // Only once their credits are in, so that the hang holds debits, not credits.
    for _ in 0..400 {
        if transactions
            .iter()
            .take(20)
            .all(|id| sim.credits().contains_key(id))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reversals: Vec<_> = transactions
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (addr, token, id) = (server.addr, token.clone(), id.clone());
            let answered = answered.clone();
            tokio::spawn(async move {
                let body = json!({"referenceNumber": format!("refund-{i}"), "value": 2500});
                let reply = common::try_request(
                    addr,
                    hyper::Method::POST,
                    &format!("/v1/transactions/{id}/reversals"),
                    Some(&token),
                    Some(body.to_string().into_bytes()),
                )
                .await;
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                reply
            })
        })
        .collect();
    // Let some be answered and some debits start, then kill with the rest in flight.
    for _ in 0..500 {
        if answered.load(std::sync::atomic::Ordering::SeqCst) >= 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    server.kill9();
    let mut acknowledged = BTreeSet::new();
    for task in reversals {
        if let Some(r) = task.await.expect("task") {
            if r.status == 201 {
                acknowledged.insert(r.json()["id"].as_str().expect("id").to_owned());
            } else {
                assert!(r.status >= 500, "{}: {}", r.status, r.text());
            }
        }
    }
    assert!(
        !acknowledged.is_empty(),
        "no reversal was answered before the kill"
    );
    let (code, out) = run_check(&config);
    assert_eq!(code, 0, "check after kill -9: {out}");
    for i in 0..20 {
        sim.set_member(&format!("EK-{i}"), Behaviour::Accept);
    }

    let server = Binary::serve(&config);
    let token = server.token("acme-pos", "acme-secret").await;
    let get = |path: String| {
        let token = token.clone();
        async move {
            common::request(
                server.addr,
                hyper::Method::GET,
                &path,
                Some(&token),
                None,
                &[],
            )
            .await
        }
    };
    // Every acknowledged reversal is there and completes.
    for id in &acknowledged {
        let mut status = String::new();
        for _ in 0..400 {
            let r = get(format!("/v1/reversals/{id}")).await;
            assert_eq!(
                r.status,
                200,
                "an acknowledged reversal is lost: {}",
                r.text()
            );
            status = r.json()["status"].as_str().expect("status").to_owned();
            if status == "completed" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(status, "completed", "{id}");
    }
    // Every debit the partner saw names a reversal that exists, of a credit it had
    // accepted before; each was debited once.
    let requests = sim.requests();
    let debited: BTreeSet<String> = requests
        .iter()
        .filter(|r| r.path == "/debits")
        .map(|r| r.webhook_id.clone())
        .collect();
    assert!(
        acknowledged.is_subset(&debited),
        "an acknowledged reversal was never debited"
    );
    for id in &debited {
        let r = get(format!("/v1/reversals/{id}")).await;
        assert_eq!(
            r.status, 200,
            "a debit was sent for a reversal that does not exist: {id}"
        );
        let reversal = r.json();
        let tx = reversal["transactionId"].as_str().expect("transaction");
        let credited = requests
            .iter()
            .position(|r| r.webhook_id == tx)
            .expect("its credit");
        let debit = requests
            .iter()
            .position(|r| &r.webhook_id == id)
            .expect("the debit");
        assert!(credited < debit, "debit {id} before its credit");
        let debit = &sim.credits()[id];
        assert_eq!(debit.path, "/debits");
        assert_eq!(debit.body["points"], reversal["points"]);
    }
    // And the other way round: every reversal in the database (acknowledged or made just
    // before the kill, unanswered) is debited in the end.
    let mut stored = BTreeSet::new();
    let mut debited = BTreeSet::new();
    for _ in 0..400 {
        let listed = get("/v1/transactions?startDate=0000000000&endDate=9999999999".into()).await;
        stored = listed
            .json()
            .as_array()
            .expect("array")
            .iter()
            .flat_map(|tx| tx["pointTransactions"].as_array().expect("entries").clone())
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect();
        debited = sim
            .credits()
            .into_iter()
            .filter(|(_, c)| c.path == "/debits")
            .map(|(id, _)| id)
            .collect();
        if stored == debited {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        stored, debited,
        "stored reversals and the partner's debits differ"
    );
    assert!(acknowledged.is_subset(&stored));
    eprintln!(
        "{} reversals acknowledged before the kill, {} stored in all",
        acknowledged.len(),
        stored.len()
    );
    assert_eq!(sim.bad_signatures(), 0);
    drop(server);
}
