//! Scale-out on PostgreSQL: several real server processes (the binary) on one database
//! are one service. A throwaway PostgreSQL cluster is started by the tests themselves
//! (`common::pg`); without PostgreSQL's binaries these tests print "skipped", except
//! under CI, where they fail.
//!
//! The integration suites themselves run on Postgres too, through the same harness
//! (`COSMOPOINTS_TEST_BACKEND=postgres`, see README); this file holds what only several
//! processes, or an outage, can show.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use common::partner::PartnerSim;
use common::{config_text, issue_body, pg, request, try_request, Binary};
use hyper::Method;
use serde_json::{json, Value};

/// A config file in `dir` for a fresh database of `cluster`, with `edit` applied to the
/// test config text.
fn config_on(
    cluster: &pg::Cluster,
    dir: &std::path::Path,
    edit: impl FnOnce(String) -> String,
) -> std::path::PathBuf {
    let url = cluster.create_database();
    let text = edit(config_text("unused.redb")).replace(
        "[storage]\npath = \"unused.redb\"\n",
        &pg::storage_section(&url),
    );
    assert!(text.contains("backend = \"postgres\""));
    let path = dir.join("cosmopoints.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

async fn post(addr: SocketAddr, path: &str, token: &str, body: &Value) -> common::Reply {
    request(
        addr,
        Method::POST,
        path,
        Some(token),
        Some(body.to_string().into_bytes()),
        &[("content-type", "application/json")],
    )
    .await
}

async fn get(addr: SocketAddr, path: &str, token: &str) -> common::Reply {
    request(addr, Method::GET, path, Some(token), None, &[]).await
}

async fn listing(addr: SocketAddr, token: &str) -> Vec<Value> {
    let r = get(
        addr,
        "/v1/transactions?startDate=0000000000&endDate=9999999999",
        token,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().as_array().expect("array").clone()
}

#[test]
fn two_processes_share_tokens_and_make_one_transaction_of_64_identical_requests() {
    if !pg::available_or_skip("two_processes_share_tokens…") {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let config = config_on(pg::cluster(), dir.path(), |t| t);
    let (a, b) = (Binary::serve(&config), Binary::serve(&config));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // A token minted by one process is accepted by the other: the signing key lives
        // in the database.
        let token = a.token("acme-pos", "acme-secret").await;
        let profile = get(b.addr, "/v1/profile", &token).await;
        assert_eq!(profile.status, 200, "{}", profile.text());
        let other = b.token("globex-pos", "globex-secret").await;
        assert_eq!(get(a.addr, "/v1/profile", &other).await.status, 200);

        // 64 identical requests at once, half to each process.
        let body = issue_body("same-everywhere");
        let replies: Vec<common::Reply> = futures_join(
            (0..64)
                .map(|i| {
                    let addr = if i % 2 == 0 { a.addr } else { b.addr };
                    let (token, body) = (token.clone(), body.clone());
                    tokio::spawn(async move { post(addr, "/v1/transactions", &token, &body).await })
                })
                .collect(),
        )
        .await;
        let created = replies.iter().filter(|r| r.status == 201).count();
        let replayed = replies.iter().filter(|r| r.status == 200).count();
        assert_eq!(
            (created, replayed),
            (1, 63),
            "{:?}",
            replies.iter().map(|r| r.status).collect::<Vec<_>>()
        );
        let ids: BTreeSet<String> = replies
            .iter()
            .map(|r| r.json()["id"].as_str().expect("id").to_owned())
            .collect();
        assert_eq!(ids.len(), 1, "one transaction: {ids:?}");
        assert_eq!(listing(a.addr, &token).await.len(), 1);
        assert_eq!(listing(b.addr, &token).await.len(), 1);
        // Ids are the same on both: the id key is shared too.
        let id = ids.into_iter().next().expect("id");
        let path = format!("/v1/transactions/{id}");
        assert_eq!(get(a.addr, &path, &token).await.json()["id"], id);
        assert_eq!(get(b.addr, &path, &token).await.json()["id"], id);
    });
    let (code, out) = common::run_check(&config);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 transactions"), "{out}");
}

async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.expect("task"));
    }
    out
}

