//! The staff dashboard: its files over plain HTTP (headers, content types, HEAD, 404s, no
//! inline code), and the page itself in a real headless Chromium driven by
//! `tests/browser/dashboard.mjs` against the real binary.
//!
//! The browser test needs node, Debian's `chromium` and `playwright-core` in
//! `tests/browser/node_modules` (`.ci/run` installs all three). Without them it says
//! "skipped" — except under CI (`CI` set), where a missing tool fails the test, so that
//! CI can never pass without having run the browser.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{example_config, request, Binary, TestServer};
use hyper::Method;
use serde_json::json;

/// The headers every dashboard file carries, exactly.
const SECURITY_HEADERS: [(&str, &str); 4] = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-cache"),
];

/// The dashboard's files: path and content type.
const FILES: [(&str, &str); 3] = [
    ("/", "text/html; charset=utf-8"),
    ("/dashboard/app.js", "text/javascript; charset=utf-8"),
    ("/dashboard/app.css", "text/css; charset=utf-8"),
];

fn check_headers(reply: &common::Reply, what: &str) {
    for (name, value) in SECURITY_HEADERS {
        let all: Vec<&str> = reply
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(all, [value], "{what}: {name}");
    }
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_strict_headers() {
    let server = TestServer::start().await;
    for (path, content_type) in FILES {
        let get = server.get(path, None).await;
        assert_eq!(get.status, 200, "GET {path}");
        assert_eq!(get.header("content-type"), Some(content_type), "GET {path}");
        check_headers(&get, &format!("GET {path}"));
        assert!(!get.body.is_empty());

        let head = server.send(Method::HEAD, path, None, None, &[]).await;
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} has no body");
        assert_eq!(head.header("content-type"), Some(content_type));
        assert_eq!(
            head.header("content-length"),
            Some(get.body.len().to_string().as_str()),
            "HEAD {path} announces GET's length"
        );
        check_headers(&head, &format!("HEAD {path}"));

        let post = server.send(Method::POST, path, None, None, &[]).await;
        post.problem(405);
        assert_eq!(post.header("allow"), Some("GET, HEAD"));
    }
    // Exactly the files compiled in.
    assert_eq!(
        server.get("/", None).await.body,
        cosmopoints::dashboard::PAGE.as_bytes()
    );
    server.stop().await;
}

#[tokio::test]
async fn unknown_dashboard_paths_are_404_problems() {
    let server = TestServer::start().await;
    for path in [
        "/dashboard/",
        "/dashboard/app.mjs",
        "/dashboard/../src/lib.rs",
        "/dashboard/app.js/x",
        "/index.html",
        "/dashboard",
    ] {
        let reply = server.get(path, None).await;
        reply.problem(404);
        assert!(reply.header("content-security-policy").is_none());
    }
    server.stop().await;
}

/// The page loads its code from files only: no inline script or style, no event handler
/// attributes, no `javascript:` URLs, nothing from another origin; the script never puts
/// text into HTML and never stores anything.
#[test]
fn the_page_has_no_inline_code_and_the_script_no_html_sinks() {
    let page = cosmopoints::dashboard::PAGE.to_ascii_lowercase();
    let scripts: Vec<&str> = page.split("<script").skip(1).collect();
    assert_eq!(scripts.len(), 1, "one script element");
    assert!(
        scripts[0].starts_with(" src=\"/dashboard/app.js\" defer></script>"),
        "the only script is the file: {}",
        &scripts[0][..60]
    );
    assert!(!page.contains("<style"), "no <style> element");
    assert!(!page.contains(" style="), "no style attribute");
    assert!(!page.contains("javascript:"), "no javascript: URL");
    for (at, _) in page.match_indices(" on") {
        let name: String = page[at + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let rest = &page[at + 1 + name.len()..];
        assert!(
            !rest.trim_start().starts_with('='),
            "an event handler attribute `{name}=`"
        );
    }
    for url in ["http://", "https://", "//"] {
        for (at, _) in page.match_indices(url) {
            let before = &page[..at];
            assert!(
                !before.ends_with("src=\"") && !before.ends_with("href=\""),
                "a resource from elsewhere at {at}"
            );
        }
    }

    // The SVG namespace is a name, not a place anything is fetched from.
    let script = cosmopoints::dashboard::SCRIPT.replace("'http://www.w3.org/2000/svg'", "");
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "localStorage",
        "sessionStorage",
        "document.cookie",
        "indexedDB",
    ] {
        assert!(!script.contains(sink), "app.js uses {sink}");
    }
    assert!(
        !script.contains("http://") && !script.contains("https://"),
        "app.js names no other origin"
    );
    assert!(!cosmopoints::dashboard::STYLE.contains("@import"));
    assert!(!cosmopoints::dashboard::STYLE.contains("url("));
}

