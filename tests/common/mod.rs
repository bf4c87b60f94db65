//! Shared test harness: the real server in-process on port 0 with a hand-set clock, a real
//! redb file in a temp dir, and a small HTTP/1.1 client over a real TCP connection.
#![allow(dead_code)]

pub mod partner;
pub mod pg;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use cosmopoints::app::App;
use cosmopoints::clock::Clock;
use cosmopoints::config::Config;

/// The time tests start at: 2026-11-27T10:15:00Z.
pub const T0: u64 = 1_795_774_500;

/// Two businesses with plain secrets (fast to check) and three programs.
pub fn config_text(storage: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[storage]
path = "{storage}"
[auth]
token_ttl_seconds = 600
max_failed_attempts = 5
failed_attempts_window_seconds = 60
[currencies]
USD = "1"
AED = "3.6725"
SAR = "3.75"
[[programs]]
id = "skywards"
name = "Skywards Miles"
price_per_point_usd = "0.012"
min_points = 1
max_points = 1000000
[[programs]]
id = "tiny"
name = "Tiny Points"
price_per_point_usd = "0.007"
[[programs]]
id = "bounded"
name = "Bounded Rewards"
price_per_point_usd = "0.01"
min_points = 100
max_points = 200
[[businesses]]
id = "acme"
name = "Acme Coffee"
program_id = "acme-rewards"
currency = "AED"
programs = ["skywards", "bounded"]
[[businesses.clients]]
client_id = "acme-pos"
secret = "acme-secret"
[[businesses.clients]]
client_id = "acme-web"
secret = "acme-web-secret"
[[businesses]]
id = "globex"
name = "Globex Stores"
program_id = "globex-points"
currency = "USD"
programs = ["tiny", "skywards"]
[[businesses.clients]]
client_id = "globex-pos"
secret = "globex-secret"
"#
    )
}

/// The config `text` on the backend the suites run against (see [`pg::enabled`]): as it
/// is for redb; for Postgres its redb `[storage]` section becomes the database of `dir`.
pub fn on_backend(text: String, dir: &std::path::Path) -> String {
    if !pg::enabled() {
        return text;
    }
    let redb = "[storage]\npath = \"db/cosmopoints.redb\"\n";
    if !text.contains(redb) {
        return text;
    }
    text.replace(redb, &pg::storage_section(&pg::database_for(dir)))
}

/// The test config with `partner` (lines of a `[programs.partner]` table) for `skywards`
/// when not empty, and `acme_extra` appended to acme's business entry (webhooks).
pub async fn server_with_partner(partner: &str, acme_extra: &str) -> TestServer {
    let dir = Arc::new(tempfile::tempdir().expect("dir"));
    let (partner, acme_extra) = (partner.to_owned(), acme_extra.to_owned());
    TestServer::start_in(dir, move |text| {
        let text = if partner.is_empty() {
            text
        } else {
            text.replace(
                "max_points = 1000000\n",
                &format!("max_points = 1000000\n[programs.partner]\n{partner}\n"),
            )
        };
        text.replace(
            "[[businesses]]\nid = \"globex\"",
            &format!("{acme_extra}\n[[businesses]]\nid = \"globex\""),
        )
    })
    .await
}

