//! What an attacker on the network, with no token or with one business's token, can try:
//! each test here is one finding of a security review, shown against the real server over
//! real TCP. The log-forging test runs the real binary (in binary.rs).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::TestServer;
use hyper::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Sends `text` as is on a fresh connection and reads until the server closes it.
async fn raw(addr: std::net::SocketAddr, text: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(text.as_bytes()).await.expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply))
        .await
        .expect("the server closes the connection")
        .expect("read");
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test]
async fn http_1_1_without_exactly_one_host_is_400() {
    let s = TestServer::start().await;
    for head in [
        "GET /healthz HTTP/1.1\r\nconnection: close\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n",
        "GET /healthz HTTP/1.0\r\nhost: a\r\nhost: b\r\n\r\n",
    ] {
        let reply = raw(s.addr, head).await;
        assert_eq!(reply.get(8..13), Some(" 400 "), "{head:?}: {reply}");
        assert!(reply.contains("application/problem+json"), "{reply}");
        assert!(reply.contains("Host"), "{reply}");
    }
    // HTTP/1.0 has no Host requirement.
    let reply = raw(s.addr, "GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
}

#[tokio::test]
async fn two_authorization_headers_are_400() {
    let s = TestServer::start().await;
    let acme = s.acme().await;
    let globex = s.globex().await;
    for second in [&acme, &globex] {
        let r = s
            .send(
                Method::GET,
                "/v1/profile",
                Some(&acme),
                None,
                &[("authorization", &format!("Bearer {second}"))],
            )
            .await;
        let detail = r.problem(400);
        assert!(detail.contains("Authorization"), "{detail}");
    }
    // The same on a public route: the header is refused, not ignored.
    s.send(
        Method::GET,
        "/healthz",
        None,
        None,
        &[("authorization", "Bearer a"), ("authorization", "Bearer b")],
    )
    .await
    .problem(400);
}

#[tokio::test]
async fn encoded_request_bodies_are_415() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let body = common::issue_body("encoded").to_string().into_bytes();
    for encoding in ["gzip", "br", "identity, gzip", "x-unknown"] {
        let r = s
            .send(
                Method::POST,
                "/v1/transactions",
                Some(&token),
                Some(body.clone()),
                &[
                    ("content-type", "application/json"),
                    ("content-encoding", encoding),
                ],
            )
            .await;
        let detail = r.problem(415);
        assert!(detail.contains("Content-Encoding"), "{encoding}: {detail}");
    }
    // Nothing was stored; identity is no encoding at all.
    assert_eq!(s.all_transactions(&token).await.len(), 0);
    let r = s
        .send(
            Method::POST,
            "/v1/transactions",
            Some(&token),
            Some(body),
            &[
                ("content-type", "application/json"),
                ("content-encoding", "identity"),
            ],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
}

#[tokio::test]
async fn head_is_served_wherever_get_is() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    assert_eq!(
        s.issue(&token, common::issue_body("head-1")).await.status,
        201
    );
    for path in [
        "/healthz",
        "/v1/openapi.json",
        "/v1/profile",
        "/v1/programs",
        "/v1/currencies",
        "/v1/transactions?startDate=0000000000&endDate=9999999999&limit=5",
        "/v1/transactions/head-1",
        "/v1/program-connections?endUserId=u",
    ] {
        let get = s.get(path, Some(&token)).await;
        let head = s.send(Method::HEAD, path, Some(&token), None, &[]).await;
        assert_eq!(get.status, 200, "{path}: {}", get.text());
        assert_eq!(head.status, 200, "{path}: {}", head.text());
        assert!(head.body.is_empty(), "{path}");
        for name in ["content-type", "content-length"] {
            assert_eq!(head.header(name), get.header(name), "{path}: {name}");
        }
    }
    // Without a token HEAD gets the same 401 as GET (headers only).
    let head = s.send(Method::HEAD, "/v1/profile", None, None, &[]).await;
    assert_eq!(head.status, 401);
    assert_eq!(head.header("www-authenticate"), Some("Bearer"));
}

/// The `after` cursor of a reply's `Link` header.
fn next_cursor(r: &common::Reply) -> String {
    let link = r.header("link").expect("a Link header");
    let at = link.find("&after=").expect("an after parameter") + "&after=".len();
    link[at..link.find('>').expect(">")].to_owned()
}

