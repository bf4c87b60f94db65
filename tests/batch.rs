//! Bulk issuance over real HTTP: `POST /v1/transactions/batch` on the real server (in
//! process, port 0) with a real redb file, and on the real binary for durability.

mod common;

use std::sync::Arc;

use common::{request, Binary, TestServer};
use hyper::Method;
use serde_json::{json, Value};

fn item(reference: &str, value: u64) -> Value {
    json!({"programId": "skywards", "value": value, "userId": "EK-1", "referenceNumber": reference})
}

async fn batch(s: &TestServer, token: &str, body: &Value) -> common::Reply {
    s.post("/v1/transactions/batch", Some(token), body).await
}

#[tokio::test]
async fn each_item_gets_the_single_issue_rules_and_its_own_result_in_order() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let existing = s.issue(&token, item("old-1", 3673)).await;
    assert_eq!(existing.status, 201, "{}", existing.text());
    // A minute later: the batch's new transactions have their own date, its replay the
    // date of the original.
    s.clock.set(common::T0 + 60);
    let r = batch(
        &s,
        &token,
        &json!({"items": [
            item("b-1", 3673),
            item("old-1", 3673),                      // a replay of an earlier issue
            item("old-1", 9999),                      // a conflict with it
            {"programId": "skywards", "value": 10, "userId": "x", "referenceNumber": "b-2", "colour": "red"},
            42,                                       // not an object
            {"programId": "tiny", "value": 3673, "userId": "EK-1", "referenceNumber": "b-3"},
            item("b-4", 1),                           // worth 0 points
            item("b-5", 100000),
            item("b-5", 100000),                      // the same again, in the same batch
            item("b-5", 100001),                      // and with another value
        ]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].as_array().expect("results").clone();
    let statuses: Vec<u64> = results
        .iter()
        .map(|r| r["status"].as_u64().expect("status"))
        .collect();
    assert_eq!(statuses, [201, 200, 409, 400, 400, 422, 422, 201, 200, 409]);
    let problem = |i: usize| {
        results[i]["problem"]["type"]
            .as_str()
            .expect("type")
            .to_owned()
    };
    assert_eq!(problem(2), "urn:cosmopoints:problem:idempotency-conflict");
    assert!(results[3]["problem"]["detail"]
        .as_str()
        .expect("detail")
        .contains("colour"));
    assert!(results[4]["problem"]["detail"]
        .as_str()
        .expect("detail")
        .contains("object"));
    assert_eq!(problem(5), "urn:cosmopoints:problem:unprocessable");
    assert_eq!(problem(6), "urn:cosmopoints:problem:unprocessable");
    for i in [3, 4, 5, 6, 9] {
        assert!(results[i].get("transaction").is_none(), "{}", results[i]);
        assert_eq!(results[i]["problem"]["status"], results[i]["status"]);
    }
    assert_eq!(results[1]["transaction"], existing.json());
    assert_eq!(results[7]["transaction"], results[8]["transaction"]);
    assert_eq!(results[0]["transaction"]["totalPoints"], 833);
    assert_eq!(results[0]["transaction"]["referenceNumber"], "b-1");
    // Exactly the new ones were stored, as GET shows them.
    let listed = s.all_transactions(&token).await;
    let refs: Vec<&str> = listed
        .iter()
        .map(|t| t["referenceNumber"].as_str().expect("ref"))
        .collect();
    assert_eq!(refs, ["old-1", "b-1", "b-5"]);
    for i in [0, 7] {
        let id = results[i]["transaction"]["id"].as_str().expect("id");
        let tx = s
            .get(&format!("/v1/transactions/{id}"), Some(&token))
            .await
            .json();
        assert_eq!(tx["totalPoints"], results[i]["transaction"]["totalPoints"]);
        assert_eq!(tx["createdAt"], results[i]["transaction"]["date"]);
        assert_ne!(tx["createdAt"], existing.json()["date"]);
        // The reference still names the first transaction after its repeats in the batch.
        let reference = results[i]["transaction"]["referenceNumber"]
            .as_str()
            .expect("referenceNumber");
        let by_reference = s
            .get(&format!("/v1/transactions/{reference}"), Some(&token))
            .await
            .json();
        assert_eq!(by_reference["id"], id);
    }
    // An item with a repeated key fails alone (a proxy may have read the other value).
    let raw = br#"{"items": [
        {"programId": "skywards", "value": 3673, "userId": "x", "userId": "y", "referenceNumber": "b-6"},
        {"programId": "skywards", "value": 3673, "userId": "x", "referenceNumber": "b-7"}]}"#;
    let r = request(
        s.addr,
        Method::POST,
        "/v1/transactions/batch",
        Some(&token),
        Some(raw.to_vec()),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].clone();
    assert_eq!(results[0]["status"], 400);
    assert!(results[0]["problem"]["detail"]
        .as_str()
        .expect("detail")
        .contains("twice"));
    assert_eq!(results[1]["status"], 201);
    // Items that fail to parse take no place among the looked-up references: the new item
    // after one is new, and the replay after it finds its own transaction.
    let r = batch(
        &s,
        &token,
        &json!({"items": [42, item("b-8", 500), 7, item("old-1", 3673)]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].clone();
    let statuses: Vec<&Value> = (0..4).map(|i| &results[i]["status"]).collect();
    assert_eq!(statuses, [400, 201, 400, 200]);
    assert_eq!(results[3]["transaction"], existing.json());
    let report = s.app.store.check().expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// The up-front look-up of a batch's references skips over ranges it knows to be empty
/// (see `Embedded::by_references`): each stored one among them must still be found. A
/// replay found up front is answered as stored even though its program is no longer the
/// business's; one missed would be planned as new, and refused for that program.
#[tokio::test]
async fn every_stored_reference_among_new_ones_is_found_up_front() {
    let s = TestServer::start().await;
    let (acme, globex) = (s.acme().await, s.globex().await);
    let mut stored = std::collections::HashMap::new();
    for reference in ["r-b", "r-d", "r-f"] {
        let r = s.issue(&acme, item(reference, 3673)).await;
        assert_eq!(r.status, 201, "{}", r.text());
        stored.insert(reference, r.json());
    }
    // Another business's references come right after acme's in the index, and its first
    // is one acme uses next: found past the end of acme's range, it is not acme's.
    let r = s.issue(&globex, item("r-y", 1000)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, |text| {
        text.replace(
            r#"programs = ["skywards", "bounded"]"#,
            r#"programs = ["bounded"]"#,
        )
    })
    .await;
    let acme = s.acme().await;
    let new = |reference: &str| json!({"programId": "bounded", "value": 551, "userId": "EK-1", "referenceNumber": reference});
    let references = [
        "r-e", "r-d", "r-a", "r-f", "r-c", "r-g", "r-d", "r-y", "r-b", "r-z",
    ];
    let items: Vec<Value> = references
        .iter()
        .map(|&r| {
            if stored.contains_key(r) {
                item(r, 3673)
            } else {
                new(r)
            }
        })
        .collect();
    let r = batch(&s, &acme, &json!({ "items": items })).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].as_array().expect("results").clone();
    for (reference, result) in references.iter().zip(&results) {
        match stored.get(reference) {
            Some(original) => {
                assert_eq!(result["status"], 200, "{reference}: {result}");
                assert_eq!(&result["transaction"], original, "{reference}");
            }
            None => assert_eq!(result["status"], 201, "{reference}: {result}"),
        }
    }
    assert_eq!(s.all_transactions(&acme).await.len(), 3 + 6);
}

#[tokio::test]
async fn a_batch_of_the_wrong_shape_is_refused_whole_and_writes_nothing() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let many: Vec<Value> = (0..1001).map(|i| item(&format!("m-{i}"), 3673)).collect();
    for (body, says) in [
        (json!({"items": []}), "1 to 1000"),
        (json!({"items": many}), "1 to 1000"),
        (json!({"items": item("x", 1)}), "items"),
        (json!({"things": [item("x", 3673)]}), "things"),
        (json!([item("x", 3673)]), "object"),
    ] {
        let r = batch(&s, &token, &body).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.problem(400).contains(says), "{}", r.text());
    }
    let text = request(
        s.addr,
        Method::POST,
        "/v1/transactions/batch",
        Some(&token),
        Some(b"{\"items\": [".to_vec()),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(text.status, 400, "{}", text.text());
    let plain = request(
        s.addr,
        Method::POST,
        "/v1/transactions/batch",
        Some(&token),
        Some(b"{}".to_vec()),
        &[("content-type", "text/plain")],
    )
    .await;
    assert_eq!(plain.status, 415);
    let unauthenticated = s
        .post(
            "/v1/transactions/batch",
            None,
            &json!({"items": [item("x", 3673)]}),
        )
        .await;
    assert_eq!(unauthenticated.status, 401);
    let put = request(
        s.addr,
        Method::PUT,
        "/v1/transactions/batch",
        Some(&token),
        None,
        &[],
    )
    .await;
    assert_eq!(put.status, 405);
    assert!(s.all_transactions(&token).await.is_empty());
}

