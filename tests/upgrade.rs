//! Upgrades keep data: a database written by an earlier release opens in this one, is
//! migrated once, and every transaction and connection in it reads back unchanged.
//! One pinned file per released schema lives under `tests/data/schemaN/`, with the config
//! it was written with and what that release's API showed (`expected.json`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use common::{issue_body, TestServer};
use cosmopoints::config::Config;

/// Copies a pinned schema's folder into a fresh temp dir (tests never touch the original).
fn copy_pinned(schema: &str) -> Arc<tempfile::TempDir> {
    let dir = tempfile::tempdir().expect("dir");
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(schema);
    for name in ["config.toml", "cosmopoints.redb", "expected.json"] {
        std::fs::copy(source.join(name), dir.path().join(name)).expect("copy pinned file");
    }
    Arc::new(dir)
}

/// Every field the old release showed is shown again with the same value. Fields added
/// since may appear beside them.
fn assert_shows(old: &Value, new: &Value, at: &str) {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (key, value) in o {
                let shown = n
                    .get(key)
                    .unwrap_or_else(|| panic!("{at}.{key} is no longer shown"));
                assert_shows(value, shown, &format!("{at}.{key}"));
            }
        }
        (Value::Array(o), Value::Array(n)) => {
            assert_eq!(o.len(), n.len(), "{at}: a different number of entries");
            for (i, (o, n)) in o.iter().zip(n).enumerate() {
                assert_shows(o, n, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(old, new, "{at} changed"),
    }
}

/// Every business's listing, each transaction by id and by reference, its reversals, and
/// the end user's connections show what the old release showed. A file of schema 3 or
/// later also pinned each transaction by id and its reversals (`by_id`, `reversals`);
/// older files have none (no release before 0.3.0 could reverse).
async fn assert_reads_back(s: &TestServer, expected: &Value) {
    for (business, client, secret) in [
        ("acme", "acme-pos", "acme-secret"),
        ("globex", "globex-pos", "globex-secret"),
    ] {
        let token = s.token(client, secret).await;
        let listed = Value::Array(s.all_transactions(&token).await);
        assert_shows(
            &expected["transactions"][business],
            &listed,
            &format!("{business} listing"),
        );
        for tx in listed.as_array().expect("array") {
            let id = tx["id"].as_str().expect("id");
            let then = &expected["by_id"][business][id];
            for field in ["reversedValue", "reversedPoints"] {
                let reversed = then.get(field).cloned().unwrap_or(Value::from(0));
                assert_eq!(tx[field], reversed, "{business} {id} {field}");
            }
            let by_id = s.get(&format!("/v1/transactions/{id}"), Some(&token)).await;
            assert_eq!(by_id.json(), *tx, "by id");
            if !then.is_null() {
                assert_shows(then, &by_id.json(), &format!("{business} {id}"));
            }
            let reversals = s
                .get(&format!("/v1/transactions/{id}/reversals"), Some(&token))
                .await;
            assert_eq!(reversals.status, 200, "{}", reversals.text());
            let reversals_then = match &expected["reversals"][business][id] {
                Value::Null => Value::Array(Vec::new()),
                then => then.clone(),
            };
            assert_shows(
                &reversals_then,
                &reversals.json(),
                &format!("{business} {id} reversals"),
            );
            let reference = tx["referenceNumber"].as_str().expect("reference");
            let path = format!(
                "/v1/transactions/{}",
                cosmopoints::input::encode_component(reference)
            );
            assert_eq!(s.get(&path, Some(&token)).await.json(), *tx, "by reference");
        }
        let connections = s
            .get("/v1/program-connections?endUserId=eu-1", Some(&token))
            .await;
        assert_shows(
            &expected["connections"][business],
            &connections.json(),
            &format!("{business} connections"),
        );
    }
}

/// A fresh copy of the pinned file of `schema`: `check` reads it as it is, before anything
/// migrates it, and finds each of `check_says` and no problem; then this release starts on it with
/// the config it was written with, migrates it from schema `version`, and shows what the
/// old release showed. A backup of the migrated file is taken and checked: a table that a
/// migration left behind would fail every backup.
async fn open_pinned(
    schema: &str,
    version: u64,
    check_says: &[&str],
) -> (Arc<tempfile::TempDir>, PathBuf, Value, TestServer) {
    let dir = copy_pinned(schema);
    let config_path = dir.path().join("config.toml");
    let (code, out) = common::run_check(&config_path);
    assert_eq!(code, 0, "{out}");
    for said in check_says {
        assert!(out.contains(said), "{said}: {out}");
    }

    let expected: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("expected.json")).expect("expected.json"),
    )
    .expect("JSON");
    let config = Config::load(&config_path).expect("the old config still loads");
    let s = TestServer::start_with(dir.clone(), config, |_| {}).await;
    assert_eq!(s.app.store.migrated_from(), Some(version));
    assert_reads_back(&s, &expected).await;

    let backup = dir.path().join("after-upgrade.redb");
    let report = s.app.store.backup_to(&backup).await.expect("backup");
    let checked = cosmopoints::store::check_file(&backup).expect("the backup opens");
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    assert_eq!(checked.schema, cosmopoints::store::SCHEMA_VERSION);
    assert_eq!(checked.transactions, report.transactions);
    (dir, config_path, expected, s)
}