#[test]
fn kill_9_of_one_process_under_load_loses_nothing_acknowledged() {
    if !pg::available_or_skip("kill_9_of_one_process…") {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let config = config_on(pg::cluster(), dir.path(), |t| t);
    let (mut a, b) = (Binary::serve(&config), Binary::serve(&config));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (a_addr, b_addr) = (a.addr, b.addr);
    let token = rt.block_on(a.token("acme-pos", "acme-secret"));
    // Eight clients issue without pause, alternating between the processes; one of them
    // is killed while they do. Every answered request is recorded.
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let token = token.clone();
            rt.spawn(async move {
                let mut acknowledged = BTreeMap::new();
                for i in 0..400 {
                    let addr = if i % 2 == 0 { a_addr } else { b_addr };
                    let reference = format!("c{c}-{i}");
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
                            acknowledged.insert(reference, r.json()["id"].clone());
                        } else {
                            assert!(r.status == 503, "{}: {}", r.status, r.text());
                        }
                    }
                }
                acknowledged
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(700));
    a.kill9();
    let acknowledged: BTreeMap<String, Value> = rt.block_on(async {
        let mut all = BTreeMap::new();
        for client in clients {
            all.extend(client.await.expect("client"));
        }
        all
    });
    assert!(
        acknowledged.len() > 100,
        "only {} acknowledged",
        acknowledged.len()
    );
    rt.block_on(async {
        let stored: BTreeMap<String, Value> = listing(b_addr, &token)
            .await
            .into_iter()
            .map(|tx| {
                (
                    tx["referenceNumber"].as_str().expect("ref").to_owned(),
                    tx["id"].clone(),
                )
            })
            .collect();
        for (reference, id) in &acknowledged {
            assert_eq!(stored.get(reference), Some(id), "{reference} lost");
        }
        eprintln!(
            "{} acknowledged, {} stored",
            acknowledged.len(),
            stored.len()
        );
    });
    let (code, out) = common::run_check(&config);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_outbox_sends_each_job_once() {
    if !pg::available_or_skip("a_shared_outbox_sends_each_job_once") {
        return;
    }
    let partner = PartnerSim::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let partner_lines = partner.partner_toml();
    let config = config_on(pg::cluster(), dir.path(), |t| {
        t.replace(
            "max_points = 1000000\n",
            &format!("max_points = 1000000\n[programs.partner]\n{partner_lines}\n"),
        )
    });
    let (a, b) = (Binary::serve(&config), Binary::serve(&config));
    let token = a.token("acme-pos", "acme-secret").await;
    let mut ids = Vec::new();
    for i in 0..120 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let r = post(
            addr,
            "/v1/transactions",
            &token,
            &issue_body(&format!("d-{i}")),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
        ids.push(r.json()["id"].as_str().expect("id").to_owned());
    }
    common::eventually("every credit completed", || async {
        listing(a.addr, &token)
            .await
            .iter()
            .all(|tx| tx["status"] == "completed")
    })
    .await;
    // Each credit reached the partner exactly once: both processes deliver from one
    // outbox, and neither sent a job the other had claimed.
    let requests = partner.requests();
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for r in &requests {
        *per_id.entry(r.webhook_id.clone()).or_default() += 1;
    }
    assert_eq!(per_id.len(), 120, "every transaction was sent");
    let twice: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    for id in &ids {
        let tx = get(b.addr, &format!("/v1/transactions/{id}"), &token).await;
        assert_eq!(tx.json()["delivery"]["attempts"], 1, "{}", tx.text());
    }
}

#[test]
fn batches_that_cross_in_opposite_orders_on_two_processes_never_fail() {
    if !pg::available_or_skip("batches_that_cross…") {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let config = config_on(pg::cluster(), dir.path(), |t| t);
    let (a, b) = (Binary::serve(&config), Binary::serve(&config));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let token = a.token("acme-pos", "acme-secret").await;
        for round in 0..6 {
            // The same 200 references, one batch in each order, at once on the two
            // processes: their inserts wait on each other (a deadlock for PostgreSQL to
            // break), which the server retries rather than answering 500.
            let items: Vec<Value> = (0..200)
                .map(|i| issue_body(&format!("r{round}-{i}")))
                .collect();
            let reversed: Vec<Value> = items.iter().rev().cloned().collect();
            let (ta, tb) = (token.clone(), token.clone());
            let one = tokio::spawn(async move {
                post(
                    a.addr,
                    "/v1/transactions/batch",
                    &ta,
                    &json!({ "items": items }),
                )
                .await
            });
            let other = tokio::spawn(async move {
                post(
                    b.addr,
                    "/v1/transactions/batch",
                    &tb,
                    &json!({ "items": reversed }),
                )
                .await
            });
            let (one, other) = (one.await.expect("a"), other.await.expect("b"));
            let mut created = 0;
            for r in [&one, &other] {
                assert_eq!(r.status, 200, "{}", r.text());
                for result in r.json()["results"].as_array().expect("results") {
                    let status = result["status"].as_u64().expect("status");
                    assert!(status == 201 || status == 200, "{result}");
                    created += usize::from(status == 201);
                }
            }
            assert_eq!(created, 200, "each reference made once");
        }
        assert_eq!(listing(b.addr, &token).await.len(), 1200);
    });
}

#[test]
fn a_lost_database_gives_503_and_the_server_recovers_without_a_restart() {
    if !pg::available_or_skip("a_lost_database_gives_503…") {
        return;
    }
    // A cluster of this test's own, since it is stopped and started.
    let cluster = pg::Cluster::start();
    let dir = tempfile::tempdir().expect("dir");
    let config = config_on(&cluster, dir.path(), |t| t);
    let server = Binary::serve(&config);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let token = server.token("acme-pos", "acme-secret").await;
        let first = post(
            server.addr,
            "/v1/transactions",
            &token,
            &issue_body("before"),
        )
        .await;
        assert_eq!(first.status, 201, "{}", first.text());

        cluster.stop();
        for path in [
            "/v1/transactions/before",
            "/v1/transactions?startDate=0000000000&endDate=9999999999",
        ] {
            let r = get(server.addr, path, &token).await;
            r.problem(503);
        }
        let r = post(
            server.addr,
            "/v1/transactions",
            &token,
            &issue_body("during"),
        )
        .await;
        r.problem(503);
        let health = request(server.addr, Method::GET, "/healthz", None, None, &[]).await;
        assert_ne!(health.status, 200, "{}", health.text());

        cluster.resume();
        common::eventually("writes work again", || async {
            post(
                server.addr,
                "/v1/transactions",
                &token,
                &issue_body("after"),
            )
            .await
            .status
                == 201
        })
        .await;
        let r = get(server.addr, "/v1/transactions/before", &token).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["id"], first.json()["id"]);
        let refs: Vec<Value> = listing(server.addr, &token)
            .await
            .iter()
            .map(|tx| tx["referenceNumber"].clone())
            .collect();
        assert_eq!(
            refs,
            [json!("before"), json!("after")],
            "the 503 wrote nothing"
        );
    });
    assert!(
        server
            .stderr
            .lock()
            .expect("lines")
            .iter()
            .all(|l| !l.contains("panicked")),
        "no panic"
    );
}
