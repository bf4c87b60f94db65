//! The real binary: command line, config errors, start-up failures, graceful shutdown
//! on SIGTERM, and its logs. The kill -9 tests are in soak.rs.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{example_config, issue_body, try_request, write_config, Binary};
use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn run(args: &[&str]) -> (i32, String, String) {
    run_in(Path::new("."), args)
}

/// Runs the binary in the folder `dir` with stdin closed: exit code, stdout, stderr.
fn run_in(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
        .args(args)
        .current_dir(dir)
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
    // A currency outside ISO 4217 needs its exponent; the table form is checked key by key.
    let with = |line: &str| base.replace("SAR = \"3.75\"", &format!("SAR = \"3.75\"\n{line}"));
    let cases = cases.into_iter().chain([
        (
            with("BTC = \"0.00001\""),
            "currencies.BTC: BTC is not an ISO 4217",
        ),
        (
            with("BTC = { units_per_usd = \"0.00001\", exponent = 9 }"),
            "currencies.BTC.exponent",
        ),
        (
            with("BTC = { units_per_usd = \"0.00001\", exp = 8 }"),
            "currencies.BTC.exp",
        ),
        (
            with("BTC = { exponent = 8 }"),
            "currencies.BTC.units_per_usd",
        ),
        (with("BTC = 5"), "currencies.BTC"),
        (with("btc = \"1\""), "currencies.btc"),
    ]);
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
            .insert(
                "schema_version",
                (cosmopoints::store::SCHEMA_VERSION + 1)
                    .to_le_bytes()
                    .as_slice(),
            )
            .expect("insert");
        txn.commit().expect("commit");
    }
    let (code, _, err) = run(&["serve", "--config", config.to_str().expect("utf8")]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let newer = format!(
        "schema version {}, newer",
        cosmopoints::store::SCHEMA_VERSION + 1
    );
    assert!(err.contains(&newer), "{err}");
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
        // A request's `done` line has its id among its fields; any other line it logs
        // has it in its span.
        if let Some(id) = value["span"]["id"].as_str().or(value["id"].as_str()) {
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

#[test]
fn without_a_config_serve_and_check_exit_2_naming_the_file_looked_for() {
    let dir = tempfile::tempdir().expect("dir");
    // The example config lies right there, and still is not used unless named.
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"),
        dir.path().join("config.example.toml"),
    )
    .expect("copy");
    for args in [&["serve"][..], &["check"]] {
        let (code, _, err) = run_in(dir.path(), args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        let looked = dir.path().join("cosmopoints.toml");
        assert!(err.contains(looked.to_str().expect("utf8")), "{err}");
        assert!(err.contains("--config"), "{err}");
    }
    assert!(!dir.path().join("data").exists(), "a database was created");
    // With cosmopoints.toml present, it is the one used: `check` reads the database it
    // names (not created yet, so that is the complaint).
    let config = write_config(dir.path());
    assert!(config.ends_with("cosmopoints.toml"));
    let (code, _, err) = run_in(dir.path(), &["check"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("db/cosmopoints.redb does not exist"), "{err}");
}

#[test]
fn the_first_log_line_names_config_database_address_and_businesses() {
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path());
    let mut server = Binary::serve(&config);
    server.signal("TERM");
    assert_eq!(server.wait(15), Some(0));
    let lines = server.stderr.lock().expect("lines").clone();
    let first = &lines[0];
    let database = dir.path().join("db/cosmopoints.redb");
    for part in [
        format!("listening on {}", server.addr),
        config.display().to_string(),
        database.display().to_string(),
        "acme, globex".to_owned(),
    ] {
        assert!(
            first.contains(&part),
            "{part} missing from the first line: {first}"
        );
    }
    assert!(
        !lines.iter().any(|l| l.contains("demo secret")),
        "{lines:?}"
    );
}

#[test]
fn the_start_up_log_says_the_page_cache_and_where_its_size_came_from() {
    let dir = tempfile::tempdir().expect("dir");
    // redb whatever the test backend: the page cache is redb's.
    let text = common::config_text("db/cosmopoints.redb");
    let cases = [
        // No cache_mib: sized from the file, which is new and small: the minimum.
        (
            text.clone(),
            "database page cache 16 MiB (1/32 of the file, 16 to 1024 MiB)",
        ),
        (
            text.replace("[storage]\n", "[storage]\ncache_mib = 40\n"),
            "database page cache 40 MiB (storage.cache_mib)",
        ),
    ];
    for (config_text, expected) in cases {
        assert!(
            config_text.contains("[storage]\n"),
            "the test config changed shape"
        );
        let config = dir.path().join("cosmopoints.toml");
        std::fs::write(&config, &config_text).expect("write config");
        let mut server = Binary::serve(&config);
        server.signal("TERM");
        assert_eq!(server.wait(15), Some(0));
        let lines = server.stderr.lock().expect("lines").clone();
        assert!(
            lines.iter().any(|l| l.contains(expected)),
            "{expected:?} missing: {lines:?}"
        );
    }
}

#[test]
fn the_example_demo_secret_is_warned_about_at_every_start() {
    let dir = tempfile::tempdir().expect("dir");
    let config = example_config(dir.path());
    for _ in 0..2 {
        let mut server = Binary::serve(&config);
        server.signal("TERM");
        assert_eq!(server.wait(15), Some(0));
        let lines = server.stderr.lock().expect("lines").clone();
        let warning = lines
            .iter()
            .find(|l| l.contains("WARN") && l.contains("public demo secret"))
            .unwrap_or_else(|| panic!("no demo-secret warning: {lines:?}"));
        assert!(warning.contains("demo-pos"), "{warning}");
        assert!(!warning.contains("cosmo-demo-secret"), "{warning}");
    }
    // A plain-text demo secret is caught too.
    let text = std::fs::read_to_string(&config).expect("read");
    let plain = text.replace(
        &text[text.find("secret_hash = ").expect("hash")..],
        "secret = \"cosmo-demo-secret\"\n",
    );
    std::fs::write(&config, plain).expect("write");
    let mut server = Binary::serve(&config);
    server.signal("TERM");
    assert_eq!(server.wait(15), Some(0));
    let lines = server.stderr.lock().expect("lines").clone();
    assert!(
        lines.iter().any(|l| l.contains("public demo secret")),
        "{lines:?}"
    );
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("meta").permissions().mode() & 0o777
}

/// The database holds the signing key: it and the folders made for it are owner-only; a
/// file left readable by others (as earlier versions made it) is warned about at start.
#[test]
fn the_database_and_its_new_folders_are_created_owner_only() {
    let dir = tempfile::tempdir().expect("dir");
    let text = common::config_text("state/deep/cosmopoints.redb");
    let config = dir.path().join("c.toml");
    std::fs::write(&config, text).expect("config");
    let mut server = Binary::serve(&config);
    let database = dir.path().join("state/deep/cosmopoints.redb");
    assert_eq!(mode(&database) & 0o077, 0, "{:o}", mode(&database));
    assert_eq!(mode(&database) & 0o600, 0o600);
    for folder in ["state", "state/deep"] {
        let m = mode(&dir.path().join(folder));
        assert_eq!(m & 0o077, 0, "{folder}: {m:o}");
    }
    server.signal("TERM");
    assert_eq!(server.wait(15), Some(0));
    let lines = server.stderr.lock().expect("lines").clone();
    assert!(!lines.iter().any(|l| l.contains("chmod")), "{lines:?}");

    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut server = Binary::serve(&config);
    server.signal("TERM");
    assert_eq!(server.wait(15), Some(0));
    let lines = server.stderr.lock().expect("lines").clone();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("mode 644") && l.contains("chmod 600")),
        "{lines:?}"
    );
}