/// The old release's first issue (`inv-1` at acme) is replayed: 200 with its id.
async fn replays_the_first_issue(s: &TestServer, acme: &str, expected: &Value) {
    let replay = s
        .issue(
            acme,
            serde_json::json!({"programId": "skywards", "value": 3673, "userId": "EK100",
                               "referenceNumber": "inv-1"}),
        )
        .await;
    assert_eq!(replay.status, 200, "{}", replay.text());
    assert_eq!(
        replay.json()["id"],
        expected["transactions"]["acme"][0]["id"]
    );
}

/// `check` of the migrated file (server stopped) finds no problem and each of `says`,
/// under this release's schema.
fn assert_checks(config_path: &Path, says: &[&str]) {
    let (code, out) = common::run_check(config_path);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("schema {},", cosmopoints::store::SCHEMA_VERSION)),
        "{out}"
    );
    for said in says {
        assert!(out.contains(said), "{said}: {out}");
    }
}

#[tokio::test]
async fn a_schema_1_database_migrates_on_open_and_reads_back_unchanged() {
    let (dir, config_path, expected, s) = open_pinned("schema1", 1, &["24 transactions"]).await;

    // Idempotency holds across the upgrade: the old request replays, a new one is stored.
    let acme = s.acme().await;
    replays_the_first_issue(&s, &acme, &expected).await;
    let fresh = s.issue(&acme, issue_body("after-upgrade")).await;
    assert_eq!(fresh.status, 201, "{}", fresh.text());
    s.stop().await;
    assert_checks(&config_path, &["25 transactions"]);

    // A second start finds nothing to migrate.
    let config = Config::load(&config_path).expect("config");
    let s = TestServer::start_with(dir.clone(), config, |_| {}).await;
    assert_eq!(s.app.store.migrated_from(), None);
    assert_eq!(s.all_transactions(&s.acme().await).await.len(), 24);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_2_database_opens_and_reads_back_unchanged() {
    let (_dir, config_path, expected, s) =
        open_pinned("schema2", 2, &["schema 2, 18 transactions"]).await;

    // A transaction written by 0.2.0 can be reversed: its record gains the totals.
    let acme = s.acme().await;
    let id = expected["transactions"]["acme"][0]["id"]
        .as_str()
        .expect("id");
    let r = s
        .post(
            &format!("/v1/transactions/{id}/reversals"),
            Some(&acme),
            &serde_json::json!({"referenceNumber": "ret-1", "value": 1000}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    // And the old idempotency still holds.
    replays_the_first_issue(&s, &acme, &expected).await;
    s.stop().await;
    assert_checks(&config_path, &["18 transactions", "1 reversals"]);
}

#[tokio::test]
async fn a_schema_3_database_opens_and_reads_back_unchanged() {
    // Schema 4 dropped the date index: every listing now comes from the program-date one.
    let (_dir, config_path, expected, s) =
        open_pinned("schema3", 3, &["schema 3, 20 transactions", "6 reversals"]).await;

    // Its idempotency holds, for issues and for reversals.
    let acme = s.acme().await;
    replays_the_first_issue(&s, &acme, &expected).await;
    let id = expected["transactions"]["acme"][0]["id"]
        .as_str()
        .expect("id");
    let again = s
        .post(
            &format!("/v1/transactions/{id}/reversals"),
            Some(&acme),
            &serde_json::json!({"referenceNumber": "ret-1", "value": 1000,
                                "reason": "one item returned"}),
        )
        .await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(
        again.json()["id"],
        expected["reversals"]["acme"][id][0]["id"]
    );
    // What is left of it can still be reversed.
    let more = s
        .post(
            &format!("/v1/transactions/{id}/reversals"),
            Some(&acme),
            &serde_json::json!({"referenceNumber": "ret-5", "value": 100}),
        )
        .await;
    assert_eq!(more.status, 201, "{}", more.text());
    s.stop().await;
    assert_checks(&config_path, &["20 transactions", "7 reversals"]);
}

/// `cosmopoints migrate` copies a file of every released schema into PostgreSQL: the
/// source is left as it was, and the copy shows what the release showed, under the same
/// ids (the id key moves with the data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_each_released_schema_migrates_into_postgres() {
    if !common::pg::available_or_skip("a_database_of_each_released_schema_migrates_into_postgres") {
        return;
    }
    for (schema, count) in [("schema1", 24), ("schema2", 18), ("schema3", 20)] {
        let dir = copy_pinned(schema);
        let source = dir.path().join("cosmopoints.redb");
        let before = std::fs::read(&source).expect("pinned file");
        let url = common::pg::cluster().create_database();
        let text = std::fs::read_to_string(dir.path().join("config.toml")).expect("config");
        let pg_text = text.replace(
            "[storage]\npath = \"cosmopoints.redb\"\n",
            &common::pg::storage_section(&url),
        );
        assert_ne!(pg_text, text, "the pinned config changed shape");
        let pg_config = dir.path().join("postgres.toml");
        std::fs::write(&pg_config, pg_text).expect("write");

        let copy = || migrate(&source, &pg_config);
        let out = copy();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{schema}: {said}");
        assert!(said.contains(&format!("{count} transactions")), "{said}");
        assert_eq!(
            std::fs::read(&source).expect("source"),
            before,
            "{schema}: migrate changed its source"
        );
        // Into a database that has data already: refused, nothing changed.
        let again = copy();
        assert!(!again.status.success(), "{schema}: a second migrate ran");

        let (code, out) = common::run_check(&pg_config);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(&format!("{count} transactions")), "{out}");

        let expected: Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("expected.json")).expect("expected.json"),
        )
        .expect("JSON");
        let config = Config::load(&pg_config).expect("config");
        let s = TestServer::start_with(dir.clone(), config, |_| {}).await;
        assert_reads_back(&s, &expected).await;
        // The old idempotency holds in the copy.
        let acme = s.acme().await;
        let replay = s
            .issue(
                &acme,
                serde_json::json!({"programId": "skywards", "value": 3673, "userId": "EK100",
                                   "referenceNumber": "inv-1"}),
            )
            .await;
        assert_eq!(replay.status, 200, "{}", replay.text());
        assert_eq!(
            replay.json()["id"],
            expected["transactions"]["acme"][0]["id"]
        );
        s.stop().await;
    }
}

