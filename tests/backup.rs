//! Backups, restores and exports through the real binary: `cosmopoints backup` taken from
//! a running server while writes go on restores (with `cosmopoints restore`) to a database
//! that `check` passes and that holds every transaction acknowledged before the backup
//! began; restore refuses a running server's database and a damaged backup; `export`
//! matches the API's listings.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{issue_body, run_check, try_request, Binary};
use hyper::Method;
use serde_json::Value;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The test config with an admin listener on a free port.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("cosmopoints.toml");
    let text = common::config_text("db/cosmopoints.redb") + "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(&path, text).expect("write config");
    path
}

/// The admin address the binary logged.
fn admin_address(server: &Binary) -> SocketAddr {
    for _ in 0..500 {
        let lines = server.stderr.lock().expect("lines").clone();
        if let Some(line) = lines.iter().find(|l| l.contains("admin listening at ")) {
            let at = line.find("admin listening at ").expect("found") + "admin listening at ".len();
            let text: String = line[at..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            return text.parse().expect("an address");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no admin line: {:?}", server.stderr.lock().expect("lines"));
}

async fn listing(addr: SocketAddr, token: &str, accept: &str) -> common::Reply {
    common::request(
        addr,
        Method::GET,
        "/v1/transactions?startDate=0000000000&endDate=9999999999",
        Some(token),
        None,
        &[("accept", accept)],
    )
    .await
}

#[test]
fn a_backup_under_concurrent_writes_restores_every_acknowledged_transaction() {
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path());
    let mut server = Binary::serve(&config);
    let admin = admin_address(&server);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backup = dir.path().join("backups/snapshot.redb");
    std::fs::create_dir_all(dir.path().join("backups")).expect("dir");

    let (before_backup, during) = rt.block_on(async {
        let token = server.token("acme-pos", "acme-secret").await;
        for i in 0..200 {
            let r = common::request(
                server.addr,
                Method::POST,
                "/v1/transactions",
                Some(&token),
                Some(issue_body(&format!("seed-{i}")).to_string().into_bytes()),
                &[("content-type", "application/json")],
            )
            .await;
            assert_eq!(r.status, 201);
        }
        // Writers run through the whole backup; each records what was acknowledged.
        let acknowledged = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..4 {
            let (acknowledged, stop, token) = (acknowledged.clone(), stop.clone(), token.clone());
            let addr = server.addr;
            writers.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let reference = format!("w{w}-{i}");
                    let body = issue_body(&reference).to_string().into_bytes();
                    if let Some(r) = try_request(
                        addr,
                        Method::POST,
                        "/v1/transactions",
                        Some(&token),
                        Some(body),
                    )
                    .await
                    {
                        if r.status == 201 {
                            acknowledged.lock().expect("set").insert(reference);
                        }
                    }
                    i += 1;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut before: HashSet<String> = acknowledged.lock().expect("set").clone();
        before.extend((0..200).map(|i| format!("seed-{i}")));
        let out = backup.clone();
        let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
            run(&[
                "backup",
                "--admin",
                &admin.to_string(),
                "--out",
                out.to_str().expect("utf8"),
            ])
        })
        .await
        .expect("backup ran");
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stdout.contains("checked"), "{stdout}");
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.expect("writer");
        }
        let during = acknowledged.lock().expect("set").len();
        (before, during)
    });
    assert!(
        during > before_backup.len() - 200,
        "writes went on during the backup"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&backup)
            .expect("backup exists")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // Restore is refused while the server holds the database, and changes nothing.
    let config_arg = config.to_str().expect("utf8");
    let backup_arg = backup.to_str().expect("utf8");
    let (code, _, err) = run(&["restore", "--from", backup_arg, "--config", config_arg]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("running server"), "{err}");
    server.signal("TERM");
    assert_eq!(server.wait(20), Some(0));

    // A damaged backup is refused too.
    let damaged = dir.path().join("damaged.redb");
    let mut bytes = std::fs::read(&backup).expect("read");
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&damaged, &bytes).expect("write");
    let (code, _, err) = run(&[
        "restore",
        "--from",
        damaged.to_str().expect("utf8"),
        "--config",
        config_arg,
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("unchanged"), "{err}");
    let (code, _, _) = run(&[
        "restore",
        "--from",
        "/nonexistent.redb",
        "--config",
        config_arg,
    ]);
    assert_eq!(code, 2);

    let (code, out, err) = run(&["restore", "--from", backup_arg, "--config", config_arg]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, report) = run_check(&config);
    assert_eq!(code, 0, "{report}");

    // Every reference acknowledged before the backup began is in the restored database.
    let (code, jsonl, err) = run(&[
        "export",
        "--config",
        config_arg,
        "--from",
        "0000000000",
        "--to",
        "9999999999",
        "--format",
        "jsonl",
    ]);
    assert_eq!(code, 0, "{err}");
    let restored: HashSet<String> = jsonl
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .map(|v| v["referenceNumber"].as_str().expect("ref").to_owned())
        .collect();
    let missing: Vec<_> = before_backup.difference(&restored).collect();
    assert!(missing.is_empty(), "lost in the backup: {missing:?}");
    // The restored server starts and serves them.
    let server = Binary::serve(&config);
    rt.block_on(async {
        let token = server.token("acme-pos", "acme-secret").await;
        let r = listing(server.addr, &token, "application/json").await;
        assert_eq!(r.json().as_array().expect("array").len(), restored.len());
    });
}