/// What the browser test needs, or why it cannot run.
fn browser_tools() -> Result<(PathBuf, PathBuf), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !node.is_ok_and(|s| s.success()) {
        return Err("node is not installed".into());
    }
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.exists() {
        return Err(format!("{} is not installed", chromium.display()));
    }
    let driver = root.join("tests/browser/node_modules/playwright-core/package.json");
    if !driver.exists() {
        return Err("playwright-core is not installed (npm ci --prefix tests/browser)".into());
    }
    Ok((root.join("tests/browser/dashboard.mjs"), chromium))
}

/// Whether this run is CI's, which must run every test it has.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_real_browser() {
    let (script, chromium) = match browser_tools() {
        Ok(tools) => tools,
        Err(missing) if in_ci() => panic!(
            "the browser test cannot run under CI: {missing}; .ci/run installs chromium and \
             playwright-core"
        ),
        Err(missing) => {
            eprintln!("skipped: {missing} (.ci/run installs what the browser test needs)");
            return;
        }
    };

    // The real binary on the example config, whose skywards program has the sandbox
    // partner (members starting with "invalid" are rejected).
    let dir = tempfile::tempdir().expect("dir");
    let server = Binary::serve(&example_config(dir.path()));
    let token = server.token("demo-pos", "cosmo-demo-secret").await;
    let xss = "<img src=x onerror=alert(1)>";
    let issue = |program: &str, value: u64, user: &str, reference: &str| json!({"programId": program, "value": value, "userId": user, "referenceNumber": reference});
    let mut bodies = vec![
        issue("skywards", 3673, "EK1", "dash-issued"),
        issue("skywards", 1_000_000, "EK2", "dash-big"),
        issue("skywards", 3673, "invalid-3", "dash-failed"),
        issue("etihad-guest", 50_000, "EY4", "dash-other"),
        issue("hilton-honors", 2000, "HH5", "dash-xss"),
    ];
    bodies[4]["description"] = json!(xss);
    for body in &bodies {
        let r = request(
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
    // The sandbox answers at once: wait until the deliveries have settled.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = request(
            server.addr,
            Method::GET,
            "/v1/transactions?startDate=0000000000&endDate=9999999999&status=pending",
            Some(&token),
            None,
            &[],
        )
        .await;
        if r.json().as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "deliveries still pending");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let fixture = json!({
        "clientId": "demo-pos", "clientSecret": "cosmo-demo-secret",
        "issued": "dash-issued", "big": "dash-big", "failed": "dash-failed",
        "other": "dash-other", "otherProgram": "etihad-guest",
        "xss": "dash-xss", "xssText": xss,
    });
    // Screenshots go to the target folder (target/dashboard.png), kept after the run.
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target folder")
        .to_path_buf();
    let base = format!("http://{}", server.addr);
    let mut child = Command::new("node")
        .arg(&script)
        .arg(&base)
        .arg(&shots)
        .arg(fixture.to_string())
        .env("CHROMIUM", &chromium)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    let output = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(240);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().expect("output")
    })
    .await
    .expect("the waiting thread");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the browser test failed ({:?}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("checks passed") && !stdout.contains("not ok"),
        "{stdout}"
    );
    assert!(shots.join("dashboard.png").exists(), "the screenshot");
    drop(server);
}
