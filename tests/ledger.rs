//! The points ledger over real HTTP: issue, preview, get, list; validation, exact math,
//! idempotency, tenant isolation, ordering, pagination, and a restart.

mod common;

use common::{issue_body, TestServer, T0};
use hyper::Method;
use serde_json::{json, Value};

async fn list(s: &TestServer, token: &str, query: &str) -> Vec<Value> {
    let r = s
        .get(&format!("/v1/transactions?{query}"), Some(token))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().as_array().expect("array").clone()
}

fn all(start: u64, end: u64) -> String {
    format!("startDate={start:010}&endDate={end:010}")
}

#[tokio::test]
async fn issuing_returns_201_with_exact_points_and_the_transaction_reads_back() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let r = s
        .issue(
            &token,
            json!({"programId": "skywards", "value": 3673, "userId": "user-1",
                   "referenceNumber": "inv-1", "description": "coffee", "bonus": true}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    assert_eq!(created["totalPoints"], 833);
    assert_eq!(created["referenceNumber"], "inv-1");
    assert_eq!(created["date"], "2026-11-27T10:15:00Z");
    let id = created["id"].as_str().expect("id");
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));

    let expected = json!({
        "id": id, "referenceNumber": "inv-1", "sourceValue": 3673, "currency": "AED",
        "description": "coffee", "createdAt": "2026-11-27T10:15:00Z", "userId": "user-1",
        "bonus": true, "totalPoints": 833,
        "pointTransactions": [{"destinationNumberOfPoints": "833", "type": "bonus"}],
        "partnership": {"destination": {"name": "Skywards Miles", "programId": "skywards"}},
        "status": "completed", "delivery": null, "endUserId": null,
        "reversedValue": 0, "reversedPoints": 0,
    });
    assert_eq!(
        created["status"], "completed",
        "no partner: completed at once"
    );
    assert_eq!(
        s.get(&format!("/v1/transactions/{id}"), Some(&token))
            .await
            .json(),
        expected
    );
    assert_eq!(
        s.get("/v1/transactions/inv-1", Some(&token)).await.json(),
        expected
    );
}

#[tokio::test]
async fn points_math_is_exact_where_floats_are_not() {
    let s = TestServer::start().await;
    let globex = s.globex().await;
    // USD business, 70 cents at 0.007 USD/point: 100 points (floats give 99).
    let r = s
        .issue(
            &globex,
            json!({"programId": "tiny", "value": 70, "userId": "u", "referenceNumber": "r1"}),
        )
        .await;
    assert_eq!(r.json()["totalPoints"], 100);
    let preview = s
        .post(
            "/v1/transactions/preview",
            Some(&globex),
            &json!({"programId": "tiny", "value": 70}),
        )
        .await;
    assert_eq!(preview.status, 200);
    assert_eq!(preview.json(), json!({"totalPoints": 100}));
    let acme = s.acme().await;
    let preview = s
        .post(
            "/v1/transactions/preview",
            Some(&acme),
            &json!({"programId": "skywards", "value": 3673}),
        )
        .await;
    assert_eq!(preview.json(), json!({"totalPoints": 833}));
}

