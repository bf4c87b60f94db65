//! Keeps `docs/openapi.json` honest: its operations are exactly the endpoint table in the
//! `//!` comment of `src/router.rs` (same methods, paths, query parameters and auth), and
//! the real server, started in-process, routes every documented operation and answers
//! 405 with the right `Allow` to every other method on a documented path.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const METHODS: &[&str] = &[
    "GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE",
];

/// One row of the router's endpoint table.
#[derive(Debug, Clone)]
struct Route {
    method: String,
    /// The path as written, without its query part, e.g. `/v1/transactions/{id or referenceNumber}`.
    path: String,
    /// Query parameter name → required?
    query: BTreeMap<String, bool>,
    /// The table's auth column: `no` or `bearer`.
    auth: String,
}

fn read(relative: &str) -> String {
    let path = format!("{}/{relative}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// `/v1/transactions/{id or referenceNumber}?x` → `/v1/transactions/{}`.
fn normalise(path: &str) -> String {
    let path = path.split('?').next().unwrap_or_default();
    path.split('/')
        .map(|s| {
            if s.starts_with('{') && s.ends_with('}') {
                "{}"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// `startDate&endDate[&programId]` → {startDate: required, endDate: required, programId: optional}.
fn parse_query(text: &str) -> BTreeMap<String, bool> {
    let mut params = BTreeMap::new();
    for (i, piece) in text.split('[').enumerate() {
        let required = i == 0;
        assert!(
            required || piece.ends_with(']'),
            "unbalanced brackets in query `{text}`"
        );
        for name in piece
            .trim_end_matches(']')
            .split('&')
            .filter(|n| !n.is_empty())
        {
            params.insert(name.to_owned(), required);
        }
    }
    params
}

/// The rows of the `| method | path | auth |` table in the router's module comment.
fn router_table() -> Vec<Route> {
    let source = read("src/router.rs");
    let mut routes = Vec::new();
    for line in source.lines().map_while(|l| l.strip_prefix("//!")) {
        let line = line.trim();
        if !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 3, "a table row has three cells: {line}");
        if cells[0] == "method" || cells[0].starts_with("---") {
            continue;
        }
        let (path, query) = cells[1].split_once('?').unwrap_or((cells[1], ""));
        for method in cells[0].split(',').map(str::trim) {
            assert!(
                METHODS.contains(&method),
                "unknown method {method:?} in: {line}"
            );
            routes.push(Route {
                method: method.to_owned(),
                path: path.to_owned(),
                query: parse_query(query),
                auth: cells[2].to_owned(),
            });
        }
    }
    assert!(
        routes.len() >= 12,
        "the router table looks truncated: {routes:?}"
    );
    routes
}

fn document() -> Value {
    serde_json::from_str(&read("docs/openapi.json")).expect("docs/openapi.json is valid JSON")
}

/// (METHOD, document path) → operation, for every operation in the document.
fn operations(doc: &Value) -> BTreeMap<(String, String), Value> {
    let paths = doc["paths"].as_object().expect("the document has `paths`");
    let mut ops = BTreeMap::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is an object");
        for (key, op) in item {
            let method = key.to_ascii_uppercase();
            if METHODS.contains(&method.as_str()) {
                ops.insert((method, path.clone()), op.clone());
            }
        }
    }
    ops
}

#[test]
fn the_document_lists_exactly_the_routes_of_the_router_table() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let table: BTreeSet<(String, String)> = router_table()
        .iter()
        .map(|r| (r.method.clone(), normalise(&r.path)))
        .collect();
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .keys()
        .map(|(m, p)| (m.clone(), normalise(p)))
        .collect();
    let missing: Vec<_> = table.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&table).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "routes of src/router.rs missing from docs/openapi.json: {missing:?}\n\
         operations of docs/openapi.json not in the table of src/router.rs: {extra:?}"
    );
}

#[test]
fn query_parameters_and_auth_match_the_router_table() {
    let doc = document();
    let ops = operations(&doc);
    let global_security = doc["security"].as_array().cloned().unwrap_or_default();
    assert!(
        !global_security.is_empty(),
        "the document has a global security requirement"
    );
    for route in router_table() {
        let (_, op) = ops
            .iter()
            .find(|((m, p), _)| *m == route.method && normalise(p) == normalise(&route.path))
            .unwrap_or_else(|| panic!("{} {} is not documented", route.method, route.path));
        let what = format!("{} {}", route.method, route.path);

        let documented: BTreeMap<String, bool> = op["parameters"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| {
                let name = p["name"]
                    .as_str()
                    .expect("a parameter has a name")
                    .to_owned();
                (name, p["required"].as_bool().unwrap_or(false))
            })
            .collect();
        assert_eq!(
            documented, route.query,
            "{what}: query parameters (name → required) differ between the document and the table"
        );

        let open = op["security"].as_array().is_some_and(Vec::is_empty);
        match route.auth.as_str() {
            "no" => assert!(
                open,
                "{what} needs no auth: document it with `security: []`"
            ),
            "bearer" => assert!(
                !open
                    && op
                        .get("security")
                        .is_none_or(|s| s.as_array() == Some(&global_security)),
                "{what} needs a bearer token: leave it under the global security"
            ),
            other => panic!("{what}: unknown auth column {other:?}"),
        }
        if route.auth == "bearer" {
            assert!(
                op["responses"].get("401").is_some(),
                "{what} documents its 401"
            );
        }
    }
}

#[test]
fn every_reference_in_the_document_resolves() {
    fn walk(doc: &Value, node: &Value, broken: &mut Vec<String>) {
        match node {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    let found = target
                        .strip_prefix('#')
                        .and_then(|pointer| doc.pointer(pointer));
                    if found.is_none() {
                        broken.push(target.clone());
                    }
                }
                map.values().for_each(|v| walk(doc, v, broken));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(doc, v, broken)),
            _ => {}
        }
    }
    let doc = document();
    let mut broken = Vec::new();
    walk(&doc, &doc, &mut broken);
    assert!(broken.is_empty(), "unresolved $refs: {broken:?}");
}