/// A file of this release with everything in it (a connection, transactions to members
/// and end users, credits completed, failed and waiting for a retry, a completed and a
/// held debit, merchant events) migrates whole: the copy answers every read as the file
/// did, a token the file's server signed still works, what was waiting goes on from where
/// it stood (no completed credit is sent again), and new rows take new ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_this_release_migrates_whole_with_its_deliveries() {
    use common::partner::{Behaviour, PartnerSim, SECRET};
    if !common::pg::available_or_skip(
        "a_database_of_this_release_migrates_whole_with_its_deliveries",
    ) {
        return;
    }
    let sim = PartnerSim::start().await;
    let merchant = PartnerSim::start().await;
    sim.set_member(
        "gone-1",
        Behaviour::Reject {
            status: 422,
            reason: "closed account".into(),
        },
    );
    sim.set_member("later-1", Behaviour::Unavailable { retry_after: None });
    let dir = Arc::new(tempfile::tempdir().expect("dir"));
    let text = common::config_text("db/cosmopoints.redb")
        .replace(
            "max_points = 1000000\n",
            &format!(
                "max_points = 1000000\n[programs.partner]\n{}retry_schedule_seconds = [5, 60]\n",
                sim.partner_toml()
            ),
        )
        .replace(
            "[[businesses]]\nid = \"globex\"",
            &format!(
                "[[businesses.webhooks]]\nurl = \"{}/hooks\"\nsecret = \"{SECRET}\"\n\
                 events = [\"transaction.completed\", \"transaction.failed\", \
                 \"reversal.completed\", \"reversal.failed\"]\n\
                 [[businesses]]\nid = \"globex\"",
                merchant.url()
            ),
        );
    // The source is a redb file, whichever backend the other suites run on.
    let config = Config::parse(&text, dir.path()).expect("config");
    let s = TestServer::start_with(dir.clone(), config, |_| {}).await;
    let acme = s.acme().await;
    let globex = s.globex().await;
    let link = serde_json::json!({"programId": "skywards", "endUserId": "carol",
                                  "destinationUserId": "EK-carol"});
    assert_eq!(
        s.put("/v1/program-connections", Some(&acme), &link)
            .await
            .status,
        201
    );
    let mut ids = Vec::new();
    for (token, body) in [
        (
            &acme,
            serde_json::json!({"programId": "skywards", "value": 100_000, "userId": "EK-1",
                               "referenceNumber": "inv-1"}),
        ),
        (
            &acme,
            serde_json::json!({"programId": "skywards", "value": 5_000, "userId": "gone-1",
                               "referenceNumber": "inv-2"}),
        ),
        (
            &acme,
            serde_json::json!({"programId": "skywards", "value": 7_000, "userId": "later-1",
                               "referenceNumber": "inv-3", "description": "café"}),
        ),
        (
            &acme,
            serde_json::json!({"programId": "skywards", "value": 9_000, "endUserId": "carol",
                               "referenceNumber": "inv-4"}),
        ),
        (
            &globex,
            serde_json::json!({"programId": "tiny", "value": 1_234, "userId": "G-1",
                               "referenceNumber": "g-1"}),
        ),
    ] {
        let r = s.issue(token, body).await;
        assert_eq!(r.status, 201, "{}", r.text());
        ids.push(r.json()["id"].as_str().expect("id").to_owned());
    }
    common::eventually("inv-1 completed", || async {
        status(&s, &acme, &ids[0]).await == "completed"
    })
    .await;
    common::eventually("inv-2 failed", || async {
        status(&s, &acme, &ids[1]).await == "failed"
    })
    .await;
    common::eventually("inv-3 tried once", || async {
        sim.attempts(&ids[2]).len() == 1
    })
    .await;
    let done = reverse(
        &s,
        &acme,
        &ids[0],
        serde_json::json!({"referenceNumber": "ret-1", "value": 40_000}),
    )
    .await;
    assert_eq!(done.status, 201, "{}", done.text());
    let done = done.json()["id"].as_str().expect("id").to_owned();
    let held = reverse(
        &s,
        &acme,
        &ids[2],
        serde_json::json!({"referenceNumber": "ret-3", "reason": "returned"}),
    )
    .await;
    assert_eq!(held.status, 201, "{}", held.text());
    let held = held.json()["id"].as_str().expect("id").to_owned();
    common::eventually("ret-1's debit", || async { sim.attempts(&done).len() == 1 }).await;
    // transaction.completed (inv-1, inv-4), transaction.failed (inv-2), reversal.completed.
    common::eventually("the merchant events", || async {
        merchant.requests().len() == 4
    })
    .await;

    // Everything a client can read, as the file's server shows it.
    let before = snapshot(&s, &acme, &globex, &ids, [&done, &held]).await;
    assert!(
        before.iter().all(|(_, status, _)| *status == 200),
        "{before:?}"
    );
    s.stop().await;
    let credits_before = sim.requests().len();

    let url = common::pg::cluster().create_database();
    let pg_text = text.replace(
        "[storage]\npath = \"db/cosmopoints.redb\"\n",
        &common::pg::storage_section(&url),
    );
    assert_ne!(pg_text, text);
    let pg_config = dir.path().join("postgres.toml");
    std::fs::write(&pg_config, &pg_text).expect("write");
    let out = migrate(&dir.path().join("db/cosmopoints.redb"), &pg_config);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for counted in ["5 transactions", "1 connections", "2 reversals"] {
        assert!(said.contains(counted), "{said}");
    }
    let (code, checked) = common::run_check(&pg_config);
    assert_eq!(code, 0, "{checked}");

    let config = Config::parse(&pg_text, dir.path()).expect("config");
    let s = TestServer::start_with(dir.clone(), config, |_| {}).await;
    // With a server connected, another copy is refused before anything is looked at.
    let again = migrate(&dir.path().join("db/cosmopoints.redb"), &pg_config);
    assert_eq!(again.status.code(), Some(2));
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("stop the servers first"), "{said}");
    assert!(!said.contains(&url), "the url was shown: {said}");
    // The tokens signed before still work: the signing key moved too.
    let after = snapshot(&s, &acme, &globex, &ids, [&done, &held]).await;
    for ((path, status, body), (_, status_after, body_after)) in before.iter().zip(&after) {
        assert_eq!(
            (status, body),
            (status_after, body_after),
            "{path} reads differently after the copy"
        );
    }
    // Nothing was due (the hand-set clock stands still): nothing was sent again.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(sim.requests().len(), credits_before);

    // The waiting credit's retry comes due and completes, then its held debit follows.
    sim.set_member("later-1", Behaviour::Accept);
    s.clock.set(s.clock.now() + 5);
    common::eventually("inv-3 completed", || async {
        status(&s, &acme, &ids[2]).await == "completed"
    })
    .await;
    common::eventually("ret-3's debit", || async { sim.attempts(&held).len() == 1 }).await;
    assert_eq!(
        sim.attempts(&ids[2]).len(),
        2,
        "the attempt count carried over"
    );
    assert_eq!(
        sim.attempts(&ids[0]).len(),
        1,
        "a completed credit was sent again"
    );
    // New rows go on from where the file's ended.
    let r = s
        .issue(
            &globex,
            serde_json::json!({"programId": "tiny", "value": 1, "userId": "x",
                                         "referenceNumber": "after-1"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(!ids.contains(&r.json()["id"].as_str().expect("id").to_owned()));
    let r = reverse(
        &s,
        &acme,
        &ids[3],
        serde_json::json!({"referenceNumber": "ret-4", "value": 1_000}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(![&done, &held].contains(&&r.json()["id"].as_str().expect("id").to_owned()));
    s.stop().await;
}

async fn status(s: &TestServer, token: &str, id: &str) -> String {
    s.get(&format!("/v1/transactions/{id}"), Some(token))
        .await
        .json()["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn reverse(s: &TestServer, token: &str, tx: &str, body: Value) -> common::Reply {
    s.post(
        &format!("/v1/transactions/{tx}/reversals"),
        Some(token),
        &body,
    )
    .await
}

/// What every read shows: (what, status, body).
async fn snapshot(
    s: &TestServer,
    acme: &str,
    globex: &str,
    ids: &[String],
    reversals: [&String; 2],
) -> Vec<(String, u16, String)> {
    let mut paths: Vec<(&str, String)> = Vec::new();
    for id in &ids[..4] {
        paths.push((acme, format!("/v1/transactions/{id}")));
        paths.push((acme, format!("/v1/transactions/{id}/reversals")));
    }
    paths.push((globex, format!("/v1/transactions/{}", ids[4])));
    for id in reversals {
        paths.push((acme, format!("/v1/reversals/{id}")));
    }
    paths.push((acme, "/v1/reversals/ret-3".to_owned()));
    paths.push((acme, "/v1/transactions/inv-3".to_owned()));
    paths.push((acme, "/v1/program-connections?endUserId=carol".to_owned()));
    let mut seen = Vec::new();
    for (token, path) in paths {
        let r = s.get(&path, Some(token)).await;
        seen.push((path, r.status, r.text()));
    }
    for (name, token) in [("acme", acme), ("globex", globex)] {
        let listed = Value::Array(s.all_transactions(token).await);
        seen.push((format!("{name} listing"), 200, listed.to_string()));
    }
    seen
}

/// `cosmopoints migrate --from source --config config`, run to its end.
fn migrate(source: &Path, config: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cosmopoints"))
        .args(["migrate", "--from"])
        .arg(source)
        .arg("--config")
        .arg(config)
        .output()
        .expect("migrate runs")
}