#[tokio::test]
async fn preview_stores_nothing() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    for _ in 0..3 {
        let r = s
            .post(
                "/v1/transactions/preview",
                Some(&token),
                &json!({"programId": "skywards", "value": 100_000}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    assert!(s.all_transactions(&token).await.is_empty());
    s.post(
        "/v1/transactions/preview",
        Some(&token),
        &json!({"programId": "tiny", "value": 100}),
    )
    .await
    .problem(422);
    s.post(
        "/v1/transactions/preview",
        Some(&token),
        &json!({"programId": "skywards"}),
    )
    .await
    .problem(400);
}

#[tokio::test]
async fn each_invalid_field_is_a_400_naming_it_and_stores_nothing() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let long = "x".repeat(129);
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"value": 1, "userId": "u", "referenceNumber": "r"}),
            "programId",
        ),
        (
            json!({"programId": "skywards", "userId": "u", "referenceNumber": "r"}),
            "value",
        ),
        (
            json!({"programId": "skywards", "value": 100, "referenceNumber": "r"}),
            "userId",
        ),
        (
            json!({"programId": "skywards", "value": 100, "userId": "u"}),
            "referenceNumber",
        ),
        (
            json!({"programId": "skywards", "value": 0, "userId": "u", "referenceNumber": "r"}),
            "value",
        ),
        (
            json!({"programId": "skywards", "value": -5, "userId": "u", "referenceNumber": "r"}),
            "value",
        ),
        (
            json!({"programId": "skywards", "value": 1_000_000_000_001u64, "userId": "u", "referenceNumber": "r"}),
            "value",
        ),
        (
            json!({"programId": "skywards", "value": 10.5, "userId": "u", "referenceNumber": "r"}),
            "value",
        ),
        (
            json!({"programId": "skywards", "value": "100", "userId": "u", "referenceNumber": "r"}),
            "value",
        ),
        (
            json!({"programId": "skywards", "value": 100, "userId": "", "referenceNumber": "r"}),
            "userId",
        ),
        (
            json!({"programId": "skywards", "value": 100, "userId": long, "referenceNumber": "r"}),
            "userId",
        ),
        (
            json!({"programId": "skywards", "value": 100, "userId": "u", "referenceNumber": "a\u{0}b"}),
            "referenceNumber",
        ),
        (
            json!({"programId": "skywards", "value": 100, "userId": "u", "referenceNumber": long}),
            "referenceNumber",
        ),
        (
            json!({"programId": "skywards", "value": 100, "userId": "u", "referenceNumber": "r", "description": "d".repeat(513)}),
            "description",
        ),
        (
            json!({"programId": "skywards", "value": 100, "userId": "u", "referenceNumber": "r", "description": 7}),
            "description",
        ),
        (
            json!({"programId": "skywards", "value": 100, "userId": "u", "referenceNumber": "r", "description": "a\0b"}),
            "description",
        ),
        (
            json!({"programId": "skywards", "value": 100, "userId": "u", "referenceNumber": "r", "bonus": "yes"}),
            "bonus",
        ),
        (
            json!({"programId": "skywards", "value": 100, "userId": "u", "referenceNumber": "r", "points": 5}),
            "points",
        ),
        (
            json!({"programId": 7, "value": 100, "userId": "u", "referenceNumber": "r"}),
            "programId",
        ),
    ];
    for (body, field) in cases {
        let detail = s.issue(&token, body.clone()).await.problem(400);
        assert!(detail.contains(field), "{body} → {detail}");
    }
    for raw in ["", "[]", "null", "{", "{\"value\":1e400}"] {
        let r = s
            .send(
                Method::POST,
                "/v1/transactions",
                Some(&token),
                Some(raw.as_bytes().to_vec()),
                &[("content-type", "application/json")],
            )
            .await;
        r.problem(400);
    }
    assert!(s.all_transactions(&token).await.is_empty());
}

#[tokio::test]
async fn business_rules_are_422_and_store_nothing() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    // Not enabled for acme (globex has it), and not defined at all.
    for program in ["tiny", "nowhere"] {
        let detail = s
            .issue(&token, json!({"programId": program, "value": 100_000, "userId": "u", "referenceNumber": "r"}))
            .await
            .problem(422);
        assert!(detail.contains(program), "{detail}");
    }
    // 1 fils is worth 0 points; bounded allows 100..=200 points (0.036725 AED each).
    s.issue(
        &token,
        json!({"programId": "skywards", "value": 1, "userId": "u", "referenceNumber": "r"}),
    )
    .await
    .problem(422);
    s.issue(
        &token,
        json!({"programId": "bounded", "value": 367, "userId": "u", "referenceNumber": "r"}),
    )
    .await
    .problem(422);
    s.issue(
        &token,
        json!({"programId": "bounded", "value": 740, "userId": "u", "referenceNumber": "r"}),
    )
    .await
    .problem(422);
    let ok = s
        .issue(
            &token,
            json!({"programId": "bounded", "value": 368, "userId": "u", "referenceNumber": "r"}),
        )
        .await;
    assert_eq!(ok.status, 201, "{}", ok.text());
    assert_eq!(ok.json()["totalPoints"], 100);
    assert_eq!(s.all_transactions(&token).await.len(), 1);
}