#[tokio::test]
async fn listing_cursors_are_opaque_and_bound_to_the_business() {
    let s = TestServer::start().await;
    let acme = s.acme().await;
    let globex = s.globex().await;
    let globex_tx = serde_json::json!({
        "programId": "tiny", "value": 500, "userId": "u", "referenceNumber": "g-0"});
    for i in 0..3 {
        let r = s.issue(&acme, common::issue_body(&format!("a-{i}"))).await;
        assert_eq!(r.status, 201);
        // Other tenants' traffic in between: what old cursors leaked.
        for j in 0..i * 5 {
            let mut body = globex_tx.clone();
            body["referenceNumber"] = json!(format!("g-{i}-{j}"));
            assert_eq!(s.issue(&globex, body).await.status, 201);
        }
    }
    let page = "/v1/transactions?startDate=0000000000&endDate=9999999999&limit=1";
    let first = s.get(page, Some(&acme)).await;
    assert_eq!(first.status, 200);
    let c1 = next_cursor(&first);
    let second = s.get(&format!("{page}&after={c1}"), Some(&acme)).await;
    assert_eq!(second.json()[0]["referenceNumber"], "a-1");
    let c2 = next_cursor(&second);
    let third = s.get(&format!("{page}&after={c2}"), Some(&acme)).await;
    assert_eq!(third.json()[0]["referenceNumber"], "a-2");

    // Nothing in a cursor is a plain time or sequence number.
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    for cursor in [&c1, &c2] {
        let bytes = engine.decode(cursor).expect("base64url");
        let created = common::T0.to_be_bytes();
        assert!(
            !bytes.windows(8).any(|w| w == created),
            "the cursor shows its time: {cursor}"
        );
        assert_ne!(bytes.len(), 16, "the cursor is the plain position");
    }

    // Another business's cursor, a forged one and an altered one are 400, not a listing.
    let other = s.get(&format!("{page}&after={c1}"), Some(&globex)).await;
    let detail = other.problem(400);
    assert!(detail.contains("after"), "{detail}");
    let mut forged = [0u8; 16];
    forged[..8].copy_from_slice(&common::T0.to_be_bytes());
    forged[8..].copy_from_slice(&1u64.to_be_bytes());
    let mut altered = c2.clone().into_bytes();
    altered[30] = if altered[30] == b'A' { b'B' } else { b'A' };
    for cursor in [
        engine.encode(forged),
        String::from_utf8(altered).expect("ascii"),
        format!("{c1}A"),
    ] {
        s.get(&format!("{page}&after={cursor}"), Some(&acme))
            .await
            .problem(400);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_any_response_loses_its_connection() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("dir"));
    let s = TestServer::start_in(dir, |text| {
        text.replace(
            "[server]\n",
            "[server]\nsend_timeout_seconds = 1\nmax_connections = 1\n",
        )
    })
    .await;
    // The one connection slot goes to a client that asks for the API document (a plain,
    // whole response) two hundred times over and never reads a byte: far more than the
    // socket buffers on the way hold.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let mut hog = socket.connect(s.addr).await.expect("connect");
    let ask = "GET /v1/openapi.json HTTP/1.1\r\nhost: x\r\n\r\n".repeat(200);
    hog.write_all(ask.as_bytes()).await.expect("requests");
    // Everyone else waits for that slot: it frees up once the server gives up on the
    // reader (the bound here is for liveness only, far above the send timeout).
    let r = tokio::time::timeout(Duration::from_secs(60), s.get("/healthz", None))
        .await
        .expect("another client is served once the stalled one is cut off");
    assert_eq!(r.status, 200);
    // The reader finds its connection closed, with fewer than all the answers.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), hog.read_to_end(&mut got))
        .await
        .expect("the stalled connection is closed");
    let answers = got.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
    assert!(answers < 200, "all {answers} answers arrived");
}

/// Starts a server whose `[auth]` login limits (and any `[server]` lines) are as given.
async fn start_with(auth: &str, server: &str) -> TestServer {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("dir"));
    let (auth, server) = (auth.to_owned(), server.to_owned());
    TestServer::start_in(dir, move |text| {
        text.replace(
            "max_failed_attempts = 5\nfailed_attempts_window_seconds = 60\n",
            &auth,
        )
        .replace("[server]\n", &format!("[server]\n{server}"))
    })
    .await
}

