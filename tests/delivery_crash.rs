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
