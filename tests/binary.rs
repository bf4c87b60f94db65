//! The real binary: command line, config errors, start-up failures, graceful shutdown
//! on SIGTERM, and its logs. The kill -9 tests are in soak.rs.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{issue_body, try_request, write_config, Binary};
use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_version_and_usage_errors() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["hash-secret", "--help"],
    ] {
        let (code, out, _) = run(args);
        assert_eq!(code, 0, "{args:?}");
        assert!(out.contains("usage"), "{args:?}: {out}");
    }
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("cosmopoints "));
    for args in [
        &[][..],
        &["bogus"],
        &["serve", "--port", "1"],
        &["serve", "--config"],
        &["hash-secret", "--iterations", "0"],
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, 2, "{args:?}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn hash_secret_output_is_accepted_by_the_config() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
        .args(["hash-secret", "--iterations", "1000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"s3cret\n")
        .expect("write");
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    assert!(hash.starts_with("$pbkdf2-sha256$i=1000$"), "{hash}");
    let dir = tempfile::tempdir().expect("dir");
    let text = common::config_text("db.redb").replace(
        "secret = \"acme-secret\"",
        &format!("secret_hash = \"{hash}\""),
    );
    let config = dir.path().join("c.toml");
    std::fs::write(&config, text).expect("write");
    let server = Binary::serve(&config);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        server.token("acme-pos", "s3cret").await;
        let body =
            serde_json::json!({"clientId": "acme-pos", "clientSecret": "s3cret\n"}).to_string();
        let r = try_request(
            server.addr,
            Method::POST,
            "/v1/auth",
            None,
            Some(body.into_bytes()),
        )
        .await
        .expect("answer");
        assert_eq!(r.status, 401);
    });
}

#[test]
fn bad_configs_exit_2_with_one_line_naming_the_key() {
    let base = common::config_text("db.redb");
    let cases: Vec<(String, &str)> = vec![
        (
            base.replace("currency = \"USD\"", "currency = \"XYZ\""),
            "businesses[1].currency",
        ),
        (
            base.replace(
                "programs = [\"skywards\", \"bounded\"]",
                "programs = [\"skywards\", \"nowhere\"]",
            ),
            "businesses[0].programs[1]",
        ),
        (
            base.replace("id = \"globex\"", "id = \"acme\""),
            "businesses[1].id",
        ),
        (
            base.replace("id = \"tiny\"", "id = \"skywards\""),
            "programs[1].id",
        ),
        (
            base.replace("client_id = \"globex-pos\"", "client_id = \"acme-pos\""),
            "businesses[1].clients[0].client_id",
        ),
        (
            base.replace(
                "price_per_point_usd = \"0.012\"",
                "price_per_point_usd = \"0.01.2\"",
            ),
            "programs[0].price_per_point_usd",
        ),
        (
            base.replace("AED = \"3.6725\"", "AED = \"-3\""),
            "currencies.AED",
        ),
        (
            base[..base.find("[[businesses]]").expect("businesses")].to_owned(),
            "businesses",
        ),
        (base.replace("[server]", "[server]\nport = 1"), "port"),
        (
            base.replace("token_ttl_seconds = 600", "token_ttl_seconds = \"600\""),
            "token_ttl_seconds",
        ),
        (
            base.replace("listen = \"127.0.0.1:0\"", "listen = \"localhost\""),
            "server.listen",
        ),
        (
            base.replace("secret = \"acme-secret\"", "secret_hash = \"plain\""),
            "secret_hash",
        ),
        ("this is not toml".to_owned(), "line 1"),
    ];
    let dir = tempfile::tempdir().expect("dir");
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text).expect("write");
        let (code, _, err) = run(&["serve", "--config", path.to_str().expect("utf8")]);
        assert_eq!(code, 2, "{key}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{key}: {err}");
        assert!(err.contains(key), "expected {key} in: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{err}"
        );
    }
    let (code, _, err) = run(&["serve", "--config", "/nonexistent/c.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/c.toml"), "{err}");
}