/// A login attempt from the local address `from` (127.x.y.z), with extra headers.
async fn login_from(
    s: &TestServer,
    from: &str,
    client: &str,
    secret: &str,
    headers: &[(&str, &str)],
) -> u16 {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let body = json!({"clientId": client, "clientSecret": secret});
    common::request_from_with(
        from.parse().expect("an address"),
        s.addr,
        Method::POST,
        "/v1/auth",
        Some(body.to_string().into_bytes()),
        &all,
    )
    .await
    .status
}

#[tokio::test]
async fn guesses_from_one_place_lock_out_neither_the_client_elsewhere_nor_its_neighbours() {
    // The old keys still work: max_failed_attempts is the per (client, address) limit.
    let s = start_with(
        "max_failed_attempts = 5\nfailed_attempts_window_seconds = 60\n",
        "",
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            login_from(&s, "127.0.0.2", "acme-pos", "wrong", &[]).await,
            401
        );
    }
    // That pair is blocked, the right secret included, so a guesser learns nothing.
    assert_eq!(
        login_from(&s, "127.0.0.2", "acme-pos", "wrong", &[]).await,
        429
    );
    assert_eq!(
        login_from(&s, "127.0.0.2", "acme-pos", "acme-secret", &[]).await,
        429
    );
    // The same client elsewhere is not locked out...
    assert_eq!(
        login_from(&s, "127.0.0.3", "acme-pos", "acme-secret", &[]).await,
        200
    );
    // ...nor are the other clients behind the guessing address.
    assert_eq!(
        login_from(&s, "127.0.0.2", "acme-web", "acme-web-secret", &[]).await,
        200
    );
    assert_eq!(
        login_from(&s, "127.0.0.2", "globex-pos", "wrong", &[]).await,
        401
    );
}

#[tokio::test]
async fn an_address_and_a_client_id_each_have_a_higher_limit_of_their_own() {
    let s = start_with(
        "failed_logins_per_client_and_address = 4\nfailed_logins_per_address = 8\n\
         failed_logins_per_client = 12\nfailed_logins_window_seconds = 60\n",
        "",
    )
    .await;
    // Eight failures from one address, four per client id: the address is now at its limit.
    for client in ["acme-pos", "globex-pos"] {
        for _ in 0..4 {
            assert_eq!(login_from(&s, "127.0.0.5", client, "wrong", &[]).await, 401);
        }
    }
    assert_eq!(
        login_from(&s, "127.0.0.5", "acme-web", "acme-web-secret", &[]).await,
        429
    );
    assert_eq!(
        login_from(&s, "127.0.0.6", "acme-web", "acme-web-secret", &[]).await,
        200
    );
    // Twelve failures of one client id across three addresses: it is at its limit
    // everywhere, while other client ids are not.
    for from in ["127.0.0.6", "127.0.0.7"] {
        for _ in 0..4 {
            assert_eq!(login_from(&s, from, "acme-pos", "wrong", &[]).await, 401);
        }
    }
    assert_eq!(
        login_from(&s, "127.0.0.8", "acme-pos", "acme-secret", &[]).await,
        429
    );
    assert_eq!(
        login_from(&s, "127.0.0.8", "acme-web", "acme-web-secret", &[]).await,
        200
    );
    // The window slides: a minute later all is forgiven.
    s.clock.set(common::T0 + 61);
    assert_eq!(
        login_from(&s, "127.0.0.5", "acme-pos", "acme-secret", &[]).await,
        200
    );
}