/// SIGHUP (a closed terminal, a reflexive reload) is logged and changes nothing: the
/// server keeps serving, and SIGTERM still stops it cleanly.
#[test]
fn sighup_is_logged_and_ignored() {
    let dir = tempfile::tempdir().expect("dir");
    let mut server = Binary::serve(&write_config(dir.path()));
    let hups = |server: &Binary| {
        let lines = server.stderr.lock().expect("lines").clone();
        lines
            .iter()
            .filter(|l| l.contains("SIGHUP received and ignored"))
            .count()
    };
    // One at a time: two signals sent together may be delivered as one.
    for n in 1..=2 {
        server.signal("HUP");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hups(&server) < n && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(hups(&server), n);
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let token = server.token("acme-pos", "acme-secret").await;
        let r = try_request(
            server.addr,
            Method::POST,
            "/v1/transactions",
            Some(&token),
            Some(issue_body("after-hup").to_string().into_bytes()),
        )
        .await
        .expect("still serving after SIGHUP");
        assert_eq!(r.status, 201, "{}", r.text());
    });
    assert_eq!(server.child.try_wait().expect("status"), None, "it exited");
    server.signal("TERM");
    assert_eq!(server.wait(15), Some(0));
    assert_eq!(hups(&server), 2);
}

/// `hash-secret` in a terminal (a pseudo-terminal made by util-linux's `script`): it asks,
/// the typed secret is not echoed, and the printed hash verifies it.
#[test]
fn hash_secret_in_a_terminal_prompts_without_echo() {
    use std::io::Read;
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    }
    let command = format!(
        "{} hash-secret --iterations 1000",
        env!("CARGO_BIN_EXE_cosmopoints")
    );
    let mut child = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script runs");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut screen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&screen).contains("(not shown): ") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(bytes) => screen.extend(bytes),
            Err(_) => panic!("no prompt: {:?}", String::from_utf8_lossy(&screen)),
        }
    }
    // The prompt is written just before echo is turned off: give it that moment.
    std::thread::sleep(Duration::from_millis(500));
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"tty-s3cret\r").expect("type");
    let status = child.wait().expect("exits");
    drop(stdin);
    while let Ok(bytes) = rx.recv_timeout(Duration::from_secs(2)) {
        screen.extend(bytes);
    }
    let screen = String::from_utf8_lossy(&screen).into_owned();
    assert!(status.success(), "{screen}");
    assert!(
        !screen.contains("tty-s3cret"),
        "the secret was echoed: {screen}"
    );
    let hash = screen
        .split_whitespace()
        .find(|w| w.starts_with("$pbkdf2-sha256$"))
        .unwrap_or_else(|| panic!("no hash: {screen}"));
    let hash = cosmopoints::auth::SecretHash::parse(hash).expect("a valid hash");
    assert!(hash.verify(b"tty-s3cret"));
    assert!(!hash.verify(b"tty-s3cret\r"));
}

