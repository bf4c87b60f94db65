//! Group commit over real HTTP: many concurrent issuances sharing commits, with duplicate,
//! invalid and conflicting ones among them, each get their own right answer; the store
//! holds exactly the valid distinct ones with consistent indexes; a full queue is a 503.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{issue_body, TestServer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_concurrent_issuances_each_get_the_right_answer() {
    let s = TestServer::start().await;
    let token = s.acme().await;
    let mut before = HashMap::new();
    for k in 0..20 {
        let r = s.issue(&token, issue_body(&format!("pre{k}"))).await;
        assert_eq!(r.status, 201);
        before.insert(
            format!("pre{k}"),
            r.json()["id"].as_str().expect("id").to_owned(),
        );
    }
    // Sent all at once, so that they share commits: new ones, concurrent pairs of the same
    // new request, invalid ones, conflicts with and replays of earlier transactions.
    let (commits_before, writes_before) = s.app.store.commit_stats();
    let mut tasks = Vec::new();
    for i in 0..250 {
        let earlier = format!("pre{}", (i / 5) % 20);
        let (kind, body) = match i % 5 {
            0 => ("new", issue_body(&format!("n{i}"))),
            1 => ("new", issue_body(&format!("n{}", i - 1))),
            2 => {
                let mut body = issue_body(&format!("bad{i}"));
                body["value"] = json!(0);
                ("invalid", body)
            }
            3 => {
                let mut body = issue_body(&earlier);
                body["userId"] = json!("someone-else");
                ("conflict", body)
            }
            _ => ("replay", issue_body(&earlier)),
        };
        tasks.push((
            kind,
            body["referenceNumber"].as_str().expect("ref").to_owned(),
            common::spawn_issue(s.addr, &token, body),
        ));
    }
    let mut new_ids: HashMap<String, Vec<(u16, String)>> = HashMap::new();
    for (kind, reference, task) in tasks {
        let r = task.await.expect("task");
        match kind {
            "new" => {
                assert!(
                    r.status == 201 || r.status == 200,
                    "{reference}: {} {}",
                    r.status,
                    r.text()
                );
                new_ids
                    .entry(reference)
                    .or_default()
                    .push((r.status, r.json()["id"].as_str().expect("id").to_owned()));
            }
            "invalid" => {
                r.problem(400);
            }
            "conflict" => {
                let detail = r.problem(409);
                assert!(detail.contains("userId"), "{detail}");
            }
            _ => {
                assert_eq!(r.status, 200, "{reference}: {}", r.text());
                assert_eq!(r.json()["id"].as_str(), Some(before[&reference].as_str()));
            }
        }
    }
    // Each new reference: exactly one 201, and every answer names the same id.
    assert_eq!(new_ids.len(), 50);
    for (reference, answers) in &new_ids {
        assert_eq!(answers.len(), 2);
        assert_eq!(
            answers.iter().filter(|(status, _)| *status == 201).count(),
            1,
            "{reference}: {answers:?}"
        );
        assert_eq!(answers[0].1, answers[1].1, "{reference}");
    }
    // With 250 requests in flight at once, writes shared commits.
    let (commits, writes) = s.app.store.commit_stats();
    let (commits, writes) = (commits - commits_before, writes - writes_before);
    assert!(writes >= 50, "{writes}");
    assert!(
        commits < writes,
        "{commits} commits for {writes} writes: no group commit"
    );
    assert_eq!(s.all_transactions(&token).await.len(), 70);
    let report = s.app.store.check().expect("check");
    assert_eq!(
        (
            report.transactions,
            report.references,
            report.program_date_entries
        ),
        (70, 70, 70)
    );
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_queue_answers_503_and_stores_nothing_for_it() {
    let dir = Arc::new(tempfile::tempdir().expect("dir"));
    let s = TestServer::start_in(dir, |text| {
        text.replace("[server]\n", "[server]\nwrite_queue = 1\nmax_batch = 1\n")
    })
    .await;
    let token = s.acme().await;
    let tasks: Vec<_> = (0..300)
        .map(|i| common::spawn_issue(s.addr, &token, issue_body(&format!("q{i}"))))
        .collect();
    let mut statuses = HashMap::<u16, Vec<String>>::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let r = task.await.expect("task");
        if r.status == 503 {
            let detail = r.problem(503);
            assert!(detail.contains("retry"), "{detail}");
            assert_eq!(r.header("retry-after"), Some("1"));
        }
        statuses.entry(r.status).or_default().push(format!("q{i}"));
    }
    let refused = statuses.get(&503).cloned().unwrap_or_default();
    let created = statuses.get(&201).cloned().unwrap_or_default();
    assert!(
        !refused.is_empty(),
        "the queue never filled: {:?}",
        statuses.keys()
    );
    assert_eq!(refused.len() + created.len(), 300, "{:?}", statuses.keys());
    for reference in refused.iter().take(20) {
        s.get(&format!("/v1/transactions/{reference}"), Some(&token))
            .await
            .problem(404);
    }
    assert_eq!(s.all_transactions(&token).await.len(), created.len());
}
