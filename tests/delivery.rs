//! Partner delivery over real HTTP both ways: the real server (in process, on port 0, with
//! a hand-set clock) delivers to the partner simulator of `common::partner`, which checks
//! every signature and credits each `webhook-id` once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::partner::{refused_port, Behaviour, PartnerSim, SECRET};
use common::{eventually, server_with_partner as server, TestServer, T0};
use serde_json::{json, Value};

fn issue_to(member: &str, reference: &str) -> Value {
    json!({"programId": "skywards", "value": 3673, "userId": member, "referenceNumber": reference})
}

async fn get_tx(s: &TestServer, token: &str, id: &str) -> Value {
    let r = s.get(&format!("/v1/transactions/{id}"), Some(token)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Issues and returns the new transaction's id; the 201 says `pending`.
async fn issue_pending(s: &TestServer, token: &str, member: &str, reference: &str) -> String {
    let r = s.issue(token, issue_to(member, reference)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["status"], "pending");
    r.json()["id"].as_str().expect("id").to_owned()
}

/// Polls the transaction until `done` holds of it (at most 10 s of real time).
async fn wait_tx(
    s: &TestServer,
    token: &str,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..500 {
        let tx = get_tx(s, token, id).await;
        if done(&tx) {
            return tx;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {id} {what}");
}

async fn wait_attempts(s: &TestServer, token: &str, id: &str, attempts: u64) -> Value {
    wait_tx(
        s,
        token,
        id,
        &format!("to have {attempts} attempts"),
        |tx| tx["delivery"]["attempts"] == attempts,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_on_schedule_then_completed_once() {
    let sim = PartnerSim::start().await;
    let unavailable = Behaviour::Unavailable { retry_after: None };
    sim.script_member(
        "EK-1",
        vec![unavailable.clone(), unavailable, Behaviour::Accept],
    );
    let s = server(
        &format!(
            "{}retry_schedule_seconds = [5, 300, 900]",
            sim.partner_toml()
        ),
        "",
    )
    .await;
    let token = s.acme().await;
    let id = issue_pending(&s, &token, "EK-1", "inv-1").await;

    let tx = wait_attempts(&s, &token, &id, 1).await;
    assert_eq!(tx["status"], "pending");
    assert_eq!(tx["delivery"]["nextAttemptAt"], "2026-11-27T10:15:05Z");
    assert_eq!(tx["delivery"]["error"]["type"], "partner-unreachable");
    assert_eq!(tx["delivery"]["error"]["httpStatus"], 503);
    // Not before its time: the clock has not moved, so no second attempt comes.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(sim.attempts(&id).len(), 1);

    s.clock.set(T0 + 5);
    let tx = wait_attempts(&s, &token, &id, 2).await;
    assert_eq!(tx["delivery"]["nextAttemptAt"], "2026-11-27T10:20:05Z");
    s.clock.set(T0 + 305);
    let tx = wait_attempts(&s, &token, &id, 3).await;
    assert_eq!(tx["status"], "completed");
    assert_eq!(tx["delivery"]["error"], Value::Null);
    assert_eq!(tx["delivery"]["nextAttemptAt"], Value::Null);
    let ptid = tx["delivery"]["partnerTransactionId"]
        .as_str()
        .expect("ptid");

    // The partner saw three signed attempts with one webhook-id, and credited once.
    let attempts = sim.attempts(&id);
    assert_eq!(attempts.len(), 3);
    assert!(attempts.iter().all(|a| a.path == "/credits"));
    assert_eq!(sim.bad_signatures(), 0);
    let credits = sim.credits();
    assert_eq!(credits.len(), 1);
    let credit = &credits[&id];
    assert_eq!(credit.partner_transaction_id, ptid);
    assert_eq!(
        credit.body,
        json!({"type": "points.credit", "transactionId": id, "businessId": "acme",
               "programId": "skywards", "memberId": "EK-1", "points": 833, "bonus": false,
               "referenceNumber": "inv-1", "createdAt": "2026-11-27T10:15:00Z"})
    );
    // A replay of the issue shows where it stands now.
    let replay = s.issue(&token, issue_to("EK-1", "inv-1")).await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.json()["status"], "completed");
    let report = s.app.store.check().expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.outbox_entries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_fails_at_once_with_the_reason_and_redeliver_sends_it_again() {
    let sim = PartnerSim::start().await;
    sim.set_member(
        "EK-404",
        Behaviour::Reject {
            status: 400,
            reason: "no such member".into(),
        },
    );
    let s = server(&sim.partner_toml(), "").await;
    let token = s.acme().await;
    let id = issue_pending(&s, &token, "EK-404", "inv-1").await;
    let ok = issue_pending(&s, &token, "EK-1", "inv-2").await;
    let tx = wait_attempts(&s, &token, &id, 1).await;
    assert_eq!(tx["status"], "failed");
    let error = &tx["delivery"]["error"];
    assert_eq!(error["type"], "partner-rejected");
    assert_eq!(error["httpStatus"], 400);
    assert!(
        error["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no such member")),
        "{error}"
    );
    assert!(!tx.to_string().contains(&SECRET["whsec_".len()..]));
    wait_attempts(&s, &token, &ok, 1).await;

    // The status filter.
    let failed = s
        .get(
            "/v1/transactions?startDate=0000000000&endDate=9999999999&status=failed",
            Some(&token),
        )
        .await
        .json();
    let ids: Vec<&str> = failed
        .as_array()
        .expect("array")
        .iter()
        .map(|t| t["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let bad = s
        .get(
            "/v1/transactions?startDate=0000000000&endDate=9999999999&status=lost",
            Some(&token),
        )
        .await;
    assert!(bad.problem(400).contains("status"));

    // Redeliver: only a failed one, then it goes again with a fresh schedule.
    let r = s
        .post(
            &format!("/v1/transactions/{ok}/redeliver"),
            Some(&token),
            &json!({}),
        )
        .await;
    assert!(r.problem(409).contains("completed"));
    sim.set_member("EK-404", Behaviour::Accept);
    let r = s
        .post(
            &format!("/v1/transactions/{id}/redeliver"),
            Some(&token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["status"], "pending");
    let tx = wait_attempts(&s, &token, &id, 2).await;
    assert_eq!(tx["status"], "completed");
    assert_eq!(sim.credits().len(), 2);
    // Another business cannot redeliver it, or see it.
    let globex = s.globex().await;
    let r = s
        .post(
            &format!("/v1/transactions/{id}/redeliver"),
            Some(&globex),
            &json!({}),
        )
        .await;
    r.problem(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_partner_fails_after_the_last_step_and_retry_after_is_honoured() {
    let port = refused_port();
    let s = server(
        &format!(
            "url = \"http://127.0.0.1:{port}\"\nsecret = \"{SECRET}\"\nretry_schedule_seconds = [2]"
        ),
        "",
    )
    .await;
    let token = s.acme().await;
    let id = issue_pending(&s, &token, "EK-1", "inv-1").await;
    let tx = wait_attempts(&s, &token, &id, 1).await;
    assert_eq!(tx["status"], "pending");
    assert_eq!(tx["delivery"]["error"]["httpStatus"], Value::Null);
    s.clock.set(T0 + 2);
    let tx = wait_attempts(&s, &token, &id, 2).await;
    assert_eq!(tx["status"], "failed");
    assert_eq!(tx["delivery"]["error"]["type"], "partner-unreachable");

    // Retry-After within the schedule's longest step is honoured.
    let sim = PartnerSim::start().await;
    sim.script_member(
        "EK-2",
        vec![
            Behaviour::Unavailable {
                retry_after: Some("60".into()),
            },
            Behaviour::Accept,
        ],
    );
    let s = server(
        &format!("{}retry_schedule_seconds = [5, 300]", sim.partner_toml()),
        "",
    )
    .await;
    let token = s.acme().await;
    let id = issue_pending(&s, &token, "EK-2", "inv-1").await;
    let tx = wait_attempts(&s, &token, &id, 1).await;
    assert_eq!(tx["delivery"]["nextAttemptAt"], "2026-11-27T10:16:00Z");
    s.clock.set(T0 + 59);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sim.attempts(&id).len(), 1, "sent before Retry-After");
    s.clock.set(T0 + 60);
    let tx = wait_attempts(&s, &token, &id, 2).await;
    assert_eq!(tx["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merchant_webhooks_hear_of_completed_and_failed_transactions() {
    let partner = PartnerSim::start().await;
    partner.set_member(
        "invalid-1",
        Behaviour::Reject {
            status: 422,
            reason: "closed account".into(),
        },
    );
    let merchant = PartnerSim::start().await;
    let s = server(
        &partner.partner_toml(),
        &format!(
            "[[businesses.webhooks]]\nurl = \"{}/hooks\"\nsecret = \"{SECRET}\"",
            merchant.url()
        ),
    )
    .await;
    let token = s.acme().await;
    let done = issue_pending(&s, &token, "EK-1", "inv-1").await;
    let refused = issue_pending(&s, &token, "invalid-1", "inv-2").await;
    eventually("two webhook events", || async {
        merchant.requests().len() >= 2
    })
    .await;
    let events = merchant.requests();
    assert_eq!(events.len(), 2, "{events:?}");
    for event in &events {
        assert_eq!(event.path, "/hooks");
        assert!(event.webhook_id.starts_with("evt_"), "{}", event.webhook_id);
        let id = event.body["data"]["id"].as_str().expect("data.id");
        let kind = event.body["type"].as_str().expect("type");
        match kind {
            "transaction.completed" => {
                assert_eq!(id, done);
                assert_eq!(event.body["data"]["status"], "completed");
            }
            "transaction.failed" => {
                assert_eq!(id, refused);
                assert_eq!(
                    event.body["data"]["delivery"]["error"]["type"],
                    "partner-rejected"
                );
            }
            other => panic!("unexpected event {other}"),
        }
        assert_eq!(event.body["timestamp"], "2026-11-27T10:15:00Z");
    }
    assert_ne!(events[0].webhook_id, events[1].webhook_id);
    assert_eq!(merchant.bad_signatures(), 0);
    let report = s.app.store.check().expect("check");
    assert_eq!(report.events, 2);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_member_asks_the_partner() {
    let sim = PartnerSim::start().await;
    let s = server(&sim.partner_toml(), "").await;
    let token = s.acme().await;
    let ask = |program: &str, member: &str| {
        let (program, member) = (program.to_owned(), member.to_owned());
        let (s, token) = (&s, &token);
        async move {
            s.post(
                &format!("/v1/programs/{program}/validate-member"),
                Some(token),
                &json!({"destinationUserId": member}),
            )
            .await
        }
    };
    let r = ask("skywards", "EK-1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"isValid": true}));
    assert_eq!(
        ask("skywards", "invalid-7").await.json(),
        json!({"isValid": false})
    );
    // A program without a partner has nothing to check against.
    assert_eq!(
        ask("bounded", "anyone").await.json(),
        json!({"isValid": true})
    );
    // Not enabled for the business; bad body.
    ask("tiny", "EK-1").await.problem(422);
    let r = s
        .post(
            "/v1/programs/skywards/validate-member",
            Some(&token),
            &json!({"memberId": "EK-1"}),
        )
        .await;
    r.problem(400);
    // A partner that cannot be asked: 503 with Retry-After.
    drop(sim);
    let r = ask("skywards", "EK-1").await;
    r.problem(503);
    assert_eq!(
        r.json()["type"],
        "urn:cosmopoints:problem:partner-unavailable"
    );
    assert!(r.header("retry-after").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_partner_shows_the_whole_lifecycle() {
    let s = server("sandbox = true", "").await;
    let token = s.acme().await;
    let ok = issue_pending(&s, &token, "EK-1", "inv-1").await;
    let flaky = issue_pending(&s, &token, "flaky-2", "inv-2").await;
    let invalid = issue_pending(&s, &token, "invalid-3", "inv-3").await;
    assert_eq!(
        wait_attempts(&s, &token, &ok, 1).await["status"],
        "completed"
    );
    assert_eq!(
        wait_attempts(&s, &token, &invalid, 1).await["status"],
        "failed"
    );
    wait_attempts(&s, &token, &flaky, 1).await;
    s.clock.set(T0 + 1);
    wait_attempts(&s, &token, &flaky, 2).await;
    s.clock.set(T0 + 3);
    let tx = wait_attempts(&s, &token, &flaky, 3).await;
    assert_eq!(tx["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_loses_its_partner_fails_its_queued_deliveries() {
    let dir = Arc::new(tempfile::tempdir().expect("dir"));
    let port = refused_port();
    let with_partner = move |text: String| {
        text.replace(
            "max_points = 1000000\n",
            &format!(
                "max_points = 1000000\n[programs.partner]\nurl = \"http://127.0.0.1:{port}\"\nsecret = \"{SECRET}\"\nretry_schedule_seconds = [3600]\n"
            ),
        )
    };
    let s = TestServer::start_in(dir.clone(), with_partner).await;
    let token = s.acme().await;
    let id = issue_pending(&s, &token, "EK-1", "inv-1").await;
    wait_attempts(&s, &token, &id, 1).await;
    let dir = s.stop().await;
    // Restarted without the partner: the queued job is failed, not dropped.
    let s = TestServer::start_in(dir, |text| text).await;
    s.clock.set(T0 + 3600);
    let token = s.acme().await;
    let tx = wait_tx(&s, &token, &id, "to fail", |tx| tx["status"] == "failed").await;
    assert_eq!(tx["delivery"]["error"]["type"], "partner-removed");
    // New transactions of the program are completed at once: nothing to deliver.
    let r = s.issue(&token, issue_to("EK-1", "inv-2")).await;
    assert_eq!(r.json()["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_removed_from_the_config_fails_its_queued_events() {
    let partner = PartnerSim::start().await;
    let port = refused_port();
    let hook = format!(
        "[[businesses.webhooks]]\nurl = \"http://127.0.0.1:{port}/hooks\"\nsecret = \"{SECRET}\""
    );
    let s = server(&partner.partner_toml(), &hook).await;
    let token = s.acme().await;
    let id = issue_pending(&s, &token, "EK-1", "inv-1").await;
    wait_tx(&s, &token, &id, "to complete", |tx| {
        tx["status"] == "completed"
    })
    .await;
    // The event's first attempt met a refused port: it waits 5 s for the next one.
    eventually("the event to be tried and queued again", || async {
        s.app.store.outbox_depth().await.expect("depth") == (1, Some(T0 + 5))
    })
    .await;
    let dir = s.stop().await;

    // Restarted without the webhook: the queued event fails, it is not dropped.
    let partner_lines = partner.partner_toml();
    let s = TestServer::start_in(dir, move |text| {
        text.replace(
            "max_points = 1000000\n",
            &format!("max_points = 1000000\n[programs.partner]\n{partner_lines}\n"),
        )
    })
    .await;
    s.clock.set(T0 + 5);
    eventually("the event to leave the outbox", || async {
        s.app.store.outbox_depth().await.expect("depth") == (0, None)
    })
    .await;
    let report = s.app.store.check().expect("check");
    assert_eq!(report.events, 1);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
