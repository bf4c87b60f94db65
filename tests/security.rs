//! What an attacker on the network, with no token or with one business's token, can try:
//! each test here is one finding of a security review, shown against the real server over
//! real TCP. The log-forging test runs the real binary (in binary.rs).

mod common;

use std::collections::HashSet;

use common::TestServer;
use serde_json::json;

#[tokio::test]
async fn request_ids_are_random_128_bit_hex() {
    let s = TestServer::start().await;
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let r = s.get("/healthz", None).await;
        let id = r.header("x-request-id").expect("an id").to_owned();
        assert_eq!(id.len(), 32, "{id}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{id}"
        );
        assert!(seen.insert(id), "an id came twice");
    }
    // Consecutive ids share no counter: no common prefix of half their length.
    let ids: Vec<&String> = seen.iter().collect();
    let shared = ids.windows(2).filter(|w| w[0][..16] == w[1][..16]).count();
    assert_eq!(shared, 0, "ids share a prefix: {ids:?}");
}

#[tokio::test]
async fn token_responses_are_not_cacheable() {
    let s = TestServer::start().await;
    let r = s
        .post(
            "/v1/auth",
            None,
            &json!({"clientId": "acme-pos", "clientSecret": "acme-secret"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("pragma"), Some("no-cache"));
}
