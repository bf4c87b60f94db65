//! The real binary refuses a bad `[programs.partner]` like any bad config: exit 2, one
//! line naming the key, and never the secret it was given.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

/// The test config with `partner` as the first program's `[programs.partner]` table.
fn with_partner(partner: &str) -> String {
    common::config_text("db.redb").replacen(
        "max_points = 1000000\n",
        &format!("max_points = 1000000\n[programs.partner]\n{partner}\n"),
        1,
    )
}

#[test]
fn bad_partner_configs_exit_2_naming_the_key() {
    // 23 bytes: one short.
    let short = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([7u8; 23])
    );
    let good = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let cases = [
        (
            format!("url = \"http://p.example\"\nsecret = \"{short}\""),
            "programs[0].partner.secret",
        ),
        (
            format!("url = \"https://u:p@p.example\"\nsecret = \"{good}\""),
            "programs[0].partner.url",
        ),
        (
            "sandbox = true\nurl = \"http://p.example\"".to_owned(),
            "programs[0].partner.url",
        ),
        (
            format!(
                "url = \"https://p.example\"\nsecret = \"{good}\"\nca_file = \"missing-ca.pem\""
            ),
            "programs[0].partner.ca_file",
        ),
        (
            "sandbox = true\nretry_schedule_seconds = []".to_owned(),
            "programs[0].partner.retry_schedule_seconds",
        ),
        (
            "sandbox = true\nconcurrency = 0".to_owned(),
            "programs[0].partner.concurrency",
        ),
    ];
    let dir = tempfile::tempdir().expect("dir");
    for (partner, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, with_partner(&partner)).expect("write");
        let mut child = Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
            .args(["serve", "--config", path.to_str().expect("utf8")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runs");
        // A config wrongly accepted would start a server that never exits: stop it.
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if child.try_wait().expect("wait").is_none() {
            child.kill().expect("kill");
        }
        let out = child.wait_with_output().expect("output");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{key}: {err}");
        assert!(err.contains(key), "expected {key} in: {err}");
        assert!(
            !err.contains(&short[6..]) && !err.contains(&good[6..]),
            "{err}"
        );
        if key.ends_with("ca_file") {
            // Looked for next to the config file, and the message says where.
            let expected = dir.path().join("missing-ca.pem");
            assert!(err.contains(&expected.display().to_string()), "{err}");
        }
    }
}
