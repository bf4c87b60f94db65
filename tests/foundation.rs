//! The foundation over real HTTP: auth and tokens, profile, programs, currencies, health,
//! routing errors, body limits, request ids.

mod common;

use common::{TestServer, T0};
use hyper::Method;
use serde_json::json;

#[tokio::test]
async fn auth_returns_a_bearer_token_that_reads_the_profile() {
    let s = TestServer::start().await;
    let r = s
        .post(
            "/v1/auth",
            None,
            &json!({"clientId": "acme-pos", "clientSecret": "acme-secret"}),
        )
        .await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["expiresIn"], 600);
    assert_eq!(body["tokenType"], "Bearer");
    let token = body["accessToken"].as_str().expect("token");
    let profile = s.get("/v1/profile", Some(token)).await;
    assert_eq!(profile.status, 200);
    assert_eq!(
        profile.json(),
        json!({"name": "Acme Coffee", "programId": "acme-rewards", "currency": "AED",
               "currencyExponent": 2})
    );
    assert!(profile
        .header("x-request-id")
        .is_some_and(|id| !id.is_empty()));
}

#[tokio::test]
async fn wrong_id_and_wrong_secret_get_the_same_401() {
    let s = TestServer::start().await;
    let wrong_secret = s
        .post(
            "/v1/auth",
            None,
            &json!({"clientId": "acme-pos", "clientSecret": "nope"}),
        )
        .await;
    let wrong_id = s
        .post(
            "/v1/auth",
            None,
            &json!({"clientId": "nobody", "clientSecret": "acme-secret"}),
        )
        .await;
    assert_eq!(wrong_secret.problem(401), wrong_id.problem(401));
    assert_eq!(wrong_secret.json(), wrong_id.json());
    assert!(!wrong_secret.text().contains("acme-secret"));
}

#[tokio::test]
async fn auth_validates_its_body() {
    let s = TestServer::start().await;
    for (body, field) in [
        (json!({"clientSecret": "x"}), "clientId"),
        (json!({"clientId": "acme-pos"}), "clientSecret"),
        (json!({"clientId": 5, "clientSecret": "x"}), "clientId"),
        (
            json!({"clientId": "a", "clientSecret": "x", "extra": 1}),
            "extra",
        ),
    ] {
        let detail = s.post("/v1/auth", None, &body).await.problem(400);
        assert!(detail.contains(field), "{detail}");
    }
    let r = s
        .send(
            Method::POST,
            "/v1/auth",
            None,
            Some(b"{not json".to_vec()),
            &[("content-type", "application/json")],
        )
        .await;
    r.problem(400);
    let r = s
        .send(
            Method::POST,
            "/v1/auth",
            None,
            Some(b"{}".to_vec()),
            &[("content-type", "text/plain")],
        )
        .await;
    r.problem(415);
    let r = s
        .send(Method::POST, "/v1/auth", None, Some(b"{}".to_vec()), &[])
        .await;
    r.problem(415);
}

