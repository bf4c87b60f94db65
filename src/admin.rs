//! The admin listener's endpoints, for the operator and their monitoring; served on
//! `[admin] listen`, never on the API's address, and not part of the public API document.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET, HEAD | /metrics | Prometheus text format (see [`crate::metrics`]) |
//! | GET, HEAD | /readyz | 200 when the store answers and the server is not shutting down, else 503 |
//! | GET | /backup | a consistent snapshot of the database, streamed as a redb file |
//!
//! The match below is the truth. No authentication: whoever reaches this address is the
//! operator (bind it to localhost or a private network). A backup is made from one read
//! transaction into a new owner-only file beside the database (same file system, where the
//! server may write), which is unlinked as soon as it is open for streaming: it leaves no
//! copy behind, and writes go on meanwhile.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{mpsc, Semaphore};

use crate::api::Reply;
use crate::app::App;
use crate::body::{self, Body};
use crate::error::Error;
use crate::metrics::Scraped;

/// Bytes per chunk of a streamed backup.
const CHUNK: usize = 256 * 1024;

/// What the admin endpoints share.
pub struct Admin {
    app: Arc<App>,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    stopping: Arc<AtomicBool>,
    /// One backup at a time: each holds a read snapshot and a file as large as the data.
    backups: Semaphore,
}

impl Admin {
    pub fn new(app: Arc<App>, stopping: Arc<AtomicBool>) -> Admin {
        Admin {
            app,
            stopping,
            backups: Semaphore::new(1),
        }
    }
}

pub async fn route(
    admin: Arc<Admin>,
    req: Request<Incoming>,
    remote: SocketAddr,
) -> Response<Body> {
    let path = req.uri().path();
    crate::access::record(|line| {
        line.remote = Some(remote);
        line.route = Some(format!("admin {path:?}").into());
    });
    dispatch(&admin, req.method(), path)
        .await
        .unwrap_or_else(Error::into_response)
}

async fn dispatch(admin: &Admin, method: &Method, path: &str) -> Reply {
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/metrics") => metrics(admin).await,
        (_, "/metrics") => Err(Error::MethodNotAllowed("GET, HEAD")),
        (&Method::GET | &Method::HEAD, "/readyz") => ready(admin).await,
        (_, "/readyz") => Err(Error::MethodNotAllowed("GET, HEAD")),
        // Not HEAD: a snapshot is costly to make and HEAD would throw it away.
        (&Method::GET, "/backup") => backup(admin).await,
        (_, "/backup") => Err(Error::MethodNotAllowed("GET")),
        _ => Err(Error::NotFound(format!(
            "there is no admin endpoint at {path}; there are /metrics, /readyz and /backup"
        ))),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn metrics(admin: &Admin) -> Reply {
    let store = &admin.app.store;
    // A store that cannot be read still has its counters worth scraping.
    let (outbox_depth, outbox_oldest_due) = store.outbox_depth().await.unwrap_or((0, None));
    let encoded = admin.app.metrics.encode(Scraped {
        now: admin.app.clock.now(),
        write_queue: store.write_queue_depth(),
        listings: store.running_listings(),
        outbox_depth,
        outbox_oldest_due,
    });
    match encoded {
        Ok(body) => Ok(text(StatusCode::OK, crate::metrics::CONTENT_TYPE, body)),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the metrics");
            Err(Error::Internal)
        }
    }
}

async fn ready(admin: &Admin) -> Reply {
    let (status, body) = if admin.stopping.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if admin.app.store.ping().await.is_err() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the database does not answer\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    };
    Ok(text(status, "text/plain; charset=utf-8", body))
}

async fn backup(admin: &Admin) -> Reply {
    if !admin.app.store.is_embedded() {
        return Err(Error::StateConflict(
            "backups here are of a redb database file; this server's database is PostgreSQL: \
             back it up with pg_dump"
                .into(),
        ));
    }
    let Ok(permit) = admin.backups.try_acquire() else {
        return Err(Error::Overloaded { retry_after: 10 });
    };
    let storage = &admin.app.config.storage_path;
    let folder = storage
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let path = folder.join(format!(
        ".cosmopoints-backup-{}.redb",
        crate::store::random_suffix()
    ));
    let started = std::time::Instant::now();
    let report = admin.app.store.backup_to(&path).await?;
    let opened = std::fs::File::open(&path);
    // Unlinked at once: the open file streams on, and nothing is left behind if the
    // client goes away or the process dies.
    let _ = std::fs::remove_file(&path);
    drop(permit);
    let file = opened.map_err(|e| {
        tracing::error!(error = %e, "cannot reopen the backup file");
        Error::Unavailable
    })?;
    tracing::info!(
        transactions = report.transactions,
        bytes = report.bytes,
        ms = started.elapsed().as_millis() as u64,
        "backup snapshot made; streaming it"
    );
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let complete = Arc::new(AtomicBool::new(false));
    let completed = complete.clone();
    let size = report.bytes;
    tokio::task::spawn_blocking(move || stream_file(file, size, &tx, &completed));
    let mut response = Response::new(body::channel(None, rx, complete));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CONTENT_LENGTH, HeaderValue::from(size));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"cosmopoints-backup.redb\""),
    );
    headers.insert(
        "x-cosmopoints-transactions",
        HeaderValue::from(report.transactions),
    );
    Ok(response)
}

/// Sends `size` bytes of `file` in chunks; marks the stream complete only if all of them
/// went. A client that stops reading is cut off by the server's send timeout, which drops
/// the receiver and ends this loop.
fn stream_file(
    mut file: std::fs::File,
    size: u64,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
    complete: &AtomicBool,
) {
    use std::io::Read;
    let mut sent = 0u64;
    while sent < size {
        let mut buf = vec![0u8; CHUNK.min((size - sent) as usize)];
        match file.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot read the backup file");
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
        sent += buf.len() as u64;
        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
            tracing::info!("backup abandoned: the client went away");
            return;
        }
    }
    complete.store(true, Ordering::Release);
}