#[tokio::test]
async fn the_same_request_again_is_a_200_replay_and_any_difference_a_409() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let first = s.issue(&token, issue_body("ref-1")).await;
    assert_eq!(first.status, 201);
    s.clock.set(T0 + 30);
    let again = s.issue(&token, issue_body("ref-1")).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json(), first.json());
    // Explicit defaults are the same request.
    let mut explicit = issue_body("ref-1");
    explicit["bonus"] = json!(false);
    explicit["description"] = Value::Null;
    assert_eq!(s.issue(&token, explicit).await.status, 200);
    for (field, value) in [
        ("value", json!(3674)),
        ("userId", json!("user-2")),
        ("programId", json!("bounded")),
        ("description", json!("other")),
        ("bonus", json!(true)),
    ] {
        let mut body = issue_body("ref-1");
        body[field] = value;
        let detail = s.issue(&token, body).await.problem(409);
        assert!(detail.contains(field), "{detail}");
    }
    assert_eq!(s.all_transactions(&token).await.len(), 1);
}

#[tokio::test]
async fn concurrent_requests_with_one_reference_make_one_transaction() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        tasks.push(common::spawn_issue(s.addr, &token, issue_body("same-ref")));
    }
    let mut created = 0;
    let mut replayed = 0;
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let r = task.await.expect("task");
        match r.status {
            201 => created += 1,
            200 => replayed += 1,
            other => panic!("unexpected {other}: {}", r.text()),
        }
        ids.insert(r.json()["id"].as_str().expect("id").to_owned());
    }
    assert_eq!((created, replayed, ids.len()), (1, 63, 1));
    assert_eq!(s.all_transactions(&token).await.len(), 1);
}

#[tokio::test]
async fn businesses_never_see_each_others_transactions() {
    let s = TestServer::start().await;
    let acme = s.acme().await;
    let globex = s.globex().await;
    let mine = s.issue(&acme, issue_body("shared-ref")).await.json();
    let id = mine["id"].as_str().expect("id");
    s.get(&format!("/v1/transactions/{id}"), Some(&globex))
        .await
        .problem(404);
    s.get("/v1/transactions/shared-ref", Some(&globex))
        .await
        .problem(404);
    assert!(s.all_transactions(&globex).await.is_empty());
    // The same referenceNumber is free for another business.
    let theirs = s
        .issue(&globex, json!({"programId": "skywards", "value": 1200, "userId": "u", "referenceNumber": "shared-ref"}))
        .await;
    assert_eq!(theirs.status, 201);
    assert_ne!(theirs.json()["id"], mine["id"]);
    assert_eq!(
        s.get("/v1/transactions/shared-ref", Some(&acme))
            .await
            .json()["id"],
        mine["id"]
    );
}

#[tokio::test]
async fn get_by_reference_percent_decodes_and_unknown_is_404() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let r = s.issue(&token, issue_body("inv 2026/11#7")).await;
    assert_eq!(r.status, 201);
    let got = s
        .get("/v1/transactions/inv%202026%2F11%237", Some(&token))
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["referenceNumber"], "inv 2026/11#7");
    s.get("/v1/transactions/unknown", Some(&token))
        .await
        .problem(404);
    s.get("/v1/transactions/tx_AAAAAAAAAAAAAAAAAAAAAA", Some(&token))
        .await
        .problem(404);
    s.get("/v1/transactions/bad%zz", Some(&token))
        .await
        .problem(400);
    // A NUL in the key finds nothing (no stored reference holds one), on every backend.
    s.get("/v1/transactions/inv%00", Some(&token))
        .await
        .problem(404);
    s.get("/v1/reversals/ret%00", Some(&token))
        .await
        .problem(404);
    s.get("/v1/transactions/inv-1", None).await.problem(401);
    // "preview" is a referenceNumber like any other for GET.
    assert_eq!(s.issue(&token, issue_body("preview")).await.status, 201);
    assert_eq!(
        s.get("/v1/transactions/preview", Some(&token)).await.json()["referenceNumber"],
        "preview"
    );
}