/// A response as read off the wire.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection, with no body and no credentials.
async fn request(addr: SocketAddr, method: &str, target: &str) -> Reply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {target}: no response within 10 s"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {target}: not an HTTP response: {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {target}: no status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// The real server on a free port, with its database in `dir`.
async fn start_server(dir: &std::path::Path) -> SocketAddr {
    let text = r#"
[server]
listen = "127.0.0.1:0"
[storage]
path = "data/openapi-test.redb"
[auth]
token_ttl_seconds = 600
[currencies]
USD = "1"
AED = "3.6725"
[[programs]]
id = "skywards"
name = "Skywards Miles"
price_per_point_usd = "0.012"
[[businesses]]
id = "demo"
name = "Demo Coffee"
program_id = "demo-rewards"
currency = "AED"
programs = ["skywards"]
[[businesses.clients]]
client_id = "demo-pos"
secret = "openapi-test-secret"
"#;
    let config = cosmopoints::config::Config::parse(text, dir).expect("the test config is valid");
    let app = cosmopoints::app::App::open(config, cosmopoints::clock::Clock::system())
        .unwrap_or_else(|e| panic!("cannot open the app: {e:?}"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(
        cosmopoints::service::Service::new(Arc::new(app)).run(listener, std::future::pending()),
    );
    addr
}

/// Whether `concrete` (no braces) is an instance of the document path `template`.
fn matches(template: &str, concrete: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let c: Vec<&str> = concrete.split('/').collect();
    t.len() == c.len()
        && t.iter()
            .zip(&c)
            .all(|(t, c)| (t.starts_with('{') && t.ends_with('}') && !c.is_empty()) || t == c)
}

/// A request target for a document path: every `{…}` becomes a sample segment.
fn instance(template: &str) -> String {
    template
        .split('/')
        .map(|s| {
            if s.starts_with('{') && s.ends_with('}') {
                "sample-1"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_routes_every_documented_operation_and_only_those_methods() {
    let doc = document();
    let ops = operations(&doc);
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = start_server(dir.path()).await;

    let served = request(addr, "GET", "/v1/openapi.json").await;
    assert_eq!(served.status, 200);
    let served: Value = serde_json::from_str(&served.body).expect("the served document is JSON");
    assert_eq!(
        served, doc,
        "the server serves docs/openapi.json as it is on disk"
    );

    let mut failures = Vec::new();
    for (method, path) in ops.keys() {
        let target = instance(path);
        let reply = request(addr, method, &target).await;
        if reply.status == 404 || reply.status == 405 {
            failures.push(format!(
                "{method} {target} (documented as {path}) got {}: {}",
                reply.status, reply.body
            ));
        }
        if reply.header("x-request-id").is_none() {
            failures.push(format!("{method} {target}: no x-request-id"));
        }
        if reply.status == 401 && reply.header("www-authenticate") != Some("Bearer") {
            failures.push(format!(
                "{method} {target}: 401 without WWW-Authenticate: Bearer"
            ));
        }
    }

    let paths: BTreeSet<&String> = ops.keys().map(|(_, p)| p).collect();
    for path in paths {
        let target = instance(path);
        // The methods that some documented operation serves at this very URL (GET
        // /v1/transactions/preview is the lookup of the referenceNumber "preview").
        let served: BTreeSet<&str> = ops
            .keys()
            .filter(|(_, p)| matches(p, &target))
            .map(|(m, _)| m.as_str())
            .collect();
        for method in METHODS.iter().filter(|m| !served.contains(*m)) {
            let reply = request(addr, method, &target).await;
            if reply.status != 405 {
                failures.push(format!(
                    "{method} {target} is not documented but got {}, not 405",
                    reply.status
                ));
                continue;
            }
            let allow: BTreeSet<&str> = reply
                .header("allow")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .collect();
            if allow != served {
                failures.push(format!(
                    "{method} {target}: Allow lists {allow:?}, the document has {served:?}"
                ));
            }
            if !reply
                .header("content-type")
                .is_some_and(|ct| ct.starts_with("application/problem+json"))
            {
                failures.push(format!("{method} {target}: the 405 is not problem+json"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_helpers_normalise_and_match_paths() {
    assert_eq!(
        normalise("/v1/transactions/{id or referenceNumber}"),
        normalise("/v1/transactions/{transactionId}")
    );
    assert_eq!(
        normalise("/v1/transactions?startDate&endDate[&programId]"),
        "/v1/transactions"
    );
    let q = parse_query("startDate&endDate[&programId][&limit]");
    assert_eq!(q.get("endDate"), Some(&true));
    assert_eq!(q.get("limit"), Some(&false));
    assert!(matches(
        "/v1/transactions/{transactionId}",
        "/v1/transactions/preview"
    ));
    assert!(!matches(
        "/v1/transactions/{transactionId}",
        "/v1/transactions"
    ));
}

/// (METHOD, normalised path) of every arm of the `match` in `router::dispatch` that names
/// its methods (the `(_, …)` arms are the 405s).
fn router_match_arms() -> BTreeSet<(String, String)> {
    let source = read("src/router.rs");
    let body = source
        .split("async fn dispatch(")
        .nth(1)
        .expect("router.rs has fn dispatch");
    let body = body.split("\n}\n").next().expect("fn dispatch ends");
    let mut arms = BTreeSet::new();
    for line in body.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("(&Method::") else {
            continue;
        };
        let (methods, rest) = rest
            .split_once(", [")
            .expect("an arm is (methods, [segments])");
        let segments = rest.split_once(']').expect("segments end with ]").0;
        let path: Vec<String> = segments
            .split(',')
            .map(str::trim)
            .map(
                |s| match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                    Some(literal) => literal.to_owned(),
                    None => "{}".to_owned(),
                },
            )
            .collect();
        let path = format!("/{}", path.join("/"));
        for method in methods.split('|') {
            let method = method.trim().trim_start_matches("&Method::");
            arms.insert((method.to_owned(), path.clone()));
        }
    }
    arms
}

#[test]
fn the_routers_match_is_its_endpoint_table() {
    let arms = router_match_arms();
    assert!(arms.len() >= 12, "the match looks misparsed: {arms:?}");
    let table: BTreeSet<(String, String)> = router_table()
        .into_iter()
        .map(|r| (r.method, normalise(&r.path)))
        .collect();
    let only_in_match: Vec<_> = arms.difference(&table).collect();
    let only_in_table: Vec<_> = table.difference(&arms).collect();
    assert!(
        only_in_match.is_empty() && only_in_table.is_empty(),
        "routes in the match but not the table: {only_in_match:?}; in the table but not the match: {only_in_table:?}"
    );
}
