//! Operations over real HTTP, the server in-process: the admin listener (metrics scraped
//! and parsed, readiness through shutdown, a backup that `check` passes), the CSV
//! listing against the JSON one, and the OAuth2 token endpoint with its shared throttle.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{issue_body, request, TestServer};
use hyper::Method;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// The test server with an admin listener of its own: (server, admin address).
async fn start() -> (TestServer, SocketAddr) {
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let text = common::config_text("db/cosmopoints.redb");
    let config = cosmopoints::config::Config::parse(&text, dir.path()).expect("valid");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let admin = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    let server = TestServer::start_with(dir, config, move |service| {
        service.admin(tokio::net::TcpListener::from_std(listener).expect("tokio listener"));
    })
    .await;
    (server, admin)
}

async fn admin_get(admin: SocketAddr, path: &str) -> common::Reply {
    request(admin, Method::GET, path, None, None, &[]).await
}

/// The samples of a Prometheus text page: `name{labels}` → value. Checks the format on the
/// way: every sample's family has `# HELP` and `# TYPE` lines before it.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut typed = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.push(rest.split(' ').next().expect("a name").to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let name = series.split('{').next().expect("name");
        assert!(
            typed.iter().any(|t| name.starts_with(t.as_str())),
            "{name} has no # TYPE line"
        );
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        samples.insert(series.to_owned(), value);
    }
    samples
}

async fn scrape(admin: SocketAddr) -> BTreeMap<String, f64> {
    let r = admin_get(admin, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
    parse_metrics(&r.text())
}

#[tokio::test]
async fn metrics_are_scraped_over_http_and_move_with_requests() {
    let (server, admin) = start().await;
    let before = scrape(admin).await;
    let families = [
        "cosmopoints_store_commits_total",
        "cosmopoints_store_write_queue_depth",
        "cosmopoints_store_listings_running",
        "cosmopoints_outbox_depth",
        "cosmopoints_outbox_oldest_pending_age_seconds",
        "cosmopoints_store_commit_batch_size_count",
        "cosmopoints_store_commit_duration_seconds_count",
    ];
    for family in families {
        assert!(before.contains_key(family), "{family} missing: {before:?}");
    }
    let token = server.acme().await;
    assert_eq!(server.get("/v1/profile", Some(&token)).await.status, 200);
    assert_eq!(server.get("/v1/profile", None).await.status, 401);
    assert_eq!(server.issue(&token, issue_body("m-1")).await.status, 201);
    assert_eq!(server.issue(&token, issue_body("m-2")).await.status, 201);
    assert_eq!(server.get("/nowhere", None).await.status, 404);
    // A batch counts its new transactions, by program: not a replay of an earlier issue,
    // not a repeat within the batch, not a conflict.
    let other_value = serde_json::json!({"programId": "skywards", "value": 9999, "userId": "user-1", "referenceNumber": "m-3"});
    let bounded = serde_json::json!({"programId": "bounded", "value": 551, "userId": "user-1", "referenceNumber": "m-5"});
    let items = serde_json::json!({"items": [
        issue_body("m-3"), issue_body("m-1"), issue_body("m-3"), other_value, bounded, issue_body("m-4"),
    ]});
    let r = server
        .post("/v1/transactions/batch", Some(&token), &items)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let statuses: Vec<u64> = r.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["status"].as_u64().expect("status"))
        .collect();
    assert_eq!(statuses, [201, 200, 200, 409, 201, 201]);
    let bounded_points = r.json()["results"][4]["transaction"]["totalPoints"]
        .as_f64()
        .expect("totalPoints");

    let after = scrape(admin).await;
    let get = |key: &str| after.get(key).copied().unwrap_or(0.0);
    assert_eq!(
        get("cosmopoints_http_requests_total{route=\"/v1/profile\",status=\"200\"}"),
        1.0
    );
    assert_eq!(
        get("cosmopoints_http_requests_total{route=\"/v1/profile\",status=\"401\"}"),
        1.0
    );
    assert_eq!(
        get("cosmopoints_http_requests_total{route=\"/v1/transactions\",status=\"201\"}"),
        2.0
    );
    // A path of no endpoint counts under "none", never under its raw path.
    assert_eq!(
        get("cosmopoints_http_requests_total{route=\"none\",status=\"404\"}"),
        1.0
    );
    assert!(!after.keys().any(|k| k.contains("/nowhere")));
    assert_eq!(
        get("cosmopoints_http_request_duration_seconds_count{route=\"/v1/transactions\"}"),
        2.0
    );
    assert!(
        get("cosmopoints_store_commits_total") >= before["cosmopoints_store_commits_total"] + 2.0
    );
    assert_eq!(
        get("cosmopoints_transactions_issued_total{program=\"skywards\",status=\"completed\"}"),
        4.0
    );
    assert_eq!(
        get("cosmopoints_points_issued_total{program=\"skywards\",status=\"completed\"}"),
        4.0 * 833.0
    );
    assert_eq!(
        get("cosmopoints_transactions_issued_total{program=\"bounded\",status=\"completed\"}"),
        1.0
    );
    assert_eq!(
        get("cosmopoints_points_issued_total{program=\"bounded\",status=\"completed\"}"),
        bounded_points
    );
    // The hook the delivery worker calls shows up as its own family.
    server.app.metrics.delivery_attempt("delivered");
    let again = scrape(admin).await;
    assert_eq!(
        again["cosmopoints_delivery_attempts_total{outcome=\"delivered\"}"],
        1.0
    );
    // Admin paths: 404 and 405 with Allow.
    assert_eq!(admin_get(admin, "/v1/profile").await.status, 404);
    let r = request(admin, Method::POST, "/metrics", None, None, &[]).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    server.stop().await;
}