#[tokio::test]
async fn listing_is_inclusive_ordered_and_filtered_by_program() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let mut refs = Vec::new();
    for (i, offset) in [0u64, 0, 10, 20, 20, 20].iter().enumerate() {
        s.clock.set(T0 + offset);
        let mut body = issue_body(&format!("r{i}"));
        if i % 2 == 1 {
            body["programId"] = json!("bounded");
            body["value"] = json!(400);
        }
        assert_eq!(s.issue(&token, body).await.status, 201);
        refs.push(format!("r{i}"));
    }
    let names = |items: Vec<Value>| -> Vec<String> {
        items
            .iter()
            .map(|t| t["referenceNumber"].as_str().expect("ref").to_owned())
            .collect()
    };
    assert_eq!(names(list(&s, &token, &all(T0, T0 + 20)).await), refs);
    assert_eq!(
        names(list(&s, &token, &all(T0 + 10, T0 + 10)).await),
        ["r2"]
    );
    assert_eq!(
        names(list(&s, &token, &all(T0 + 1, T0 + 9)).await),
        Vec::<String>::new()
    );
    assert_eq!(
        names(list(&s, &token, &all(T0 + 20, T0 + 20)).await),
        ["r3", "r4", "r5"]
    );
    assert_eq!(
        names(list(&s, &token, &all(T0 - 100, T0 - 1)).await),
        Vec::<String>::new()
    );
    let bounded = list(
        &s,
        &token,
        &format!("{}&programId=bounded", all(T0, T0 + 20)),
    )
    .await;
    assert_eq!(names(bounded), ["r1", "r3", "r5"]);
    assert!(
        list(&s, &token, &format!("{}&programId=tiny", all(T0, T0 + 20)))
            .await
            .is_empty()
    );
}

/// A listing of every program merges the business's programs by time, then by the order
/// of issue (also when the clock went back), page after page, and leaves out another
/// business's transactions made in between.
#[tokio::test]
async fn a_listing_of_every_program_merges_them_in_time_order_across_pages() {
    let s = TestServer::start().await;
    let acme = s.acme().await;
    let globex = s.globex().await;
    let plan: [(u64, &str); 9] = [
        (5, "skywards"),
        (5, "bounded"),
        (2, "skywards"), // the clock went back
        (9, "bounded"),
        (2, "bounded"),
        (5, "skywards"),
        (9, "skywards"),
        (0, "bounded"),
        (9, "skywards"),
    ];
    let mut expected = Vec::new();
    for (i, (offset, program)) in plan.iter().enumerate() {
        s.clock.set(T0 + offset);
        let mut body = issue_body(&format!("m{i}"));
        body["programId"] = json!(program);
        if *program == "bounded" {
            body["value"] = json!(400);
        }
        assert_eq!(s.issue(&acme, body).await.status, 201);
        expected.push((*offset, i, format!("m{i}")));
        // Another business's, at the same time and in both of its programs.
        let mut other = issue_body(&format!("m{i}"));
        other["programId"] = json!(if i % 2 == 0 { "tiny" } else { "skywards" });
        assert_eq!(s.issue(&globex, other).await.status, 201);
    }
    expected.sort();
    let expected: Vec<String> = expected.into_iter().map(|(_, _, r)| r).collect();
    let names = |items: &[Value]| -> Vec<String> {
        items
            .iter()
            .map(|t| t["referenceNumber"].as_str().expect("ref").to_owned())
            .collect()
    };
    assert_eq!(names(&list(&s, &acme, &all(T0, T0 + 9)).await), expected);
    for limit in [1, 2, 4] {
        let mut next = Some(format!(
            "/v1/transactions?{}&limit={limit}",
            all(T0, T0 + 9)
        ));
        let mut seen = Vec::new();
        while let Some(url) = next.take() {
            let r = s.get(&url, Some(&acme)).await;
            assert_eq!(r.status, 200, "{}", r.text());
            seen.extend(names(r.json().as_array().expect("array")));
            next = r
                .header("link")
                .map(|link| link[1..link.find('>').expect(">")].to_owned());
        }
        assert_eq!(seen, expected, "pages of {limit}");
    }
    // Within bounds: times 2 to 5 only.
    let middle: Vec<String> = ["m2", "m4", "m0", "m1", "m5"].map(String::from).to_vec();
    assert_eq!(names(&list(&s, &acme, &all(T0 + 2, T0 + 5)).await), middle);
    assert_eq!(
        names(&list(&s, &acme, &format!("{}&programId=bounded", all(T0, T0 + 9))).await),
        ["m7", "m4", "m1", "m3"]
    );
    assert_eq!(list(&s, &globex, &all(T0, T0 + 9)).await.len(), plan.len());
}