#[tokio::test]
async fn x_forwarded_for_counts_only_from_trusted_proxies() {
    let s = start_with(
        "failed_logins_per_client_and_address = 3\n",
        "trusted_proxies = [\"127.0.0.1/32\", \"10.0.0.0/8\"]\n",
    )
    .await;
    let behind = |address: &'static str| [("x-forwarded-for", address)];
    for _ in 0..3 {
        let status = login_from(&s, "127.0.0.1", "acme-pos", "x", &behind("203.0.113.7")).await;
        assert_eq!(status, 401);
    }
    // The proxy's own address is not blocked: the client behind it is.
    let client = "203.0.113.7";
    assert_eq!(
        login_from(&s, "127.0.0.1", "acme-pos", "x", &behind(client)).await,
        429
    );
    // Trusted hops on the right are skipped; the first untrusted one is the client.
    let via = behind("203.0.113.7, 10.1.2.3");
    assert_eq!(
        login_from(&s, "127.0.0.1", "acme-pos", "x", &via).await,
        429
    );
    let other = behind("198.51.100.1, 203.0.113.8");
    assert_eq!(
        login_from(&s, "127.0.0.1", "acme-pos", "acme-secret", &other).await,
        200
    );
    // A trusted proxy that forwards nonsense gets a clear 400.
    let garbage = behind("not-an-address");
    let r = common::request_from_with(
        "127.0.0.1".parse().expect("ip"),
        s.addr,
        Method::POST,
        "/v1/auth",
        Some(
            json!({"clientId": "acme-pos", "clientSecret": "x"})
                .to_string()
                .into_bytes(),
        ),
        &[("content-type", "application/json"), garbage[0]],
    )
    .await;
    assert!(r.problem(400).contains("X-Forwarded-For"));
    // From anyone else the header is ignored: a guesser cannot pick a fresh address.
    for i in 0..3 {
        let fresh = format!("192.0.2.{i}");
        let headers = [("x-forwarded-for", fresh.as_str())];
        assert_eq!(
            login_from(&s, "127.0.0.9", "acme-pos", "x", &headers).await,
            401
        );
    }
    let fresh = behind("192.0.2.99");
    assert_eq!(
        login_from(&s, "127.0.0.9", "acme-pos", "x", &fresh).await,
        429
    );
}

#[test]
fn login_limit_keys_old_and_new_are_checked_by_name() {
    let dir = tempfile::tempdir().expect("dir");
    let base = common::config_text("db.redb");
    let parse = |text: String| cosmopoints::config::Config::parse(&text, dir.path());
    let config = parse(base.clone()).expect("the old keys are accepted");
    let limits = config.auth.failed_logins;
    assert_eq!(
        (
            limits.per_client_and_address,
            limits.per_address,
            limits.per_client
        ),
        (5, 100, 1000)
    );
    assert_eq!(limits.window.as_secs(), 60);
    for (edit, key) in [
        (
            base.replace(
                "[auth]\n",
                "[auth]\nfailed_logins_per_client_and_address = 3\n",
            ),
            "auth.max_failed_attempts",
        ),
        (
            base.replace("[auth]\n", "[auth]\nfailed_logins_window_seconds = 30\n"),
            "auth.failed_attempts_window_seconds",
        ),
        (
            base.replace("max_failed_attempts = 5", "max_failed_attempts = 0"),
            "auth.max_failed_attempts",
        ),
        (
            base.replace("[auth]\n", "[auth]\nfailed_logins_per_address = 0\n"),
            "auth.failed_logins_per_address",
        ),
        (
            base.replace(
                "[server]\n",
                "[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
            ),
            "server.trusted_proxies[0]",
        ),
        (
            base.replace(
                "[server]\n",
                "[server]\ntrusted_proxies = [\"::1/128\", \"proxy\"]\n",
            ),
            "server.trusted_proxies[1]",
        ),
    ] {
        let e = parse(edit)
            .err()
            .unwrap_or_else(|| panic!("{key}: accepted"));
        assert_eq!(e.key, key, "{e}");
    }
}

#[tokio::test]
async fn oversized_heads_get_the_documented_bare_414_and_431() {
    let s = TestServer::start().await;
    let long = format!(
        "GET /v1/transactions/{} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(70_000)
    );
    let many: String = (0..1000).map(|i| format!("x-h{i}: v\r\n")).collect();
    let many = format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{many}\r\n");
    for (head, status) in [(long, "414"), (many, "431")] {
        let mut stream = TcpStream::connect(s.addr).await.expect("connect");
        let _ = stream.write_all(head.as_bytes()).await;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => reply.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with(&format!("HTTP/1.1 {status}")), "{reply}");
    }
    // The HTTP layer answers these before the server sees the request: they are the
    // documented exceptions to problem+json, in API.md and on every operation.
    let read = |path: &str| {
        std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).expect(path)
    };
    let api = read("docs/API.md");
    for row in ["| 414 |", "| 431 |"] {
        assert!(api.contains(row), "docs/API.md does not list {row}");
    }
    let doc: serde_json::Value = serde_json::from_str(&read("docs/openapi.json")).expect("JSON");
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            for status in ["414", "431"] {
                let target = op["responses"][status]["$ref"].as_str();
                let response = target
                    .and_then(|t| doc.pointer(t.trim_start_matches('#')))
                    .unwrap_or_else(|| panic!("{method} {path} does not list {status}"));
                assert!(response.get("content").is_none(), "{status} has no body");
            }
        }
    }
}