/// Polls `check` (every 20 ms, for at most 10 s of real time) until it holds.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A running in-process server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub clock: Clock,
    pub app: Arc<App>,
    pub dir: Arc<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        TestServer::start_in(dir, |text| text).await
    }

    /// Starts on the database in `dir`, with the default config text changed by `edit`.
    pub async fn start_in(
        dir: Arc<tempfile::TempDir>,
        edit: impl FnOnce(String) -> String,
    ) -> TestServer {
        let text = on_backend(edit(config_text("db/cosmopoints.redb")), dir.path());
        let config = Config::parse(&text, dir.path()).expect("test config is valid");
        TestServer::start_with(dir, config, |_| {}).await
    }

    /// Starts on `config` (its database in `dir`); `prepare` may add background tasks.
    pub async fn start_with(
        dir: Arc<tempfile::TempDir>,
        config: Config,
        prepare: impl FnOnce(&mut cosmopoints::service::Service),
    ) -> TestServer {
        let clock = Clock::manual(T0);
        let app = Arc::new(App::open(config, clock.clone()).expect("store opens"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let mut service = cosmopoints::service::Service::new(app.clone());
        prepare(&mut service);
        let task = tokio::spawn(service.run(listener, async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            clock,
            app,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Shuts down gracefully and waits until the database is released.
    pub async fn stop(mut self) -> Arc<tempfile::TempDir> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
        let dir = self.dir.clone();
        drop(self);
        dir
    }

    pub async fn token(&self, client: &str, secret: &str) -> String {
        let r = self
            .post(
                "/v1/auth",
                None,
                &serde_json::json!({"clientId": client, "clientSecret": secret}),
            )
            .await;
        assert_eq!(r.status, 200, "auth failed: {}", r.text());
        r.json()["accessToken"].as_str().expect("token").to_owned()
    }

    pub async fn acme(&self) -> String {
        self.token("acme-pos", "acme-secret").await
    }

    pub async fn globex(&self) -> String {
        self.token("globex-pos", "globex-secret").await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, path, token, None, &[]).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        self.send(
            Method::POST,
            path,
            token,
            Some(body.to_string().into_bytes()),
            &[("content-type", "application/json")],
        )
        .await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        self.send(
            Method::PUT,
            path,
            token,
            Some(body.to_string().into_bytes()),
            &[("content-type", "application/json")],
        )
        .await
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        request(self.addr, method, path, token, body, headers).await
    }

    /// Every transaction of the token's business, oldest first (the whole-range listing).
    pub async fn all_transactions(&self, token: &str) -> Vec<Value> {
        let r = self
            .get(
                "/v1/transactions?startDate=0000000000&endDate=9999999999",
                Some(token),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().as_array().expect("an array").clone()
    }

    /// Issues points for acme and returns the reply.
    pub async fn issue(&self, token: &str, body: Value) -> Reply {
        self.post("/v1/transactions", Some(token), &body).await
    }
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a problem+json error with this status and returns its detail.
    pub fn problem(&self, status: u16) -> String {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let p = self.json();
        assert_eq!(p["status"], status);
        assert!(p["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:cosmopoints:problem:")));
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        p["detail"].as_str().expect("detail").to_owned()
    }
}

/// One request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connect");
    exchange(stream, method, path, token, body, headers).await
}

/// One request from the local address `source` (any of 127.0.0.0/8).
pub async fn request_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Reply {
    request_from_with(
        source,
        addr,
        method,
        path,
        body,
        &[("content-type", "application/json")],
    )
    .await
}

/// One request from the local address `source`, with these headers.
pub async fn request_from_with(
    source: std::net::IpAddr,
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Reply {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind source");
    let stream = socket.connect(addr).await.expect("connect");
    exchange(stream, method, path, None, body, headers).await
}

async fn exchange(
    stream: TcpStream,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Reply {
    try_exchange(stream, method, path, token, body, headers)
        .await
        .expect("the server answers")
}

/// One request on a fresh connection; `None` if the connection fails (a killed server).
pub async fn try_request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Option<Reply> {
    let stream = TcpStream::connect(addr).await.ok()?;
    try_exchange(
        stream,
        method,
        path,
        token,
        body,
        &[("content-type", "application/json")],
    )
    .await
}

async fn try_exchange(
    stream: TcpStream,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Option<Reply> {
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    let response = sender.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some(Reply {
        status,
        headers,
        body,
    })
}

/// The address in the server's `listening on ADDR` log line, if `text` holds one (either
/// log format).
pub fn listening_address(text: &str) -> Option<SocketAddr> {
    let at = text.find("listening on ")? + "listening on ".len();
    let addr: String = text[at..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    Some(addr.parse().expect("an address"))
}

/// The real `cosmopoints` binary, serving a config file; its stderr is collected.
pub struct Binary {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    /// Every stderr line so far; all of them once [`Binary::wait`] has seen the exit.
    pub stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The thread collecting `stderr`: it ends at the pipe's end, after the exit.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Binary {
    /// Starts `cosmopoints serve --config PATH` and waits for its "listening on" line.
    pub fn serve(config: &std::path::Path) -> Binary {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
            .args(["serve", "--config"])
            .arg(config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (found, addr) = std::sync::mpsc::channel();
        let collected = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(addr) = listening_address(&line) {
                    let _ = found.send(addr);
                }
                collected.lock().expect("lines").push(line);
            }
        });
        let addr = match addr.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no listening line; stderr: {:?}",
                    lines.lock().expect("lines")
                );
            }
        };
        Binary {
            child,
            addr,
            stderr: lines,
            reader: Some(reader),
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits up to `secs` for the exit code; after an exit, `stderr` holds every line the
    /// process wrote (the reader has reached the pipe's end).
    pub fn wait(&mut self, secs: u64) -> Option<i32> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return status.code();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    pub async fn token(&self, client: &str, secret: &str) -> String {
        let body = serde_json::json!({"clientId": client, "clientSecret": secret})
            .to_string()
            .into_bytes();
        let r = try_request(self.addr, Method::POST, "/v1/auth", None, Some(body))
            .await
            .expect("auth answers");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["accessToken"].as_str().expect("token").to_owned()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the test config (port 0) into `dir` and returns its path.
pub fn write_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("cosmopoints.toml");
    std::fs::write(&path, on_backend(config_text("db/cosmopoints.redb"), dir))
        .expect("write config");
    path
}

/// The example config, made runnable in `dir`: a free port and a database inside `dir`.
pub fn example_config(dir: &std::path::Path) -> std::path::PathBuf {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
            .expect("example config");
    let text = example
        .replace("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:0\"")
        .replace(
            "path = \"data/cosmopoints.redb\"",
            "path = \"db/example.redb\"",
        );
    assert_ne!(text, example, "the example config changed shape");
    let path = dir.join("example.toml");
    std::fs::write(&path, text).expect("write");
    path
}

/// Issues points in a task of its own, so that many requests are in flight at once.
pub fn spawn_issue(addr: SocketAddr, token: &str, body: Value) -> tokio::task::JoinHandle<Reply> {
    let token = token.to_owned();
    tokio::spawn(async move {
        request(
            addr,
            Method::POST,
            "/v1/transactions",
            Some(&token),
            Some(body.to_string().into_bytes()),
            &[("content-type", "application/json")],
        )
        .await
    })
}

/// Runs `cosmopoints check --config PATH`: the exit code and stdout.
pub fn run_check(config: &std::path::Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("check runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A valid issue-points body with this reference.
pub fn issue_body(reference: &str) -> Value {
    serde_json::json!({
        "programId": "skywards",
        "value": 3673,
        "userId": "user-1",
        "referenceNumber": reference,
    })
}

/// An acme issuance of 3673 AED fils (833 points) in skywards to `user-1`, as the API
/// would hand it to the store: for tests that write through the store directly.
pub fn store_issue(reference: &str, description: Option<&str>) -> cosmopoints::store::Issue {
    use cosmopoints::domain::{BusinessId, Description, ProgramId, ReferenceNumber, UserId};
    let user = UserId::parse("user-1").expect("id");
    cosmopoints::store::Issue {
        business: BusinessId::parse("acme").expect("id"),
        program_name: "Skywards Miles".into(),
        currency: "AED".into(),
        total_points: 833,
        request: cosmopoints::ledger::NewTransaction {
            program_id: ProgramId::parse("skywards").expect("id"),
            value: 3673,
            recipient: cosmopoints::ledger::Recipient::Member(user.clone()),
            reference_number: ReferenceNumber::parse(reference).expect("reference"),
            description: description.map(|d| Description::parse(d).expect("text")),
            bonus: false,
        },
        user_id: user,
        deliver: false,
    }
}