#[tokio::test]
async fn bad_listing_queries_are_400() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    for query in [
        "",
        "startDate=1795774500",
        "endDate=1795774500",
        "startDate=179577450&endDate=1795774500",
        "startDate=17957745000&endDate=17957745000",
        "startDate=1795774500&endDate=179577450a",
        "startDate=-795774500&endDate=1795774500",
        "startDate=1795774501&endDate=1795774500",
        "startDate=1795774500&endDate=1795774500&programId=",
        "startDate=1795774500&endDate=1795774500&limit=0",
        "startDate=1795774500&endDate=1795774500&limit=1001",
        "startDate=1795774500&endDate=1795774500&limit=x",
        "startDate=1795774500&endDate=1795774500&after=nonsense",
        "startDate=1795774500&endDate=1795774500&startDate=1795774500",
        "startDate=1795774500&endDate=1795774500&sort=desc",
    ] {
        s.get(&format!("/v1/transactions?{query}"), Some(&token))
            .await
            .problem(400);
    }
}

#[tokio::test]
async fn pages_follow_the_link_header_to_the_end() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    for i in 0..7u64 {
        s.clock.set(T0 + i / 3);
        assert_eq!(
            s.issue(&token, issue_body(&format!("p{i}"))).await.status,
            201
        );
    }
    let mut next = Some(format!("/v1/transactions?{}&limit=3", all(T0, T0 + 100)));
    let mut seen = Vec::new();
    let mut pages = 0;
    while let Some(url) = next.take() {
        let r = s.get(&url, Some(&token)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        pages += 1;
        for t in r.json().as_array().expect("array") {
            seen.push(t["referenceNumber"].as_str().expect("ref").to_owned());
        }
        next = r.header("link").map(|link| {
            assert!(link.ends_with(">; rel=\"next\""), "{link}");
            link[1..link.find('>').expect(">")].to_owned()
        });
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (0..7).map(|i| format!("p{i}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_large_listing_streams_every_transaction_once() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let mut tasks = Vec::new();
    for i in 0..600 {
        tasks.push(common::spawn_issue(
            s.addr,
            &token,
            issue_body(&format!("bulk-{i}")),
        ));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task").status, 201);
    }
    let r = s
        .get(
            &format!("/v1/transactions?{}", all(0, 9_999_999_999)),
            Some(&token),
        )
        .await;
    assert_eq!(
        r.header("transfer-encoding"),
        Some("chunked"),
        "streamed, not buffered"
    );
    let items = r.json();
    let refs: std::collections::HashSet<&str> = items
        .as_array()
        .expect("array")
        .iter()
        .map(|t| t["referenceNumber"].as_str().expect("ref"))
        .collect();
    assert_eq!(refs.len(), 600);
}

#[tokio::test]
async fn a_restart_keeps_transactions_and_tokens() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let created = s.issue(&token, issue_body("kept")).await.json();
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, |text| text).await;
    let got = s.get("/v1/transactions/kept", Some(&token)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["id"], created["id"]);
    // Ids keep naming their transactions (the id key is kept in the database).
    let id = created["id"].as_str().expect("id");
    let by_id = s.get(&format!("/v1/transactions/{id}"), Some(&token)).await;
    assert_eq!(by_id.json()["referenceNumber"], "kept");
    // New transactions still sort after the old ones.
    assert_eq!(
        s.issue(&token, issue_body("after-restart")).await.status,
        201
    );
    let refs: Vec<Value> = s.all_transactions(&token).await;
    assert_eq!(refs[0]["referenceNumber"], "kept");
    assert_eq!(refs[1]["referenceNumber"], "after-restart");
    // The new one took a number of its own: the counter read when the file is opened is
    // past the last transaction.
    let kept = s.get("/v1/transactions/kept", Some(&token)).await.json();
    assert_eq!(kept["id"], created["id"]);
    assert_ne!(refs[1]["id"], created["id"]);
}

/// A referenceNumber of the form of a transaction id would be shadowed by the id lookup
/// (GET by it could return another transaction): refused at issue time, nothing written.
#[tokio::test]
async fn a_reference_with_the_form_of_a_transaction_id_is_refused() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let first = s.issue(&token, issue_body("inv-1")).await;
    assert_eq!(first.status, 201, "{}", first.text());
    let id = first.json()["id"].as_str().expect("id").to_owned();
    // Another id of the same form: one character changed in the middle stays canonical.
    let mut other = id.clone().into_bytes();
    other[10] = if other[10] == b'A' { b'B' } else { b'A' };
    let other = String::from_utf8(other).expect("ascii");
    for reference in [id.as_str(), other.as_str()] {
        let detail = s.issue(&token, issue_body(reference)).await.problem(400);
        assert!(detail.contains("form of a transaction id"), "{detail}");
    }
    assert_eq!(s.all_transactions(&token).await.len(), 1);
    let found = s.get(&format!("/v1/transactions/{id}"), Some(&token)).await;
    assert_eq!(found.json()["referenceNumber"], "inv-1");
    // Near misses are ordinary references.
    for reference in ["tx_short", &format!("{id}x"), &format!("TX{}", &id[2..])] {
        let r = s.issue(&token, issue_body(reference)).await;
        assert_eq!(r.status, 201, "{reference}: {}", r.text());
    }
}

/// Such a reference stored by an earlier version (which accepted it) still replays.
#[tokio::test]
async fn an_id_shaped_reference_stored_earlier_still_replays() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let id = s.issue(&token, issue_body("inv-1")).await.json()["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let mut shaped = id.into_bytes();
    shaped[10] = if shaped[10] == b'A' { b'B' } else { b'A' };
    let shaped = String::from_utf8(shaped).expect("ascii");
    let body = issue_body(&shaped);
    let quote = s
        .post(
            "/v1/transactions/preview",
            Some(&token),
            &serde_json::json!({"programId": "skywards", "value": 3673}),
        )
        .await
        .json()["totalPoints"]
        .as_u64()
        .expect("points");
    // Written straight through the store, as release 0.1.0 would have accepted it.
    let stored = s
        .app
        .store
        .issue(cosmopoints::store::Issue {
            total_points: quote,
            ..common::store_issue(&shaped, None)
        })
        .await
        .expect("stored");
    assert!(matches!(stored, cosmopoints::store::Issued::Created(_)));
    let replay = s.issue(&token, body).await;
    assert_eq!(replay.status, 200, "{}", replay.text());
    assert_eq!(replay.json()["referenceNumber"], shaped);
}
