//! The HTTP server: accept loop, connection cap, timeouts, per-request span and request
//! id, and graceful shutdown. Knows hyper and tokio; not the database, not the routes:
//! what answers a request is the function it is given.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::body::Body;
use crate::config::ServerConfig;

/// Serves `listener` with `route` until `shutdown` completes; then stops accepting and
/// lets in-flight requests finish (for at most the configured grace). Returns when the
/// last connection is done or cut.
pub async fn serve<R, F>(
    listener: TcpListener,
    config: &ServerConfig,
    route: R,
    shutdown: impl Future<Output = ()>,
) where
    R: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let graceful = GracefulShutdown::new();
    let ids = Arc::new(RequestIds::new());
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);

    loop {
        // Beyond the cap, new connections wait in the kernel's accept queue; the ones
        // being served are not slowed.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let route = route.clone();
        let ids = ids.clone();
        let service = service_fn(move |req| {
            let route = route.clone();
            let id = ids.next();
            async move { Ok::<_, Infallible>(handle(route, req, remote, id).await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }

    drop(listener);
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(config.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; closing the remaining connections");
        }
    }
}

/// Request ids: a random per-process prefix and a counter, cheap and unique enough to
/// find one request in the logs.
struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        let mut bytes = [0u8; 4];
        let _ = SystemRandom::new().fill(&mut bytes);
        RequestIds {
            prefix: u32::from_be_bytes(bytes),
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> String {
        format!(
            "{:08x}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// A client's own `x-request-id` is kept if it is short, visible ASCII.
fn client_request_id(req: &Request<Incoming>) -> Option<String> {
    let value = req.headers().get("x-request-id")?.to_str().ok()?;
    let ok = !value.is_empty() && value.len() <= 64 && value.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| value.to_owned())
}

async fn handle<R, F>(
    route: R,
    req: Request<Incoming>,
    remote: SocketAddr,
    id: String,
) -> Response<Body>
where
    R: Fn(Request<Incoming>, SocketAddr) -> F,
    F: Future<Output = Response<Body>>,
{
    let id = client_request_id(&req).unwrap_or(id);
    let span = tracing::info_span!(
        "request",
        id = %id,
        method = %req.method(),
        path = %req.uri().path(),
        // Recorded by the router, authentication, the handlers and the error mapper.
        remote = tracing::field::Empty,
        route = tracing::field::Empty,
        business = tracing::field::Empty,
        client = tracing::field::Empty,
        transaction = tracing::field::Empty,
        problem = tracing::field::Empty,
    );
    let started = Instant::now();
    let mut response = route(req, remote).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            latency_us = started.elapsed().as_micros() as u64,
            "done"
        )
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}