#[test]
fn an_unusable_database_stops_start_up_with_exit_2() {
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path());
    // Another server holds the file.
    let first = Binary::serve(&config);
    let (code, _, err) = run(&["serve", "--config", config.to_str().expect("utf8")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("in use by another process"), "{err}");
    drop(first);
    // Written by a newer Cosmopoints.
    {
        let db = redb::Database::create(dir.path().join("db/cosmopoints.redb")).expect("open");
        let txn = db.begin_write().expect("write");
        txn.open_table(redb::TableDefinition::<&str, &[u8]>::new("meta"))
            .expect("meta")
            .insert("schema_version", 2u64.to_le_bytes().as_slice())
            .expect("insert");
        txn.commit().expect("commit");
    }
    let (code, _, err) = run(&["serve", "--config", config.to_str().expect("utf8")]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("schema version 2, newer"), "{err}");
    // Not a database at all.
    let corrupt = dir.path().join("db/cosmopoints.redb");
    std::fs::write(&corrupt, vec![0x5a; 64 * 1024]).expect("write");
    let (code, _, err) = run(&["serve", "--config", config.to_str().expect("utf8")]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot open"), "{err}");
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_and_exits_0() {
    let dir = tempfile::tempdir().expect("dir");
    let mut server = Binary::serve(&write_config(dir.path()));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let token = server.token("acme-pos", "acme-secret").await;
        let body = issue_body("in-flight").to_string();
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
        let head = format!(
            "POST /v1/transactions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.write_all(&body.as_bytes()[..10]).await.expect("part");
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.signal("TERM");
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.write_all(&body.as_bytes()[10..]).await.expect("rest");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    });
    assert_eq!(server.wait(15), Some(0));
    // The acknowledged transaction is there after a restart.
    let server = Binary::serve(&write_config(dir.path()));
    rt.block_on(async {
        let token = server.token("acme-pos", "acme-secret").await;
        let r = try_request(
            server.addr,
            Method::GET,
            "/v1/transactions/in-flight",
            Some(&token),
            None,
        )
        .await
        .expect("answer");
        assert_eq!(r.status, 200);
    });
}

#[test]
fn json_logs_carry_request_ids_and_never_secrets_or_tokens() {
    let dir = tempfile::tempdir().expect("dir");
    let text = common::config_text("db/cosmopoints.redb")
        .replace("[server]\n", "[server]\nlog_format = \"json\"\n");
    let config = dir.path().join("c.toml");
    std::fs::write(&config, text).expect("config");
    let mut server = Binary::serve(&config);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let token = rt.block_on(async {
        let token = server.token("acme-pos", "acme-secret").await;
        let wrong = serde_json::json!({"clientId": "acme-pos", "clientSecret": "wrong-secret-xyz"})
            .to_string();
        let r = try_request(
            server.addr,
            Method::POST,
            "/v1/auth",
            None,
            Some(wrong.into_bytes()),
        )
        .await
        .expect("answer");
        assert_eq!(r.status, 401);
        let r = try_request(
            server.addr,
            Method::POST,
            "/v1/transactions",
            Some(&token),
            Some(issue_body("logged").to_string().into_bytes()),
        )
        .await
        .expect("answer");
        assert_eq!(r.status, 201);
        token
    });
    server.signal("TERM");
    assert_eq!(server.wait(15), Some(0));
    let lines = server.stderr.lock().expect("lines").clone();
    assert!(lines.len() >= 4, "{lines:?}");
    let mut request_ids = HashSet::new();
    for line in &lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if let Some(id) = value["span"]["id"].as_str() {
            request_ids.insert(id.to_owned());
        }
        for secret in ["acme-secret", "wrong-secret-xyz", token.as_str()] {
            assert!(
                !line.contains(secret),
                "a secret or token in the log: {line}"
            );
        }
    }
    assert!(request_ids.len() >= 3, "{lines:?}");
}

