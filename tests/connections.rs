//! Program connections over real HTTP: create, update, list, filter, isolation, bad input.

mod common;

use common::{TestServer, T0};
use hyper::Method;
use serde_json::json;

fn link(program: &str, user: &str, member: &str) -> serde_json::Value {
    json!({"programId": program, "endUserId": user, "destinationUserId": member})
}

#[tokio::test]
async fn put_creates_then_updates_keeping_created_at() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let r = s
        .put(
            "/v1/program-connections",
            Some(&token),
            &link("skywards", "alice", "EK1"),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"endUserId": "alice", "programId": "skywards", "destinationUserId": "EK1",
               "createdAt": "2026-11-27T10:15:00Z", "updatedAt": "2026-11-27T10:15:00Z"})
    );
    s.clock.set(T0 + 60);
    // POST behaves as PUT.
    let r = s
        .post(
            "/v1/program-connections",
            Some(&token),
            &link("skywards", "alice", "EK2"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["destinationUserId"], "EK2");
    assert_eq!(r.json()["createdAt"], "2026-11-27T10:15:00Z");
    assert_eq!(r.json()["updatedAt"], "2026-11-27T10:16:00Z");
    let listed = s
        .get("/v1/program-connections?endUserId=alice", Some(&token))
        .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.json().as_array().expect("array").len(), 1);
    assert_eq!(listed.json()[0]["destinationUserId"], "EK2");
}

#[tokio::test]
async fn list_is_per_end_user_and_filters_by_program() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    for (program, user, member) in [
        ("skywards", "bob", "EK9"),
        ("bounded", "bob", "B-1"),
        ("skywards", "bobby", "EK7"),
        ("skywards", "bo", "EK5"),
    ] {
        let r = s
            .put(
                "/v1/program-connections",
                Some(&token),
                &link(program, user, member),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let bob = s
        .get("/v1/program-connections?endUserId=bob", Some(&token))
        .await
        .json();
    let programs: Vec<&str> = bob
        .as_array()
        .expect("array")
        .iter()
        .map(|c| c["programId"].as_str().expect("id"))
        .collect();
    assert_eq!(programs, ["bounded", "skywards"]);
    let only = s
        .get(
            "/v1/program-connections?endUserId=bob&programId=skywards",
            Some(&token),
        )
        .await
        .json();
    assert_eq!(only, json!([bob[1].clone()]));
    let none = s
        .get("/v1/program-connections?endUserId=nobody", Some(&token))
        .await;
    assert_eq!(none.json(), json!([]));
    let encoded = s
        .put(
            "/v1/program-connections",
            Some(&token),
            &link("skywards", "a b/c", "X"),
        )
        .await;
    assert_eq!(encoded.status, 201);
    let got = s
        .get("/v1/program-connections?endUserId=a+b%2Fc", Some(&token))
        .await
        .json();
    assert_eq!(got[0]["endUserId"], "a b/c");
}

#[tokio::test]
async fn businesses_never_see_each_others_connections() {
    let s = TestServer::start().await;
    let acme = s.acme().await;
    let globex = s.globex().await;
    assert_eq!(
        s.put(
            "/v1/program-connections",
            Some(&acme),
            &link("skywards", "carol", "A")
        )
        .await
        .status,
        201
    );
    assert_eq!(
        s.get("/v1/program-connections?endUserId=carol", Some(&globex))
            .await
            .json(),
        json!([])
    );
    // The same end user in another business is a separate connection.
    assert_eq!(
        s.put(
            "/v1/program-connections",
            Some(&globex),
            &link("skywards", "carol", "G")
        )
        .await
        .status,
        201
    );
    assert_eq!(
        s.get("/v1/program-connections?endUserId=carol", Some(&acme))
            .await
            .json()[0]["destinationUserId"],
        "A"
    );
}

#[tokio::test]
async fn bad_connection_input_is_rejected_and_changes_nothing() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let long = "x".repeat(129);
    for (body, field) in [
        (
            json!({"endUserId": "u", "destinationUserId": "d"}),
            "programId",
        ),
        (
            json!({"programId": "skywards", "destinationUserId": "d"}),
            "endUserId",
        ),
        (
            json!({"programId": "skywards", "endUserId": "u"}),
            "destinationUserId",
        ),
        (link("skywards", "", "d"), "endUserId"),
        (link("skywards", "u", &long), "destinationUserId"),
        (link("skywards", "u\u{1}", "d"), "endUserId"),
        (
            json!({"programId": "skywards", "endUserId": 5, "destinationUserId": "d"}),
            "endUserId",
        ),
        (
            json!({"programId": "skywards", "endUserId": "u", "destinationUserId": "d", "x": 1}),
            "x",
        ),
    ] {
        let detail = s
            .put("/v1/program-connections", Some(&token), &body)
            .await
            .problem(400);
        assert!(detail.contains(field), "{body}: {detail}");
    }
    s.put(
        "/v1/program-connections",
        Some(&token),
        &link("tiny", "u", "d"),
    )
    .await
    .problem(422);
    s.put("/v1/program-connections", None, &link("skywards", "u", "d"))
        .await
        .problem(401);
    let r = s
        .send(
            Method::PUT,
            "/v1/program-connections",
            Some(&token),
            Some(b"{}".to_vec()),
            &[("content-type", "text/plain")],
        )
        .await;
    r.problem(415);
    s.get("/v1/program-connections", Some(&token))
        .await
        .problem(400);
    s.get("/v1/program-connections?endUserId=", Some(&token))
        .await
        .problem(400);
    s.get(
        "/v1/program-connections?endUserId=u&programId=",
        Some(&token),
    )
    .await
    .problem(400);
    s.get("/v1/program-connections?endUserId=u&other=1", Some(&token))
        .await
        .problem(400);
    assert_eq!(
        s.get("/v1/program-connections?endUserId=u", Some(&token))
            .await
            .json(),
        json!([])
    );
}