/// `--generate` prints a strong random secret and a config line with its hash; each run
/// makes a new one.
#[test]
fn hash_secret_generate_prints_a_random_secret_and_its_hash() {
    let mut seen = HashSet::new();
    for _ in 0..2 {
        let (code, out, err) = run(&["hash-secret", "--generate", "--iterations", "1000"]);
        assert_eq!(code, 0, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        let secret = lines[0].strip_prefix("secret: ").expect("secret line");
        assert_eq!(secret.len(), 43, "{secret}");
        assert!(secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let hash = lines[1]
            .strip_prefix("secret_hash = \"")
            .and_then(|h| h.strip_suffix('"'))
            .expect("a config line");
        assert!(hash.starts_with("$pbkdf2-sha256$i=1000$"), "{hash}");
        let hash = cosmopoints::auth::SecretHash::parse(hash).expect("a valid hash");
        assert!(hash.verify(secret.as_bytes()));
        assert!(seen.insert(secret.to_owned()), "the same secret twice");
    }
    for args in [
        &["hash-secret", "--generate", "--generate"][..],
        &["hash-secret", "--generate", "--iterations"],
        &["hash-secret", "--bogus"],
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, 2, "{args:?}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

/// README's curl walk-through logs in with a few lines of shell: run against the real
/// binary on the example config, they give a working token, and with a wrong secret they
/// fail loudly (non-zero, the problem shown) instead of passing the error body on as a token.
#[test]
fn readme_login_snippet_fails_loudly_on_a_failed_login() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("skipped: curl is not installed");
        return;
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let start = readme.find("LOGIN=$(curl").expect("the login snippet");
    let end =
        start + readme[start..].find("false; }\n").expect("the login check") + "false; }\n".len();
    let dir = tempfile::tempdir().expect("dir");
    let server = Binary::serve(&example_config(dir.path()));
    let snippet =
        readme[start..end].replace("http://127.0.0.1:8080", &format!("http://{}", server.addr));
    let shell = |script: &str| {
        let out = Command::new("bash")
            .args(["-c", &format!("{script}\nprintf '%s' \"$TOKEN\"")])
            .stdin(Stdio::null())
            .output()
            .expect("bash runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, token, err) = shell(&format!("set -e\n{snippet}"));
    assert!(ok, "{err}");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let r = try_request(server.addr, Method::GET, "/v1/profile", Some(&token), None)
            .await
            .expect("answer");
        assert_eq!(r.status, 200, "{}", r.text());
    });
    let wrong = snippet.replace("cosmo-demo-secret", "not-the-secret");
    assert_ne!(wrong, snippet);
    let (ok, token, err) = shell(&format!("set -e\n{wrong}"));
    assert!(!ok, "a failed login passed: token {token:?}");
    assert!(token.is_empty(), "{token}");
    assert!(err.contains("login failed"), "{err}");
    assert!(err.contains("invalid-credentials"), "{err}");
}

/// README's whole curl walk-through runs against the real binary on the example config:
/// it issues, refunds part, and refunds the rest, with the points README states.
#[test]
fn readme_walkthrough_issues_and_reverses_as_it_says() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("skipped: curl is not installed");
        return;
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let start = readme.find("LOGIN=$(curl").expect("the walk-through");
    let end = start + readme[start..].find("```").expect("its end");
    let dir = tempfile::tempdir().expect("dir");
    let server = Binary::serve(&example_config(dir.path()));
    let script =
        readme[start..end].replace("http://127.0.0.1:8080", &format!("http://{}", server.addr));
    let out = Command::new("bash")
        .args(["-c", &format!("set -e\n{script}")])
        .stdin(Stdio::null())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#""totalPoints":833"#), "{stdout}");
    let created: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<serde_json::Value>()
        .map(|v| v.expect("each answer is JSON"))
        .collect();
    let reversals = created.last().expect("the list of reversals");
    let points: Vec<_> = reversals
        .as_array()
        .expect("an array")
        .iter()
        .map(|r| (r["referenceNumber"].clone(), r["points"].clone()))
        .collect();
    assert_eq!(
        points,
        [
            (serde_json::json!("ret-7-1"), serde_json::json!(227)),
            (serde_json::json!("ret-7-2"), serde_json::json!(606))
        ]
    );
}

/// Each request's log line answers who, what and how it went: request id, business,
/// client, remote address, route, status, latency, the transaction written, and the
/// problem type of an error. Human logs carry no colour codes when stderr is not a
/// terminal (here, a pipe); JSON logs carry the same fields.
#[test]
fn request_log_lines_name_business_client_route_status_and_problem() {
    for format in ["human", "json"] {
        let dir = tempfile::tempdir().expect("dir");
        let text = common::config_text("db/cosmopoints.redb").replace(
            "[server]\n",
            &format!("[server]\nlog_format = \"{format}\"\n"),
        );
        let config = dir.path().join("c.toml");
        std::fs::write(&config, text).expect("config");
        let mut server = Binary::serve(&config);
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let id = rt.block_on(async {
            let token = server.token("acme-pos", "acme-secret").await;
            let issue = |body: serde_json::Value| {
                try_request(
                    server.addr,
                    Method::POST,
                    "/v1/transactions",
                    Some(&token),
                    Some(body.to_string().into_bytes()),
                )
            };
            let created = issue(issue_body("logged")).await.expect("answer");
            assert_eq!(created.status, 201);
            let mut refused = issue_body("refused");
            refused["programId"] = "tiny".into();
            assert_eq!(issue(refused).await.expect("answer").status, 422);
            let r = try_request(
                server.addr,
                Method::GET,
                "/v1/transactions/nowhere-1",
                Some(&token),
                None,
            )
            .await
            .expect("answer");
            assert_eq!(r.status, 404);
            let wrong = serde_json::json!({"clientId": "acme-pos", "clientSecret": "wrong"});
            let r = try_request(
                server.addr,
                Method::POST,
                "/v1/auth",
                None,
                Some(wrong.to_string().into_bytes()),
            )
            .await
            .expect("answer");
            assert_eq!(r.status, 401);
            created.json()["id"].as_str().expect("id").to_owned()
        });
        server.signal("TERM");
        assert_eq!(server.wait(15), Some(0));
        let lines = server.stderr.lock().expect("lines").clone();
        assert!(
            !lines.iter().any(|l| l.contains('\u{1b}')),
            "{format}: colour codes in a piped log: {lines:?}"
        );
        // (status, route, transaction or problem) of the three requests after the login.
        let expected = [
            (201, "/v1/transactions", Some(id.as_str()), None),
            (422, "/v1/transactions", None, Some("unprocessable")),
            (
                404,
                "/v1/transactions/{transactionId}",
                None,
                Some("not-found"),
            ),
        ];
        for (status, route, transaction, problem) in expected {
            let line = lines
                .iter()
                .find(|l| {
                    l.contains("done")
                        && l.contains(&format!(
                            "status{}{status}",
                            if format == "json" { "\":" } else { "=" }
                        ))
                })
                .unwrap_or_else(|| panic!("{format}: no line for {status}: {lines:?}"));
            let field = |name: &str| -> Option<String> {
                if format == "json" {
                    let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
                    let found = v["span"][name].clone();
                    let found = if found.is_null() {
                        v[name].clone()
                    } else {
                        found
                    };
                    match found {
                        serde_json::Value::Null => None,
                        serde_json::Value::String(s) => Some(s),
                        other => Some(other.to_string()),
                    }
                } else {
                    let at = [' ', '{']
                        .iter()
                        .find_map(|c| line.find(&format!("{c}{name}=")))?
                        + name.len()
                        + 2;
                    let rest = &line[at..];
                    let end = rest.find(' ').unwrap_or(rest.len());
                    // The span's last field ends in "}:"; strings from the config
                    // (business, client) are quoted.
                    let value = &rest[..end];
                    let value = value.strip_suffix("}:").unwrap_or(value);
                    Some(value.trim_matches('"').to_owned())
                }
            };
            assert_eq!(field("business").as_deref(), Some("acme"), "{line}");
            assert_eq!(field("client").as_deref(), Some("acme-pos"), "{line}");
            assert_eq!(field("route").as_deref(), Some(route), "{line}");
            assert!(
                field("remote").is_some_and(|r| r.starts_with("127.0.0.1:")),
                "{line}"
            );
            assert!(field("id").is_some_and(|r| !r.is_empty()), "{line}");
            assert!(field("latency_us").is_some(), "{line}");
            let method = if status == 404 { "GET" } else { "POST" };
            assert_eq!(field("method").as_deref(), Some(method), "{line}");
            assert!(
                field("path").is_some_and(|p| p.contains("/v1/transactions")),
                "{line}"
            );
            assert_eq!(field("transaction").as_deref(), transaction, "{line}");
            assert_eq!(field("problem").as_deref(), problem, "{line}");
        }
        // A request's other lines name its id: the failed login's line, the id of the
        // 401's `done` line.
        let id_of = |pick: &dyn Fn(&str) -> bool, span: bool| -> String {
            let line = lines
                .iter()
                .find(|l| pick(l))
                .unwrap_or_else(|| panic!("{format}: no such line: {lines:?}"));
            if format == "json" {
                let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
                let id = if span { &v["span"]["id"] } else { &v["id"] };
                id.as_str()
                    .unwrap_or_else(|| panic!("no id: {line}"))
                    .to_owned()
            } else {
                let (start, end) = if span {
                    (" request{id=", "}: ")
                } else {
                    (" id=", " ")
                };
                let at = line.find(start).unwrap_or_else(|| panic!("no id: {line}"));
                let rest = &line[at + start.len()..];
                rest[..rest.find(end).expect("end")].to_owned()
            }
        };
        let warned = id_of(&|l: &str| l.contains("failed authentication"), true);
        let status = if format == "json" {
            "\"status\":401"
        } else {
            "status=401"
        };
        let done = id_of(&|l: &str| l.contains("done") && l.contains(status), false);
        assert!(!warned.is_empty(), "{lines:?}");
        assert_eq!(warned, done, "{format}: {lines:?}");
    }
}

/// contrib/cosmopoints.service passes `systemd-analyze verify` (with ExecStart pointed at
/// the binary just built, since verify checks that it exists) and keeps its hardening.
#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed (CI installs it)");
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/cosmopoints.service"
    ))
    .expect("the unit");
    for setting in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "StateDirectory=cosmopoints",
        "NoNewPrivileges=yes",
        "ExecStart=/usr/local/bin/cosmopoints serve --config ",
    ] {
        assert!(unit.contains(setting), "{setting} missing");
    }
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("cosmopoints.service");
    let local = unit.replace(
        "/usr/local/bin/cosmopoints",
        env!("CARGO_BIN_EXE_cosmopoints"),
    );
    std::fs::write(&path, local).expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("cosmopoints.service"),
        "verify complained: {text}"
    );
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
        if let Some(addr) = common::listening_address(&text) {
            break addr;
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

#[test]
fn a_stalled_stderr_holds_no_request_back_and_loses_no_line() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path());
    /// Stops the server if the test fails part-way (its requests would be stuck).
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts"),
    );
    let mut stderr = std::io::BufReader::new(child.0.stderr.take().expect("piped stderr"));
    let mut seen = String::new();
    let addr: std::net::SocketAddr = loop {
        let mut line = String::new();
        let read = stderr.read_line(&mut line).expect("stderr");
        assert!(read > 0, "no listening line: {seen}");
        if let Some(addr) = common::listening_address(&line) {
            break addr;
        }
        seen.push_str(&line);
    };
    // From here on nobody reads stderr: its pipe (64 KiB) fills after a few hundred lines.
    const REQUESTS: usize = 2000;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        for n in 0..REQUESTS {
            let reply = tokio::time::timeout(
                Duration::from_secs(10),
                try_request(addr, Method::GET, "/healthz", None, None),
            )
            .await
            .unwrap_or_else(|_| panic!("request {n} waited on the log"))
            .expect("an answer");
            assert_eq!(reply.status, 200);
        }
    });
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut rest).expect("stderr");
        rest
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    assert_eq!(child.0.wait().expect("exits").code(), Some(0));
    let rest = reader.join().expect("reader");
    // The log names the path without its query: each line is told apart by its id.
    let logged: HashSet<&str> = rest
        .lines()
        .filter(|line| line.contains(" done ") && line.contains(" route=/healthz "))
        .map(|line| {
            let at = line.find(" id=").expect("an id") + 4;
            &line[at..at + 32]
        })
        .collect();
    assert_eq!(logged.len(), REQUESTS, "every request's line is logged");
    assert!(
        rest.contains("stopped"),
        "the last lines are written: {rest}"
    );
}
