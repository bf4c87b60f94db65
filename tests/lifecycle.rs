//! The lifecycle owner stops things in order: the API stops accepting, in-flight requests
//! finish, background tasks stop while the store still takes writes, then the writer is
//! flushed and the store closed (the file is released).

mod common;

use std::sync::{Arc, Mutex};

use common::{issue_body, TestServer};
use cosmopoints::store::Issued;

/// Whether the API still accepted connections, and what the write came to.
type Seen = (bool, Result<Issued, cosmopoints::store::StoreError>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_task_sees_the_stop_before_the_store_closes() {
    let dir = Arc::new(tempfile::tempdir().expect("dir"));
    let text = common::config_text("db/cosmopoints.redb");
    let config = cosmopoints::config::Config::parse(&text, dir.path()).expect("config");
    // What the task saw when it was told to stop: whether the API still answered, and
    // what its last write came to.
    let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
    let record = seen.clone();
    let addr_slot: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::default();
    let addr_for_task = addr_slot.clone();
    let s = TestServer::start_with(dir.clone(), config, move |service| {
        service.background("test-writer", move |app, mut stopping| async move {
            stopping.wait().await;
            let addr = addr_for_task.lock().expect("lock").expect("address set");
            let api_open = tokio::net::TcpStream::connect(addr).await.is_ok();
            let outcome = app
                .store
                .issue(common::store_issue("written-while-stopping", None))
                .await;
            *record.lock().expect("lock") = Some((api_open, outcome));
        });
    })
    .await;
    *addr_slot.lock().expect("lock") = Some(s.addr);
    let token = s.acme().await;
    assert_eq!(s.issue(&token, issue_body("before-stop")).await.status, 201);
    let app = s.app.clone();
    s.stop().await;

    let (api_open, outcome) = seen.lock().expect("lock").take().expect("the task ran");
    assert!(
        !api_open,
        "the API still accepted connections when background tasks stopped"
    );
    assert!(
        matches!(outcome, Ok(Issued::Created(_))),
        "a write made while stopping was refused: {outcome:?}"
    );
    // The store is closed: reads fail, and the file is free for another process.
    assert!(app.store.ping().await.is_err());
    let path = dir.path().join("db/cosmopoints.redb");
    let report = cosmopoints::store::check_file(&path).expect("the file is released");
    assert_eq!(report.transactions, 2, "{report:?}");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
