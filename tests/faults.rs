//! Storage faults against the real binary: a full disk (a small tmpfs) fails writes with
//! 503 and changes nothing, reads keep working, and writes succeed again once space
//! returns. Needs root to mount the tmpfs (as CI and the dev machines are).

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{issue_body, try_request, Binary};
use hyper::Method;

/// A tmpfs of `size` mounted for the test's lifetime.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `path` until a write fails.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).expect("filler");
    let chunk = vec![0xAB; 16 * 1024];
    while file.write_all(&chunk).and_then(|()| file.flush()).is_ok() {}
    let _ = file.sync_all();
}

/// Root, as CI and the dev machines run, may mount; elsewhere this test says it is
/// skipped rather than failing a plain `cargo test`.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn a_full_disk_fails_writes_with_503_keeps_reads_and_recovers() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let mnt = dir.path().join("mnt");
    let _tmpfs = Tmpfs::mount(&mnt, "8m");
    let config = dir.path().join("c.toml");
    let text = common::config_text(mnt.join("db.redb").to_str().expect("utf8"));
    std::fs::write(&config, text).expect("config");
    let mut server = Binary::serve(&config);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut acknowledged = HashMap::new();
    rt.block_on(async {
        let token = server.token("acme-pos", "acme-secret").await;
        let issue = |reference: String| {
            let token = token.clone();
            async move {
                let body = issue_body(&reference).to_string().into_bytes();
                try_request(
                    server.addr,
                    Method::POST,
                    "/v1/transactions",
                    Some(&token),
                    Some(body),
                )
                .await
                .expect("the server answers")
            }
        };
        for i in 0..20 {
            let r = issue(format!("before-{i}")).await;
            assert_eq!(r.status, 201, "{}", r.text());
            acknowledged.insert(format!("before-{i}"), r.json()["id"].clone());
        }

        fill(&mnt.join("filler"));
        let mut refused = None;
        for i in 0..5_000 {
            let reference = format!("full-{i}");
            let r = issue(reference.clone()).await;
            match r.status {
                201 => {
                    acknowledged.insert(reference, r.json()["id"].clone());
                }
                503 => {
                    refused = Some((reference, r));
                    break;
                }
                other => panic!("unexpected {other}: {}", r.text()),
            }
        }
        let (refused_ref, r) = refused.expect("a write was refused once the disk was full");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert!(r.header("retry-after").is_some());
        assert!(
            !r.text().to_lowercase().contains("space"),
            "no internal detail: {}",
            r.text()
        );

        // Reads keep working while the disk is full.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = try_request(
                server.addr,
                Method::GET,
                "/v1/transactions/before-3",
                Some(&token),
                None,
            )
            .await
            .expect("answer");
            if got.status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "reads did not come back: {}",
                got.text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let list = try_request(
            server.addr,
            Method::GET,
            "/v1/transactions?startDate=0000000000&endDate=9999999999",
            Some(&token),
            None,
        )
        .await
        .expect("answer");
        assert_eq!(list.status, 200, "{}", list.text());
        let refused_get = try_request(
            server.addr,
            Method::GET,
            &format!("/v1/transactions/{refused_ref}"),
            Some(&token),
            None,
        )
        .await
        .expect("answer");
        assert_eq!(
            refused_get.status, 404,
            "a refused write left nothing behind"
        );

        // Space returns: writes succeed again.
        std::fs::remove_file(mnt.join("filler")).expect("free space");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = issue("after".to_owned()).await;
            if r.status == 201 {
                acknowledged.insert("after".to_owned(), r.json()["id"].clone());
                break;
            }
            assert_eq!(r.status, 503, "{}", r.text());
            assert!(Instant::now() < deadline, "writes did not come back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    server.signal("TERM");
    assert_eq!(server.wait(15), Some(0));

    let (code, report) = common::run_check(&config);
    assert_eq!(code, 0, "{report}");
    assert!(
        report.contains(&format!("{} transactions", acknowledged.len())),
        "{report}"
    );

    let server = Binary::serve(&config);
    rt.block_on(async {
        let token = server.token("acme-pos", "acme-secret").await;
        for (reference, id) in &acknowledged {
            let got = try_request(
                server.addr,
                Method::GET,
                &format!("/v1/transactions/{reference}"),
                Some(&token),
                None,
            )
            .await
            .expect("answer");
            assert_eq!(got.status, 200, "{reference}");
            assert_eq!(&got.json()["id"], id);
        }
    });
}