#[tokio::test]
async fn readyz_is_200_while_serving_and_503_once_shutdown_began() {
    let (server, admin) = start().await;
    let r = admin_get(admin, "/readyz").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ready\n"));
    // A request whose body never comes keeps the API draining after shutdown begins,
    // while the admin listener still answers.
    let token = server.acme().await;
    let mut slow = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    slow.write_all(
        format!(
            "POST /v1/transactions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
             content-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(server.stop());
    let mut seen = None;
    for _ in 0..100 {
        match common::try_request(admin, Method::GET, "/readyz", None, None).await {
            Some(r) if r.status == 503 => {
                seen = Some(r.text());
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert_eq!(seen.as_deref(), Some("shutting down\n"));
    drop(slow);
    stopping.await.expect("stopped");
}

#[tokio::test]
async fn a_backup_over_http_is_a_database_that_check_passes() {
    let (server, admin) = start().await;
    let token = server.acme().await;
    for i in 0..300 {
        assert_eq!(
            server
                .issue(&token, issue_body(&format!("b-{i}")))
                .await
                .status,
            201
        );
    }
    let r = admin_get(admin, "/backup").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("x-cosmopoints-transactions"), Some("300"));
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    let out = server.dir.path().join("copy.redb");
    std::fs::write(&out, &r.body).expect("write");
    let report = cosmopoints::store::check_file(&out).expect("opens");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.transactions, 300);
    // No temporary file is left beside the database.
    let leftovers: Vec<_> = std::fs::read_dir(server.dir.path().join("db"))
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "cosmopoints.redb")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        request(admin, Method::HEAD, "/backup", None, None, &[])
            .await
            .status,
        405
    );
    server.stop().await;
}

/// Splits CSV text (RFC 4180) into rows of cells.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut cell)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => cell.push(c),
        }
    }
    assert!(cell.is_empty() && row.is_empty(), "the CSV ends mid-row");
    rows
}

