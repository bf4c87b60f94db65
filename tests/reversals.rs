//! Reversals over real HTTP: the real server (in process, port 0, a hand-set clock) on a
//! real redb file, with the partner simulator of `common::partner` for the debits. The
//! arithmetic's property test lives beside the formula (`ledger`'s unit tests); these
//! check what the API does with it, concurrency, ordering at the partner and tenants.

mod common;

use std::time::Duration;

use common::partner::{Behaviour, PartnerSim, SECRET};
use common::{eventually, request, server_with_partner as server, Reply, TestServer};
use hyper::Method;
use serde_json::{json, Value};

/// Issues `value` AED minor units of skywards to `member`; returns the transaction.
async fn issue(s: &TestServer, token: &str, member: &str, reference: &str, value: u64) -> Value {
    let r = s
        .issue(
            token,
            json!({"programId": "skywards", "value": value, "userId": member,
                   "referenceNumber": reference}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    get(
        s,
        token,
        &format!("/v1/transactions/{}", r.json()["id"].as_str().expect("id")),
    )
    .await
}

async fn get(s: &TestServer, token: &str, path: &str) -> Value {
    let r = s.get(path, Some(token)).await;
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()
}

async fn reverse(s: &TestServer, token: &str, tx: &str, body: Value) -> Reply {
    s.post(
        &format!("/v1/transactions/{tx}/reversals"),
        Some(token),
        &body,
    )
    .await
}

/// Polls `path` (a transaction or a reversal) until its `status` is `status`.
async fn wait_status(s: &TestServer, token: &str, path: &str, status: &str) {
    eventually(&format!("{path} to be {status}"), || async {
        get(s, token, path).await["status"] == status
    })
    .await;
}

/// A reversal request in a task of its own, on its own connection: many at once.
fn spawn_reverse(
    s: &TestServer,
    token: &str,
    tx: &str,
    body: Value,
) -> tokio::task::JoinHandle<Reply> {
    let (addr, token, path) = (
        s.addr,
        token.to_owned(),
        format!("/v1/transactions/{tx}/reversals"),
    );
    tokio::spawn(async move {
        request(
            addr,
            Method::POST,
            &path,
            Some(&token),
            Some(body.to_string().into_bytes()),
            &[("content-type", "application/json")],
        )
        .await
    })
}

/// floor(total × (value − reversed) / value), as the SPEC writes it.
fn standing(total: u64, value: u64, reversed: u64) -> u64 {
    (u128::from(total) * u128::from(value - reversed) / u128::from(value)) as u64
}

fn problem_type(r: &Reply) -> String {
    r.json()["type"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn partial_then_full_reversals_take_back_exactly_what_was_issued() {
    let s = server("", "").await;
    let token = s.acme().await;
    let tx = issue(&s, &token, "EK-1", "inv-1", 100_000).await;
    let (id, total) = (
        tx["id"].as_str().expect("id"),
        tx["totalPoints"].as_u64().expect("points"),
    );
    assert_eq!(
        (tx["reversedValue"].as_u64(), tx["reversedPoints"].as_u64()),
        (Some(0), Some(0))
    );

    // A partial reversal: the points follow the formula.
    let first = reverse(
        &s,
        &token,
        id,
        json!({"referenceNumber": "ret-1", "value": 33_333, "reason": "one cup returned"}),
    )
    .await;
    assert_eq!(first.status, 201, "{}", first.text());
    let first = first.json();
    let first_points = total - standing(total, 100_000, 33_333);
    assert_eq!(first["points"], first_points);
    assert_eq!(first["value"], 33_333);
    assert_eq!(first["transactionId"], id);
    assert_eq!(first["referenceNumber"], "ret-1");
    assert_eq!(first["reason"], "one cup returned");
    assert_eq!(
        first["status"], "completed",
        "no partner: completed at once"
    );
    assert_eq!(first["delivery"], Value::Null);
    assert_eq!(first["createdAt"], "2026-11-27T10:15:00Z");
    let rv = first["id"].as_str().expect("id").to_owned();
    assert!(rv.starts_with("rv_") && rv.len() == 25, "{rv}");

    // The replay: 200, the same body; a changed request with that reference: 409.
    let again = reverse(
        &s,
        &token,
        id,
        json!({"referenceNumber": "ret-1", "value": 33_333, "reason": "one cup returned"}),
    )
    .await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json(), first);
    for (body, field) in [
        (
            json!({"referenceNumber": "ret-1", "value": 33_334, "reason": "one cup returned"}),
            "value",
        ),
        (
            json!({"referenceNumber": "ret-1", "reason": "one cup returned"}),
            "value",
        ),
        (
            json!({"referenceNumber": "ret-1", "value": 33_333}),
            "reason",
        ),
    ] {
        let r = reverse(&s, &token, id, body).await;
        assert_eq!(r.status, 409, "{}", r.text());
        assert_eq!(
            problem_type(&r),
            "urn:cosmopoints:problem:idempotency-conflict"
        );
        assert!(
            r.json()["detail"].as_str().expect("detail").contains(field),
            "{}",
            r.text()
        );
    }

    // More than remains: 422, nothing written.
    let too_much = reverse(
        &s,
        &token,
        id,
        json!({"referenceNumber": "ret-2", "value": 66_668}),
    )
    .await;
    assert_eq!(too_much.status, 422, "{}", too_much.text());
    assert_eq!(
        problem_type(&too_much),
        "urn:cosmopoints:problem:value-exceeds-remaining"
    );
    assert!(too_much.json()["detail"]
        .as_str()
        .expect("detail")
        .contains("66667"));

    // The rest: exactly what is left, whatever the rounding took before.
    let rest = reverse(&s, &token, id, json!({"referenceNumber": "ret-2"})).await;
    assert_eq!(rest.status, 201, "{}", rest.text());
    let rest = rest.json();
    assert_eq!(rest["value"], 66_667);
    assert_eq!(rest["points"], total - first_points);

    let nothing = reverse(&s, &token, id, json!({"referenceNumber": "ret-3"})).await;
    assert_eq!(nothing.status, 422, "{}", nothing.text());
    assert_eq!(
        problem_type(&nothing),
        "urn:cosmopoints:problem:nothing-to-reverse"
    );
    // A replay of the full reversal is still a replay, not "nothing to reverse".
    let replay = reverse(&s, &token, id, json!({"referenceNumber": "ret-2"})).await;
    assert_eq!(replay.status, 200, "{}", replay.text());
    assert_eq!(replay.json(), rest);

    // The transaction shows it all; listings still list transactions.
    let tx = get(&s, &token, &format!("/v1/transactions/{id}")).await;
    assert_eq!(tx["reversedValue"], 100_000);
    assert_eq!(tx["reversedPoints"], total);
    assert_eq!(tx["status"], "completed");
    assert_eq!(
        tx["pointTransactions"],
        json!([
            {"destinationNumberOfPoints": total.to_string(), "type": "base"},
            {"destinationNumberOfPoints": format!("-{first_points}"), "type": "reversal",
             "id": rv, "status": "completed"},
            {"destinationNumberOfPoints": format!("-{}", total - first_points), "type": "reversal",
             "id": rest["id"], "status": "completed"},
        ])
    );
    let listed = s.all_transactions(&token).await;
    assert_eq!(listed, vec![tx.clone()]);
    let csv = request(
        s.addr,
        Method::GET,
        "/v1/transactions?startDate=0000000000&endDate=9999999999",
        Some(&token),
        None,
        &[("accept", "text/csv")],
    )
    .await;
    assert!(
        csv.text().contains(&format!(",100000,{total}\r\n")),
        "{}",
        csv.text()
    );

    // Reading them back: the list in creation order, one by id or by reference.
    let list = get(&s, &token, &format!("/v1/transactions/{id}/reversals")).await;
    assert_eq!(list, json!([first, rest]));
    let by_ref = get(&s, &token, "/v1/transactions/inv-1/reversals").await;
    assert_eq!(by_ref, list);
    assert_eq!(get(&s, &token, &format!("/v1/reversals/{rv}")).await, first);
    assert_eq!(get(&s, &token, "/v1/reversals/ret-2").await, rest);
    let missing = s.get("/v1/reversals/ret-9", Some(&token)).await;
    assert_eq!(missing.status, 404, "{}", missing.text());

    let report = s.app.store.check().expect("check");
    assert_eq!(report.reversals, 2);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test]
async fn bad_reversal_requests_are_400_and_change_nothing() {
    let s = server("", "").await;
    let token = s.acme().await;
    let tx = issue(&s, &token, "EK-1", "inv-1", 5_000).await;
    let id = tx["id"].as_str().expect("id");
    for (body, says) in [
        (json!({"value": 10}), "referenceNumber"),
        (json!({"referenceNumber": "r", "value": 0}), "value"),
        (json!({"referenceNumber": "r", "value": null}), "not null"),
        (json!({"referenceNumber": "r", "value": -5}), "value"),
        (json!({"referenceNumber": "r", "value": 1.5}), "value"),
        (json!({"referenceNumber": "r", "value": "10"}), "value"),
        (json!({"referenceNumber": "r", "points": 10}), "points"),
        (
            json!({"referenceNumber": "", "value": 10}),
            "referenceNumber",
        ),
        (
            json!({"referenceNumber": "r", "reason": "x".repeat(513)}),
            "reason",
        ),
        (json!({"referenceNumber": "r", "reason": "a\0b"}), "NUL"),
        (
            json!({"referenceNumber": "rv_AAAAAAAAAAAAAAAAAAAAAA"}),
            "reversal id",
        ),
        (json!(["referenceNumber"]), "object"),
    ] {
        let r = reverse(&s, &token, id, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(problem_type(&r), "urn:cosmopoints:problem:invalid-request");
        assert!(
            r.json()["detail"].as_str().expect("detail").contains(says),
            "{body}: {}",
            r.text()
        );
    }
    let unknown = reverse(&s, &token, "inv-404", json!({"referenceNumber": "r"})).await;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    let wrong_method = request(
        s.addr,
        Method::DELETE,
        &format!("/v1/transactions/{id}/reversals"),
        Some(&token),
        None,
        &[],
    )
    .await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.header("allow"), Some("GET, HEAD, POST"));
    let no_token = s
        .post(
            &format!("/v1/transactions/{id}/reversals"),
            None,
            &json!({"referenceNumber": "r"}),
        )
        .await;
    assert_eq!(no_token.status, 401);
    let tx_after = get(&s, &token, &format!("/v1/transactions/{id}")).await;
    assert_eq!(tx_after, tx, "nothing changed");
    assert_eq!(s.app.store.check().expect("check").reversals, 0);
}

#[tokio::test]
async fn another_business_can_neither_see_nor_reverse_them() {
    let s = server("", "").await;
    let (acme, globex) = (s.acme().await, s.globex().await);
    let tx = issue(&s, &acme, "EK-1", "inv-1", 10_000).await;
    let id = tx["id"].as_str().expect("id");
    let r = reverse(
        &s,
        &acme,
        id,
        json!({"referenceNumber": "ret-1", "value": 100}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let rv = r.json()["id"].as_str().expect("id").to_owned();

    for key in [id, "inv-1"] {
        let r = reverse(
            &s,
            &globex,
            key,
            json!({"referenceNumber": "ret-1", "value": 100}),
        )
        .await;
        assert_eq!(r.status, 404, "{}", r.text());
        let r = s
            .get(&format!("/v1/transactions/{key}/reversals"), Some(&globex))
            .await;
        assert_eq!(r.status, 404, "{}", r.text());
    }
    for key in [rv.as_str(), "ret-1"] {
        let r = s.get(&format!("/v1/reversals/{key}"), Some(&globex)).await;
        assert_eq!(r.status, 404, "{}", r.text());
        let r = s
            .post(
                &format!("/v1/reversals/{key}/redeliver"),
                Some(&globex),
                &json!({}),
            )
            .await;
        assert_eq!(r.status, 404, "{}", r.text());
    }
    // References are per business: globex may use "ret-1" for a reversal of its own.
    let own = s
        .issue(
            &globex,
            json!({"programId": "tiny", "value": 5000, "userId": "G1", "referenceNumber": "inv-1"}),
        )
        .await;
    assert_eq!(own.status, 201, "{}", own.text());
    let r = reverse(&s, &globex, "inv-1", json!({"referenceNumber": "ret-1"})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_ne!(r.json()["id"], rv.as_str());
    // Acme's transaction is untouched by globex's attempts.
    let tx = get(&s, &acme, &format!("/v1/transactions/{id}")).await;
    assert_eq!(tx["reversedValue"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reversals_never_take_more_than_the_transaction_had() {
    let s = server("", "").await;
    let token = s.acme().await;
    let tx = issue(&s, &token, "EK-1", "inv-1", 10_007).await;
    let (id, total) = (
        tx["id"].as_str().expect("id").to_owned(),
        tx["totalPoints"].as_u64().expect("points"),
    );

    // 60 reversals of 333 race for 10,007: at most 30 fit.
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            spawn_reverse(
                &s,
                &token,
                &id,
                json!({"referenceNumber": format!("ret-{i}"), "value": 333}),
            )
        })
        .collect();
    let mut created = Vec::new();
    for task in tasks {
        let r = task.await.expect("task");
        match r.status {
            201 => created.push(r.json()),
            422 => assert_eq!(
                problem_type(&r),
                "urn:cosmopoints:problem:value-exceeds-remaining"
            ),
            other => panic!("{other}: {}", r.text()),
        }
    }
    assert_eq!(created.len(), 30, "10,007 / 333 = 30 reversals fit");
    // Each took what the formula says at its place in the order the writer chose.
    let list = get(&s, &token, &format!("/v1/transactions/{id}/reversals")).await;
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 30);
    for r in &created {
        assert!(list.contains(r), "every 201 is in the list: {r}");
    }
    let mut reversed = 0;
    for r in list {
        let points = standing(total, 10_007, reversed) - standing(total, 10_007, reversed + 333);
        assert_eq!(r["points"], points, "{r}");
        reversed += 333;
    }
    // Then two full reversals race for the last 17: one wins, the other finds nothing.
    let a = reverse(&s, &token, &id, json!({"referenceNumber": "rest-a"}));
    let b = reverse(&s, &token, &id, json!({"referenceNumber": "rest-b"}));
    let (a, b) = tokio::join!(a, b);
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [201, 422], "{} / {}", a.text(), b.text());
    let loser = if a.status == 422 { &a } else { &b };
    assert_eq!(
        problem_type(loser),
        "urn:cosmopoints:problem:nothing-to-reverse"
    );
    let tx = get(&s, &token, &format!("/v1/transactions/{id}")).await;
    assert_eq!(tx["reversedValue"], 10_007);
    assert_eq!(tx["reversedPoints"], total);
    let report = s.app.store.check().expect("check");
    assert_eq!(report.reversals, 31);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replays_make_one_reversal() {
    let s = server("", "").await;
    let token = s.acme().await;
    let tx = issue(&s, &token, "EK-1", "inv-1", 10_000).await;
    let id = tx["id"].as_str().expect("id").to_owned();
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            spawn_reverse(
                &s,
                &token,
                &id,
                json!({"referenceNumber": "ret-1", "value": 2500}),
            )
        })
        .collect();
    let mut bodies = Vec::new();
    let mut statuses = Vec::new();
    for task in tasks {
        let r = task.await.expect("task");
        statuses.push(r.status);
        bodies.push(r.json());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 200),
        "{statuses:?}"
    );
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "every answer is the same reversal"
    );
    let tx = get(&s, &token, &format!("/v1/transactions/{id}")).await;
    assert_eq!(tx["reversedValue"], 2500);
    assert_eq!(s.app.store.check().expect("check").reversals, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_goes_to_the_partner_only_after_its_credit_completed() {
    let sim = PartnerSim::start().await;
    // The credit fails once; its retry is due 5 s later on the hand-set clock.
    sim.script_member(
        "EK-1",
        vec![
            Behaviour::Unavailable { retry_after: None },
            Behaviour::Accept,
        ],
    );
    let merchant = PartnerSim::start().await;
    let s = server(
        &format!("{}retry_schedule_seconds = [5, 60]", sim.partner_toml()),
        &format!(
            "[[businesses.webhooks]]\nurl = \"{}/hooks\"\nsecret = \"{SECRET}\"\nevents = [\"reversal.completed\", \"reversal.failed\"]",
            merchant.url()
        ),
    )
    .await;
    let token = s.acme().await;
    let tx = issue(&s, &token, "EK-1", "inv-1", 100_000).await;
    let id = tx["id"].as_str().expect("id").to_owned();
    eventually("the first credit attempt", || async {
        sim.attempts(&id).len() == 1
    })
    .await;
    let r = reverse(
        &s,
        &token,
        &id,
        json!({"referenceNumber": "ret-1", "value": 40_000}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let rv = r.json();
    let rv_id = rv["id"].as_str().expect("id").to_owned();
    assert_eq!(rv["status"], "pending");
    // The credit is pending: no debit goes out, however long we wait in real time.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(sim.attempts(&rv_id).is_empty(), "a debit before its credit");
    let shown = get(&s, &token, &format!("/v1/reversals/{rv_id}")).await;
    assert_eq!(shown["status"], "pending");
    assert_eq!(shown["delivery"]["attempts"], 0);

    // The credit's retry comes due and completes; the debit follows it.
    s.clock.set(s.clock.now() + 5);
    eventually("the debit", || async { sim.credits().contains_key(&rv_id) }).await;
    let requests = sim.requests();
    let credit_at = requests
        .iter()
        .rposition(|r| r.webhook_id == id)
        .expect("credit");
    let debit_at = requests
        .iter()
        .position(|r| r.webhook_id == rv_id)
        .expect("debit");
    assert!(
        credit_at < debit_at,
        "the credit was accepted before the debit was sent"
    );
    let debit = &sim.credits()[&rv_id];
    assert_eq!(debit.path, "/debits");
    let credit = &sim.credits()[&id];
    assert_eq!(debit.body["type"], "points.debit");
    assert_eq!(debit.body["reversalId"], rv_id.as_str());
    assert_eq!(debit.body["transactionId"], id.as_str());
    assert_eq!(
        debit.body["partnerTransactionId"],
        credit.partner_transaction_id.as_str()
    );
    assert_eq!(debit.body["memberId"], "EK-1");
    assert_eq!(debit.body["points"], rv["points"]);
    assert_eq!(debit.body["referenceNumber"], "ret-1");
    assert_eq!(debit.answered, 1, "sent once");

    wait_status(&s, &token, &format!("/v1/reversals/{rv_id}"), "completed").await;
    let shown = get(&s, &token, &format!("/v1/reversals/{rv_id}")).await;
    assert_eq!(
        shown["delivery"]["partnerTransactionId"],
        debit.partner_transaction_id.as_str()
    );
    let tx = get(&s, &token, &format!("/v1/transactions/{id}")).await;
    assert_eq!(tx["pointTransactions"][1]["status"], "completed");
    eventually("the reversal.completed event", || async {
        !merchant.requests().is_empty()
    })
    .await;
    let event = &merchant.requests()[0];
    assert_eq!(event.body["type"], "reversal.completed");
    assert_eq!(event.body["data"]["id"], rv_id.as_str());
    assert_eq!(event.body["data"]["status"], "completed");
    let report = s.app.store.check().expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_of_a_failed_credit_completes_without_a_partner_call() {
    let sim = PartnerSim::start().await;
    let reject = Behaviour::Reject {
        status: 422,
        reason: "closed account".into(),
    };
    sim.set_member("gone-1", reject.clone());
    // Fails transiently first, then for good: the reversal made in between waits, then
    // settles without a call.
    sim.script_member(
        "gone-2",
        vec![Behaviour::Unavailable { retry_after: None }, reject],
    );
    let s = server(
        &format!("{}retry_schedule_seconds = [5]", sim.partner_toml()),
        "",
    )
    .await;
    let token = s.acme().await;

    let failed = issue(&s, &token, "gone-1", "inv-1", 10_000).await;
    let failed_id = failed["id"].as_str().expect("id").to_owned();
    wait_status(
        &s,
        &token,
        &format!("/v1/transactions/{failed_id}"),
        "failed",
    )
    .await;
    let r = reverse(&s, &token, &failed_id, json!({"referenceNumber": "ret-1"})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["status"], "completed");
    assert_eq!(r.json()["delivery"], Value::Null);
    // It cannot be redelivered now: the partner would get points already taken back.
    let redeliver = s
        .post(
            &format!("/v1/transactions/{failed_id}/redeliver"),
            Some(&token),
            &json!({}),
        )
        .await;
    assert_eq!(redeliver.status, 409, "{}", redeliver.text());
    assert_eq!(
        problem_type(&redeliver),
        "urn:cosmopoints:problem:invalid-state"
    );

    let later = issue(&s, &token, "gone-2", "inv-2", 10_000).await;
    let later_id = later["id"].as_str().expect("id").to_owned();
    eventually("the first attempt", || async {
        sim.attempts(&later_id).len() == 1
    })
    .await;
    let r = reverse(
        &s,
        &token,
        &later_id,
        json!({"referenceNumber": "ret-2", "value": 500}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let rv_id = r.json()["id"].as_str().expect("id").to_owned();
    assert_eq!(r.json()["status"], "pending");
    s.clock.set(s.clock.now() + 5);
    wait_status(&s, &token, &format!("/v1/reversals/{rv_id}"), "completed").await;
    assert_eq!(
        get(&s, &token, &format!("/v1/transactions/{later_id}")).await["status"],
        "failed"
    );
    assert!(
        sim.requests().iter().all(|r| r.path == "/credits"),
        "no debit was sent for a credit that never arrived"
    );
    let report = s.app.store.check().expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_the_partner_rejects_fails_with_its_reason_and_can_be_redelivered() {
    let sim = PartnerSim::start().await;
    let merchant = PartnerSim::start().await;
    let s = server(
        &sim.partner_toml(),
        &format!(
            "[[businesses.webhooks]]\nurl = \"{}/hooks\"\nsecret = \"{SECRET}\"\nevents = [\"reversal.failed\", \"reversal.completed\"]",
            merchant.url()
        ),
    )
    .await;
    let token = s.acme().await;
    let tx = issue(&s, &token, "EK-7", "inv-1", 10_000).await;
    let id = tx["id"].as_str().expect("id").to_owned();
    eventually("the credit", || async { sim.credits().contains_key(&id) }).await;
    wait_status(&s, &token, &format!("/v1/transactions/{id}"), "completed").await;
    sim.set_member(
        "EK-7",
        Behaviour::Reject {
            status: 409,
            reason: "points already spent".into(),
        },
    );
    let r = reverse(&s, &token, &id, json!({"referenceNumber": "ret-1"})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let rv_id = r.json()["id"].as_str().expect("id").to_owned();
    wait_status(&s, &token, &format!("/v1/reversals/{rv_id}"), "failed").await;
    let shown = get(&s, &token, &format!("/v1/reversals/{rv_id}")).await;
    assert_eq!(shown["delivery"]["error"]["type"], "partner-rejected");
    assert_eq!(shown["delivery"]["error"]["httpStatus"], 409);
    assert!(
        shown["delivery"]["error"]["detail"]
            .as_str()
            .expect("detail")
            .contains("points already spent"),
        "{shown}"
    );
    // Only a failed one can be redelivered; this one can.
    sim.set_member("EK-7", Behaviour::Accept);
    let r = s
        .post(
            &format!("/v1/reversals/{rv_id}/redeliver"),
            Some(&token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["status"], "pending");
    wait_status(&s, &token, &format!("/v1/reversals/{rv_id}"), "completed").await;
    let again = s
        .post(
            &format!("/v1/reversals/{rv_id}/redeliver"),
            Some(&token),
            &json!({}),
        )
        .await;
    assert_eq!(again.status, 409, "{}", again.text());
    eventually("two events", || async { merchant.requests().len() >= 2 }).await;
    let kinds: Vec<_> = merchant
        .requests()
        .iter()
        .map(|r| r.body["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(kinds, ["reversal.failed", "reversal.completed"]);
    assert_eq!(sim.credits()[&rv_id].answered, 1);
}

#[tokio::test]
async fn a_reversal_worth_less_than_a_point_takes_none_and_says_0() {
    let s = server("", "").await;
    let token = s.acme().await;
    // 10.00 AED is 226 points: 1 unit back leaves floor(226 × 999 / 1000) = 225 standing.
    let tx = issue(&s, &token, "EK-1", "inv-1", 1000).await;
    let id = tx["id"].as_str().expect("id");
    assert_eq!(tx["totalPoints"], 226);
    let first = reverse(
        &s,
        &token,
        id,
        json!({"referenceNumber": "r-1", "value": 1}),
    )
    .await;
    assert_eq!(first.json()["points"], 1, "{}", first.text());
    let second = reverse(
        &s,
        &token,
        id,
        json!({"referenceNumber": "r-2", "value": 1}),
    )
    .await;
    assert_eq!(second.status, 201, "{}", second.text());
    assert_eq!(second.json()["points"], 0);
    assert_eq!(second.json()["status"], "completed");
    let tx = get(&s, &token, &format!("/v1/transactions/{id}")).await;
    assert_eq!(
        tx["pointTransactions"][1]["destinationNumberOfPoints"],
        "-1"
    );
    assert_eq!(tx["pointTransactions"][2]["destinationNumberOfPoints"], "0");
    assert_eq!(
        (tx["reversedValue"].as_u64(), tx["reversedPoints"].as_u64()),
        (Some(2), Some(1))
    );
    // The rest takes exactly what is left.
    let rest = reverse(&s, &token, id, json!({"referenceNumber": "r-3"})).await;
    assert_eq!(rest.json()["points"], 225, "{}", rest.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_takes_at_most_1000_partial_reversals_then_the_rest() {
    let s = server("", "").await;
    let token = s.acme().await;
    let tx = issue(&s, &token, "EK-1", "inv-1", 100_000).await;
    let id = tx["id"].as_str().expect("id").to_owned();
    let seq = s
        .app
        .store
        .transaction(
            &cosmopoints::domain::BusinessId::parse("acme").expect("id"),
            &id,
        )
        .await
        .expect("read")
        .expect("found")
        .seq;
    // Through the store, all at once (so they share a few commits).
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let app = s.app.clone();
        tasks.spawn(async move {
            app.store
                .reverse(cosmopoints::store::Reverse {
                    business: cosmopoints::domain::BusinessId::parse("acme").expect("id"),
                    transaction_seq: seq,
                    request: cosmopoints::ledger::NewReversal {
                        reference_number: cosmopoints::domain::ReferenceNumber::parse(format!(
                            "part-{i}"
                        ))
                        .expect("reference"),
                        value: Some(1),
                        reason: None,
                    },
                })
                .await
        });
    }
    while let Some(done) = tasks.join_next().await {
        let reversed = done.expect("task").expect("stored");
        assert!(
            matches!(reversed, cosmopoints::store::Reversed::Created(_)),
            "{reversed:?}"
        );
    }
    let one_more = reverse(
        &s,
        &token,
        &id,
        json!({"referenceNumber": "part-x", "value": 1}),
    )
    .await;
    assert_eq!(one_more.status, 422, "{}", one_more.text());
    assert_eq!(
        problem_type(&one_more),
        "urn:cosmopoints:problem:too-many-reversals"
    );
    let rest = reverse(&s, &token, &id, json!({"referenceNumber": "rest"})).await;
    assert_eq!(rest.status, 201, "{}", rest.text());
    assert_eq!(rest.json()["value"], 99_000);
    let tx = get(&s, &token, &format!("/v1/transactions/{id}")).await;
    assert_eq!(
        tx["pointTransactions"].as_array().expect("entries").len(),
        1002
    );
    assert_eq!(tx["reversedPoints"], tx["totalPoints"]);
    let report = s.app.store.check().expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_debit_follows_its_credit_through_retries() {
    let sim = PartnerSim::start().await;
    let unavailable = Behaviour::Unavailable { retry_after: None };
    sim.script_member(
        "EK-3",
        vec![unavailable.clone(), unavailable, Behaviour::Accept],
    );
    let s = server(
        &format!(
            "{}retry_schedule_seconds = [5, 60, 600]",
            sim.partner_toml()
        ),
        "",
    )
    .await;
    let token = s.acme().await;
    let tx = issue(&s, &token, "EK-3", "inv-1", 10_000).await;
    let id = tx["id"].as_str().expect("id").to_owned();
    eventually("the first attempt", || async {
        sim.attempts(&id).len() == 1
    })
    .await;
    let r = reverse(
        &s,
        &token,
        &id,
        json!({"referenceNumber": "ret-1", "value": 100}),
    )
    .await;
    let rv = r.json()["id"].as_str().expect("id").to_owned();
    // Due with the credit's next attempt, 5 s on.
    let credit_due = |tx: &Value| tx["delivery"]["nextAttemptAt"].clone();
    let shown = get(&s, &token, &format!("/v1/reversals/{rv}")).await;
    let tx = get(&s, &token, &format!("/v1/transactions/{id}")).await;
    assert_eq!(shown["delivery"]["nextAttemptAt"], credit_due(&tx));
    // The credit's second attempt fails too: the debit moves with it, 60 s on.
    s.clock.set(s.clock.now() + 5);
    eventually("the second attempt is recorded", || async {
        get(&s, &token, &format!("/v1/transactions/{id}")).await["delivery"]["attempts"] == 2
    })
    .await;
    let tx = get(&s, &token, &format!("/v1/transactions/{id}")).await;
    assert_eq!(tx["delivery"]["nextAttemptAt"], "2026-11-27T10:16:05Z");
    let shown = get(&s, &token, &format!("/v1/reversals/{rv}")).await;
    assert_eq!(shown["delivery"]["nextAttemptAt"], credit_due(&tx));
    assert_eq!(shown["delivery"]["attempts"], 0);
    assert!(sim.attempts(&rv).is_empty());
    // Then it completes, and the debit goes at once.
    s.clock.set(s.clock.now() + 60);
    eventually("the debit", || async { sim.credits().contains_key(&rv) }).await;
    let debit = &sim.credits()[&rv];
    assert_eq!(
        debit.body["partnerTransactionId"],
        sim.credits()[&id].partner_transaction_id.as_str()
    );
}