#[tokio::test]
async fn points_can_be_issued_by_end_user_id_through_the_program_connection() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let body = |reference: &str| {
        json!({"programId": "skywards", "value": 3673, "endUserId": "shopper-9",
               "referenceNumber": reference})
    };
    // No connection yet: 422 with its own problem type; nothing stored.
    let r = s.issue(&token, body("eu-1")).await;
    let detail = r.problem(422);
    assert!(detail.contains("shopper-9"), "{detail}");
    assert_eq!(
        r.json()["type"],
        "urn:cosmopoints:problem:no-program-connection"
    );
    assert!(s.all_transactions(&token).await.is_empty());

    let connect = json!({"programId": "skywards", "endUserId": "shopper-9",
                         "destinationUserId": "EK-777"});
    assert_eq!(
        s.put("/v1/program-connections", Some(&token), &connect)
            .await
            .status,
        201
    );
    let r = s.issue(&token, body("eu-1")).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let tx = s
        .get(&format!("/v1/transactions/{id}"), Some(&token))
        .await
        .json();
    assert_eq!(tx["userId"], "EK-777", "the member id the connection names");
    assert_eq!(tx["endUserId"], "shopper-9", "the transaction keeps both");
    assert_eq!(tx["totalPoints"], 833);

    // The connection moves on; a replay still answers with the original transaction.
    let moved = json!({"programId": "skywards", "endUserId": "shopper-9",
                       "destinationUserId": "EK-778"});
    assert_eq!(
        s.put("/v1/program-connections", Some(&token), &moved)
            .await
            .status,
        200
    );
    let replay = s.issue(&token, body("eu-1")).await;
    assert_eq!(replay.status, 200, "{}", replay.text());
    assert_eq!(replay.json()["id"], id.as_str());
    // The same reference sent to a member id directly is another request.
    let other = s
        .issue(
            &token,
            json!({"programId": "skywards", "value": 3673, "userId": "EK-777",
                   "referenceNumber": "eu-1"}),
        )
        .await;
    assert!(other.problem(409).contains("userId"));

    // Exactly one of the two.
    let both = json!({"programId": "skywards", "value": 3673, "userId": "EK-1",
                      "endUserId": "shopper-9", "referenceNumber": "eu-2"});
    assert!(s
        .issue(&token, both)
        .await
        .problem(400)
        .contains("not both"));
    let neither = json!({"programId": "skywards", "value": 3673, "referenceNumber": "eu-3"});
    assert!(s
        .issue(&token, neither)
        .await
        .problem(400)
        .contains("endUserId"));

    // Another business's connection is not this business's.
    let globex = s.globex().await;
    let r = s.issue(&globex, body("eu-4")).await;
    r.problem(422);
}