#[tokio::test]
async fn repeated_failures_get_429_per_client_and_per_address() {
    let s = TestServer::start().await;
    let bad = json!({"clientId": "acme-pos", "clientSecret": "wrong"});
    for _ in 0..5 {
        s.post("/v1/auth", None, &bad).await.problem(401);
    }
    let r = s.post("/v1/auth", None, &bad).await;
    r.problem(429);
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry));
    // The right secret does not get through a blocked client id either.
    s.post(
        "/v1/auth",
        None,
        &json!({"clientId": "acme-pos", "clientSecret": "acme-secret"}),
    )
    .await
    .problem(429);
    // The window slides: a minute later the client may try again.
    s.clock.set(T0 + 61);
    s.acme().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_guesses_cannot_slip_past_the_limit() {
    let s = TestServer::start().await;
    let guesses: Vec<_> = (0..40)
        .map(|i| {
            let addr = s.addr;
            tokio::spawn(async move {
                let body = json!({"clientId": "acme-pos", "clientSecret": format!("guess-{i}")});
                common::request(
                    addr,
                    Method::POST,
                    "/v1/auth",
                    None,
                    Some(body.to_string().into_bytes()),
                    &[("content-type", "application/json")],
                )
                .await
                .status
            })
        })
        .collect();
    let mut checked = 0;
    for guess in guesses {
        match guess.await.expect("task") {
            401 => checked += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    // The limit is 5 failures a minute, however many arrive at once.
    assert_eq!(checked, 5);
}

#[tokio::test]
async fn failures_from_one_address_do_not_hold_back_other_addresses() {
    let s = TestServer::start().await;
    let local: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
    let other: std::net::IpAddr = "127.0.0.2".parse().expect("ip");
    let attempt = |client: &str, secret: &str| {
        Some(
            json!({"clientId": client, "clientSecret": secret})
                .to_string()
                .into_bytes(),
        )
    };
    // Five different client ids guessed from one address: each pair is at its limit (5),
    // the address (100) is not, so the other clients there are not held back.
    for i in 0..5 {
        let r = common::request_from(
            local,
            s.addr,
            Method::POST,
            "/v1/auth",
            attempt(&format!("guess-{i}"), "x"),
        )
        .await;
        r.problem(401);
    }
    let r = common::request_from(
        local,
        s.addr,
        Method::POST,
        "/v1/auth",
        attempt("globex-pos", "globex-secret"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Another client from another address is not held back.
    let r = common::request_from(
        other,
        s.addr,
        Method::POST,
        "/v1/auth",
        attempt("globex-pos", "globex-secret"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn missing_malformed_expired_and_altered_tokens_get_401() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let r = s.get("/v1/profile", None).await;
    r.problem(401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    for bad in ["", "x", "Bearer", "not-base64!!", &token[..token.len() / 2]] {
        let r = s.get("/v1/profile", Some(bad)).await;
        r.problem(401);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    let r = s
        .send(
            Method::GET,
            "/v1/profile",
            None,
            None,
            &[("authorization", &format!("Basic {token}"))],
        )
        .await;
    r.problem(401);
    // Altered at the start, the middle and the end.
    for at in [0, token.len() / 2, token.len() - 1] {
        let mut chars: Vec<char> = token.chars().collect();
        chars[at] = if chars[at] == 'Q' { 'R' } else { 'Q' };
        let altered: String = chars.into_iter().collect();
        s.get("/v1/profile", Some(&altered)).await.problem(401);
    }
    // Valid until the last second of its lifetime, then expired.
    s.clock.set(T0 + 599);
    assert_eq!(s.get("/v1/profile", Some(&token)).await.status, 200);
    s.clock.set(T0 + 600);
    let detail = s.get("/v1/profile", Some(&token)).await.problem(401);
    assert!(detail.contains("expired"), "{detail}");
}

#[tokio::test]
async fn a_token_signed_with_another_key_is_rejected() {
    let a = TestServer::start().await;
    let b = TestServer::start().await;
    let foreign = b.acme().await;
    a.get("/v1/profile", Some(&foreign)).await.problem(401);
}

#[tokio::test]
async fn a_client_removed_from_the_config_loses_its_tokens() {
    let s = TestServer::start().await;
    let web = s.token("acme-web", "acme-web-secret").await;
    let pos = s.acme().await;
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, |text| {
        text.replace(
            "[[businesses.clients]]\nclient_id = \"acme-web\"\nsecret = \"acme-web-secret\"\n",
            "",
        )
    })
    .await;
    assert_eq!(
        s.get("/v1/profile", Some(&pos)).await.status,
        200,
        "the key is kept in the database"
    );
    let detail = s.get("/v1/profile", Some(&web)).await.problem(401);
    assert!(detail.contains("no longer exists"), "{detail}");
}

#[tokio::test]
async fn each_business_sees_only_its_own_profile() {
    let s = TestServer::start().await;
    let acme = s.acme().await;
    let globex = s.globex().await;
    assert_eq!(
        s.get("/v1/profile", Some(&acme)).await.json()["name"],
        "Acme Coffee"
    );
    assert_eq!(
        s.get("/v1/profile", Some(&globex)).await.json()["name"],
        "Globex Stores"
    );
}

#[tokio::test]
async fn programs_are_the_enabled_ones_with_exact_prices() {
    let s = TestServer::start().await;
    let acme = s.acme().await;
    let r = s.get("/v1/programs", Some(&acme)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!([
            {"id": "skywards", "name": "Skywards Miles", "pricePerPointInUsd": "0.012",
             "pricePerPoint": "0.04407", "currency": "AED",
             "minAmountOfPoints": 1, "maxAmountOfPoints": 1000000},
            {"id": "bounded", "name": "Bounded Rewards", "pricePerPointInUsd": "0.01",
             "pricePerPoint": "0.036725", "currency": "AED",
             "minAmountOfPoints": 100, "maxAmountOfPoints": 200},
        ])
    );
    let globex = s.globex().await;
    let programs = s.get("/v1/programs", Some(&globex)).await.json();
    assert_eq!(programs[0]["id"], "tiny");
    assert_eq!(programs[0]["pricePerPoint"], "0.007");
    assert_eq!(programs[0]["minAmountOfPoints"], 1);
    assert_eq!(programs[0]["maxAmountOfPoints"], serde_json::Value::Null);
}

#[tokio::test]
async fn currencies_are_sorted_codes() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    assert_eq!(
        s.get("/v1/currencies", Some(&token)).await.json(),
        json!(["AED", "SAR", "USD"])
    );
    s.get("/v1/currencies", None).await.problem(401);
}

/// A currency outside ISO 4217 gets its exponent from the config (BTC in satoshis); the
/// old string form keeps ISO's; the profile shows the exponent and the points follow it.
#[tokio::test]
async fn a_configured_exponent_is_shown_and_used_for_points() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("dir"));
    let s = TestServer::start_in(dir, |text| {
        text.replace(
            "SAR = \"3.75\"",
            "SAR = \"3.75\"\nBTC = { units_per_usd = \"0.00001\", exponent = 8 }\n\
             JPY = { units_per_usd = \"150\" }",
        )
        .replace("currency = \"USD\"", "currency = \"BTC\"")
    })
    .await;
    let globex = s.globex().await;
    let profile = s.get("/v1/profile", Some(&globex)).await.json();
    assert_eq!(profile["currency"], "BTC");
    assert_eq!(profile["currencyExponent"], 8);
    assert_eq!(
        s.get("/v1/currencies", Some(&globex)).await.json(),
        json!(["AED", "BTC", "JPY", "SAR", "USD"])
    );
    // 10,000 satoshis = 0.0001 BTC = 10 USD at 0.00001 BTC per USD; at tiny's 0.007 USD a
    // point, floor(10 / 0.007) = 1428.
    let r = s
        .post(
            "/v1/transactions/preview",
            Some(&globex),
            &json!({"programId": "tiny", "value": 10_000}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["totalPoints"], 1428);
    let acme = s.acme().await;
    assert_eq!(
        s.get("/v1/profile", Some(&acme)).await.json()["currencyExponent"],
        2
    );
}

#[tokio::test]
async fn health_needs_no_token() {
    let s = TestServer::start().await;
    let r = s.get("/healthz", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405_with_allow() {
    let s = TestServer::start().await;
    // `/` is the dashboard page (tests/dashboard.rs).
    for path in [
        "/index.html",
        "/v1",
        "/v2/profile",
        "/v1/profile/",
        "/v1/transactions/a/b",
        "/v1/nothing",
    ] {
        s.get(path, None).await.problem(404);
    }
    for (method, path, allow) in [
        (Method::DELETE, "/v1/profile", "GET, HEAD"),
        (Method::GET, "/v1/auth", "POST"),
        (Method::PUT, "/v1/transactions", "GET, HEAD, POST"),
        (Method::DELETE, "/v1/transactions/abc", "GET, HEAD"),
        (
            Method::DELETE,
            "/v1/program-connections",
            "GET, HEAD, POST, PUT",
        ),
        (Method::POST, "/healthz", "GET, HEAD"),
        (Method::POST, "/", "GET, HEAD"),
        (Method::POST, "/v1/currencies", "GET, HEAD"),
        (Method::POST, "/v1/programs", "GET, HEAD"),
    ] {
        let r = s.send(method, path, None, None, &[]).await;
        r.problem(405);
        assert_eq!(r.header("allow"), Some(allow), "{path}");
    }
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_gets_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start().await;
    let token = s.acme().await;
    let mut stream = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/transactions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let chunk = vec![b' '; 16 * 1024];
    for _ in 0..5 {
        let sent = async {
            stream
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            stream.write_all(&chunk).await?;
            stream.write_all(b"\r\n").await
        };
        if sent.await.is_err() {
            break; // The server may stop reading once it has refused the body.
        }
    }
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let big = format!("{{\"description\":\"{}\"}}", "x".repeat(70 * 1024));
    let r = s
        .send(
            Method::POST,
            "/v1/transactions",
            Some(&token),
            Some(big.into_bytes()),
            &[("content-type", "application/json")],
        )
        .await;
    r.problem(413);
}

#[tokio::test]
async fn a_client_request_id_is_echoed_and_ours_are_unique() {
    let s = TestServer::start().await;
    let r = s
        .send(
            Method::GET,
            "/healthz",
            None,
            None,
            &[("x-request-id", "trace-42")],
        )
        .await;
    assert_eq!(r.header("x-request-id"), Some("trace-42"));
    let a = s.get("/healthz", None).await;
    let b = s.get("/healthz", None).await;
    assert_ne!(a.header("x-request-id"), b.header("x-request-id"));
    let e = s.get("/nowhere", None).await;
    assert!(e.header("x-request-id").is_some());
}