#[test]
fn exports_match_the_api_listings() {
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path());
    let mut server = Binary::serve(&config);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (json, csv) = rt.block_on(async {
        let mut json = Vec::new();
        let mut csv = Vec::new();
        for (business, client, secret, program) in [
            ("acme", "acme-pos", "acme-secret", "skywards"),
            ("globex", "globex-pos", "globex-secret", "tiny"),
        ] {
            let token = server.token(client, secret).await;
            for i in 0..5 {
                let mut body = issue_body(&format!("{business}-{i}"));
                body["programId"] = Value::from(program);
                body["description"] = Value::from(format!("=cmd|' /C calc'!A{i}, \"x\""));
                let r = common::request(
                    server.addr,
                    Method::POST,
                    "/v1/transactions",
                    Some(&token),
                    Some(body.to_string().into_bytes()),
                    &[("content-type", "application/json")],
                )
                .await;
                assert_eq!(r.status, 201, "{}", r.text());
            }
            let r = listing(server.addr, &token, "application/json").await;
            for mut tx in r.json().as_array().expect("array").clone() {
                tx["business"] = Value::from(business);
                json.push(tx);
            }
            let r = listing(server.addr, &token, "text/csv").await;
            let text = r.text();
            let mut lines = text.split_inclusive("\r\n");
            let header = lines.next().expect("header");
            if csv.is_empty() {
                csv.push(format!("business,{header}"));
            }
            csv.extend(lines.map(|l| format!("{business},{l}")));
        }
        (json, csv.concat())
    });
    let config_arg = config.to_str().expect("utf8");
    let range = ["--from", "0000000000", "--to", "9999999999"];
    let (code, _, err) = run(&[&["export", "--config", config_arg][..], &range].concat());
    assert_eq!(code, 2, "a running server's database: {err}");
    server.signal("TERM");
    assert_eq!(server.wait(20), Some(0));

    let (code, out, err) = run(&[
        &["export", "--config", config_arg][..],
        &range,
        &["--format", "jsonl"],
    ]
    .concat());
    assert_eq!(code, 0, "{err}");
    let exported: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(exported, json);

    let file = dir.path().join("out/export.csv");
    std::fs::create_dir_all(dir.path().join("out")).expect("dir");
    let (code, _, err) = run(&[
        &["export", "--config", config_arg][..],
        &range,
        &["--out", file.to_str().expect("utf8")],
    ]
    .concat());
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&file).expect("written"), csv);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&file).expect("exists").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    for bad in [
        &[
            "export",
            "--config",
            config_arg,
            "--from",
            "1",
            "--to",
            "9999999999",
        ][..],
        &["export", "--config", config_arg, "--from", "0000000000"],
        &[
            "export",
            "--config",
            config_arg,
            "--from",
            "0000000002",
            "--to",
            "0000000001",
        ],
        &[
            &["export", "--config", config_arg][..],
            &range,
            &["--format", "xml"],
        ]
        .concat(),
        &["backup", "--admin", "127.0.0.1:1"],
        &["restore", "--from", "x"],
        &["restore", "--from", "x", "--config", "y", "--bogus", "z"],
    ] {
        let (code, _, err) = run(bad);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{bad:?}: {err}");
    }
    for help in ["backup", "restore", "export"] {
        let (code, out, _) = run(&[help, "--help"]);
        assert_eq!(code, 0);
        assert!(out.starts_with("usage: cosmopoints"), "{out}");
    }
}

#[test]
fn an_admin_address_on_the_api_port_is_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("c.toml");
    let text = common::config_text("db.redb")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:18555\"")
        + "\n[admin]\nlisten = \"127.0.0.1:18555\"\n";
    std::fs::write(&path, text).expect("write");
    let (code, _, err) = run(&["serve", "--config", path.to_str().expect("utf8")]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("admin.listen"), "{err}");
    assert!(!dir.path().join("db.redb").exists(), "nothing was created");
}