#[tokio::test]
async fn a_thousand_items_fit_its_own_body_limit_and_more_bytes_are_413() {
    let dir = Arc::new(tempfile::tempdir().expect("dir"));
    let s = TestServer::start_in(dir, |text| {
        text.replace("[server]\n", "[server]\nmax_batch_body_bytes = 200000\n")
    })
    .await;
    let token = s.acme().await;
    // About 110 KiB: over the single request limit (64 KiB), under the batch's.
    let items: Vec<Value> = (0..1000)
        .map(|i| item(&format!("bulk-{i:04}"), 3673 + i))
        .collect();
    let r = batch(&s, &token, &json!({ "items": items })).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].as_array().expect("results").clone();
    assert_eq!(results.len(), 1000);
    assert!(results.iter().all(|r| r["status"] == 201));
    assert_eq!(s.all_transactions(&token).await.len(), 1000);
    // Well-formed but too many bytes: 413 before anything is parsed.
    let padded: Vec<Value> = (0..900)
        .map(|i| {
            json!({"programId": "skywards", "value": 3673, "userId": "EK-1",
                   "referenceNumber": format!("pad-{i}"), "description": "x".repeat(250)})
        })
        .collect();
    let r = batch(&s, &token, &json!({ "items": padded })).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(s.all_transactions(&token).await.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_batches_make_each_transaction_once() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let items: Vec<Value> = (0..200).map(|i| item(&format!("c-{i}"), 3673)).collect();
    let body = json!({ "items": items });
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (addr, token, body) = (s.addr, token.clone(), body.to_string());
        tasks.push(tokio::spawn(async move {
            request(
                addr,
                Method::POST,
                "/v1/transactions/batch",
                Some(&token),
                Some(body.into_bytes()),
                &[("content-type", "application/json")],
            )
            .await
        }));
    }
    let mut created = 0;
    let mut ids: Option<Vec<Value>> = None;
    for task in tasks {
        let r = task.await.expect("task");
        assert_eq!(r.status, 200, "{}", r.text());
        let results = r.json()["results"].as_array().expect("results").clone();
        created += results.iter().filter(|r| r["status"] == 201).count();
        assert!(results
            .iter()
            .all(|r| r["status"] == 201 || r["status"] == 200));
        let these: Vec<Value> = results
            .iter()
            .map(|r| r["transaction"]["id"].clone())
            .collect();
        match &ids {
            None => ids = Some(these),
            Some(first) => assert_eq!(first, &these, "every batch names the same transactions"),
        }
    }
    assert_eq!(created, 200, "each item created exactly once");
    assert_eq!(s.all_transactions(&token).await.len(), 200);
}