/// What a JSON listing row shows in a CSV column, the formula guard applied.
fn csv_cell(tx: &Value, column: &str) -> String {
    let value = match column {
        "programId" => tx["partnership"]["destination"]["programId"].clone(),
        "programName" => tx["partnership"]["destination"]["name"].clone(),
        "partnerTransactionId" => tx["delivery"]["partnerTransactionId"].clone(),
        other => tx[other].clone(),
    };
    let text = match value {
        Value::Null => String::new(),
        Value::String(s) => s,
        other => other.to_string(),
    };
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text
    }
}

#[tokio::test]
async fn the_csv_listing_matches_the_json_listing_row_for_row() {
    let server = TestServer::start().await;
    let token = server.acme().await;
    let descriptions = [
        Some("=HYPERLINK(\"http://evil\",\"click\")"),
        Some("plain, with a comma and \"quotes\"\nand a line break"),
        Some("@SUM(1)"),
        None,
        Some("-2+3"),
    ];
    for (i, d) in descriptions.iter().enumerate() {
        let mut body = issue_body(&format!("+ref-{i}"));
        if let Some(d) = d {
            body["description"] = Value::from(*d);
        }
        assert_eq!(server.issue(&token, body).await.status, 201);
    }
    let path = "/v1/transactions?startDate=0000000000&endDate=9999999999";
    let json = server.all_transactions(&token).await;
    let r = server
        .send(
            Method::GET,
            path,
            Some(&token),
            None,
            &[("accept", "text/csv")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("text/csv; charset=utf-8; header=present")
    );
    assert_eq!(r.header("vary"), Some("accept"));
    assert!(r.text().ends_with("\r\n"));
    let rows = parse_csv(&r.text());
    let header = &rows[0];
    assert_eq!(header, &cosmopoints::csv::COLUMNS.to_vec());
    assert_eq!(rows.len() - 1, json.len());
    for (row, tx) in rows[1..].iter().zip(&json) {
        for (column, cell) in header.iter().zip(row) {
            assert_eq!(cell, &csv_cell(tx, column), "{column} of {tx}");
        }
    }
    assert_eq!(rows[1][13], "'=HYPERLINK(\"http://evil\",\"click\")");
    assert_eq!(rows[1][1], "'+ref-0");

    // Paged: a CSV page with its header and the same Link as JSON.
    let paged = format!("{path}&limit=2");
    let csv_page = server
        .send(
            Method::GET,
            &paged,
            Some(&token),
            None,
            &[("accept", "text/csv")],
        )
        .await;
    let json_page = server.get(&paged, Some(&token)).await;
    assert_eq!(csv_page.status, 200);
    let page_rows = parse_csv(&csv_page.text());
    assert_eq!(page_rows.len(), 3);
    assert_eq!(page_rows[1..], rows[1..3]);
    let link = |r: &common::Reply| {
        r.header("link")
            .map(|l| l.split("after=").next().map(str::to_owned))
    };
    assert!(csv_page.header("link").is_some());
    assert_eq!(link(&csv_page), link(&json_page));
    // An empty range is just the header; JSON stays the default.
    let empty = server
        .send(
            Method::GET,
            "/v1/transactions?startDate=0000000001&endDate=0000000002",
            Some(&token),
            None,
            &[("accept", "text/csv")],
        )
        .await;
    assert_eq!(parse_csv(&empty.text()).len(), 1);
    let json_default = server
        .send(
            Method::GET,
            path,
            Some(&token),
            None,
            &[("accept", "text/html")],
        )
        .await;
    assert_eq!(
        json_default.header("content-type"),
        Some("application/json")
    );
    server.stop().await;
}

fn basic(id: &str, secret: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

async fn token_request(
    server: &TestServer,
    authorization: Option<&str>,
    form: &str,
) -> common::Reply {
    let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
    if let Some(a) = authorization {
        headers.push(("authorization", a));
    }
    server
        .send(
            Method::POST,
            "/v1/oauth/token",
            None,
            Some(form.as_bytes().to_vec()),
            &headers,
        )
        .await
}

/// Asserts an RFC 6749 §5.2 error answer and returns its headers' challenge.
fn oauth_error(r: &common::Reply, status: u16, code: &str) -> Option<String> {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("pragma"), Some("no-cache"));
    let body = r.json();
    assert_eq!(body["error"], code, "{body}");
    assert!(body["error_description"]
        .as_str()
        .is_some_and(|d| !d.is_empty()));
    r.header("www-authenticate").map(str::to_owned)
}

#[tokio::test]
async fn oauth2_client_credentials_with_basic_or_form_credentials() {
    let server = TestServer::start().await;
    let grant = "grant_type=client_credentials";
    for (authorization, form) in [
        (Some(basic("acme-pos", "acme-secret")), grant.to_owned()),
        (
            None,
            format!("{grant}&client_id=acme-pos&client_secret=acme-secret"),
        ),
    ] {
        let r = token_request(&server, authorization.as_deref(), &form).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(r.header("pragma"), Some("no-cache"));
        let body = r.json();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 600);
        let token = body["access_token"].as_str().expect("a token");
        let profile = server.get("/v1/profile", Some(token)).await;
        assert_eq!(profile.json()["name"], "Acme Coffee");
    }

    let wrong = token_request(&server, Some(&basic("acme-pos", "nope")), grant).await;
    assert_eq!(
        oauth_error(&wrong, 401, "invalid_client").as_deref(),
        Some("Basic realm=\"cosmopoints\", charset=\"UTF-8\"")
    );
    let wrong_form = token_request(
        &server,
        None,
        &format!("{grant}&client_id=acme-pos&client_secret=nope"),
    )
    .await;
    assert!(oauth_error(&wrong_form, 401, "invalid_client").is_some());
    let r = token_request(
        &server,
        Some(&basic("acme-pos", "acme-secret")),
        "grant_type=password",
    )
    .await;
    oauth_error(&r, 400, "unsupported_grant_type");
    let r = token_request(
        &server,
        Some(&basic("acme-pos", "acme-secret")),
        &format!("{grant}&client_id=acme-pos&client_secret=acme-secret"),
    )
    .await;
    oauth_error(&r, 400, "invalid_request");
    let r = server
        .send(
            Method::POST,
            "/v1/oauth/token",
            None,
            Some(b"{\"grant_type\":\"client_credentials\"}".to_vec()),
            &[("content-type", "application/json")],
        )
        .await;
    oauth_error(&r, 400, "invalid_request");
    let r = server.get("/v1/oauth/token", None).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    server.stop().await;
}

#[tokio::test]
async fn oauth2_failures_share_the_login_throttle_with_v1_auth() {
    let server = TestServer::start().await;
    // The test config allows 5 failures per (client, address) in the window.
    for _ in 0..3 {
        let r = token_request(
            &server,
            Some(&basic("acme-pos", "nope")),
            "grant_type=client_credentials",
        )
        .await;
        oauth_error(&r, 401, "invalid_client");
    }
    for _ in 0..2 {
        let r = server
            .post(
                "/v1/auth",
                None,
                &serde_json::json!({"clientId": "acme-pos", "clientSecret": "nope"}),
            )
            .await;
        r.problem(401);
    }
    // Over the limit: 429 as everywhere (problem+json, Retry-After), even with the right
    // secret, on both endpoints.
    let r = token_request(
        &server,
        Some(&basic("acme-pos", "acme-secret")),
        "grant_type=client_credentials",
    )
    .await;
    r.problem(429);
    assert!(r.header("retry-after").is_some());
    let r = server
        .post(
            "/v1/auth",
            None,
            &serde_json::json!({"clientId": "acme-pos", "clientSecret": "acme-secret"}),
        )
        .await;
    r.problem(429);
    server.stop().await;
}