/// Runs the binary on `config` with its stderr going to a file, drives it with `drive`,
/// stops it with SIGTERM and returns every byte it logged.
fn raw_log_of_a_run(
    config: &std::path::Path,
    drive: impl AsyncFnOnce(std::net::SocketAddr),
) -> Vec<u8> {
    let log = config.with_extension("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
        .args(["serve", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("the binary starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let addr = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(at) = text.find("listening on ") {
            let addr: String = text[at + "listening on ".len()..]
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '"')
                .collect();
            break addr.parse().expect("an address");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("no listening line: {text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(drive(addr));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("exits");
    assert_eq!(status.code(), Some(0));
    std::fs::read(&log).expect("the log")
}

/// A small deterministic generator, so that a failing run can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

#[test]
fn request_values_reach_the_log_escaped_in_both_formats() {
    // Pieces an attacker would put in anything that might be logged.
    const PIECES: &[&str] = &[
        "\n",
        "\r",
        "\r\n",
        "\u{1b}[31m",
        "\u{1b}]0;title\u{7}",
        "\u{9b}2J",
        "\u{7f}",
        "\0",
        "\t",
        "\u{8}",
        "\nFORGED 2026-11-27T10:15:00Z ERROR cosmopoints: fake",
        "acme-pos",
        "é",
        "%0a",
        "%1b",
        " ",
        "\"",
        "\\",
        "}",
    ];
    for format in ["human", "json"] {
        let dir = tempfile::tempdir().expect("dir");
        let text = common::config_text("db/cosmopoints.redb")
            .replace(
                "[server]\n",
                &format!("[server]\nlog_format = \"{format}\"\n"),
            )
            .replace("max_failed_attempts = 5", "max_failed_attempts = 1000");
        let config = dir.path().join("c.toml");
        std::fs::write(&config, text).expect("config");
        let log = raw_log_of_a_run(&config, async |addr| {
            let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
            for i in 0..80 {
                let value: String = (0..1 + rng.next() % 6).map(|_| rng.pick(PIECES)).collect();
                // As a client id (logged on a failed login).
                let body = serde_json::json!({"clientId": value, "clientSecret": "x"}).to_string();
                let r = try_request(
                    addr,
                    Method::POST,
                    "/v1/auth",
                    None,
                    Some(body.into_bytes()),
                )
                .await
                .expect("an answer");
                assert!(matches!(r.status, 400 | 401), "{}", r.status);
                // Raw on the wire: in the path, the request id and another header. The
                // HTTP layer refuses some of these outright; the rest are served.
                let path: String = value
                    .bytes()
                    .map(|b| {
                        if b.is_ascii_graphic() {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02x}")
                        }
                    })
                    .collect();
                let raw = format!(
                    "GET /v1/{path}{} HTTP/1.1\r\nhost: x\r\nx-request-id: {value}\r\nconnection: close\r\n\r\n",
                    if i % 2 == 0 { value.as_str() } else { "" }
                );
                if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
                    let _ = stream.write_all(raw.as_bytes()).await;
                    let mut reply = Vec::new();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        stream.read_to_end(&mut reply),
                    )
                    .await;
                }
            }
        });
        let text = String::from_utf8_lossy(&log);
        assert!(
            text.matches("failed authentication").count() >= 40,
            "{format}: {text}"
        );
        let c1 = log
            .windows(2)
            .any(|w| w[0] == 0xc2 && (0x80..=0x9f).contains(&w[1]));
        let raw_control = log.iter().any(|&b| (b < 0x20 && b != b'\n') || b == 0x7f);
        assert!(
            !raw_control && !c1,
            "{format}: raw control bytes in the log:\n{text}"
        );
        for line in text.lines() {
            assert!(
                !line.starts_with("FORGED"),
                "{format}: a forged line: {line}"
            );
            if format == "json" {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            }
        }
    }
}