/// All items are durable before the answer: `kill -9` right after it loses none.
#[test]
fn an_answered_batch_survives_kill_9() {
    let dir = tempfile::tempdir().expect("dir");
    let config = common::write_config(dir.path());
    let mut server = Binary::serve(&config);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ids: Vec<String> = rt.block_on(async {
        let token = server.token("acme-pos", "acme-secret").await;
        let items: Vec<Value> = (0..500).map(|i| item(&format!("k-{i}"), 3673)).collect();
        let r = request(
            server.addr,
            Method::POST,
            "/v1/transactions/batch",
            Some(&token),
            Some(json!({ "items": items }).to_string().into_bytes()),
            &[("content-type", "application/json")],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["transaction"]["id"].as_str().expect("id").to_owned())
            .collect()
    });
    server.kill9();
    let server = Binary::serve(&config);
    rt.block_on(async {
        let token = server.token("acme-pos", "acme-secret").await;
        for id in ids.iter().step_by(25) {
            let r = request(
                server.addr,
                Method::GET,
                &format!("/v1/transactions/{id}"),
                Some(&token),
                None,
                &[],
            )
            .await;
            assert_eq!(r.status, 200, "{id} lost: {}", r.text());
        }
        let listed = request(
            server.addr,
            Method::GET,
            "/v1/transactions?startDate=0000000000&endDate=9999999999",
            Some(&token),
            None,
            &[],
        )
        .await;
        assert_eq!(listed.json().as_array().expect("array").len(), 500);
    });
}
