//! The HTTP server: accept loop, connection cap, timeouts, request ids, and graceful
//! shutdown. Knows hyper and tokio; not the database, not the routes:
//! what answers a request is the function it is given.
//!
//! Timeouts, each closing the connection: the request head must arrive within
//! `header_read_timeout` (hyper, on a timer that recycles its sleeps: [`timer`]; also the
//! idle keep-alive limit), a body within `body_read_timeout` (the router), and every
//! write to the client must make progress within `send_timeout` ([`WriteDeadline`]), so
//! that a client that stops reading cannot hold a connection slot for ever.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;

use crate::body::Body;
use crate::config::ServerConfig;

mod drain;
mod timer;

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
    // At most u32::MAX, so that the stop can wait for all of them in one `acquire_many`
    // (the config allows 2^20).
    let max_connections = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
    let permits = Arc::new(Semaphore::new(max_connections as usize));
    let drain = Arc::new(drain::Drain::default());
    // Should this future be dropped before its end, the connections are still told to
    // finish.
    let _stop_on_drop = drain::StopOnDrop(drain.clone());
    let ids = Arc::new(RequestIds::new());
    let mut http = http1::Builder::new();
    http.timer(timer::RecycledTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true)
        // While a request is in flight, hyper would otherwise poll the socket for an
        // early end of stream, and to do so reserve its read buffer while the request's
        // head still shares it: a fresh 8 KiB buffer for every request (3.6% of a GET's
        // CPU samples). Half-close support skips that poll. A client that goes away
        // mid-request is then seen at the response's write instead of before it; a
        // request is never cut short part-way anyway (an issue sent to the writer is
        // committed whether or not its client is still there).
        .half_close(true);
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
        let stream = WriteDeadline::new(stream, config.send_timeout);
        let connection = drain.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }

    // The connections are told first: once the listener is gone (a new client is refused),
    // every connection has been told to finish.
    drain.stop();
    drop(listener);
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    // Every connection holds a permit until its task ends: all of them back, all are done.
    tokio::select! {
        _ = permits.acquire_many(max_connections) => {}
        () = tokio::time::sleep(config.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; closing the remaining connections");
        }
    }
}

/// Request ids: 128 bits in hex that tell a client nothing about how many requests
/// others make. Each is a keyed pseudo-random function (SipHash, as std's `RandomState`
/// computes it, with keys the OS drew for this process) of a per-process counter, so ids
/// never repeat within a process and cost no system call (a `getrandom` per request was
/// a visible share of a GET's CPU).
struct RequestIds {
    keys: std::collections::hash_map::RandomState,
    counter: std::sync::atomic::AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        RequestIds {
            keys: std::collections::hash_map::RandomState::new(),
            counter: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        use std::hash::{BuildHasher, Hasher};
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut out = String::with_capacity(32);
        for half in 0..2u8 {
            let mut h = self.keys.build_hasher();
            h.write_u64(n);
            h.write_u8(half);
            let bits = h.finish();
            for shift in (0..16).rev() {
                let digit = ((bits >> (shift * 4)) & 0xf) as u32;
                out.push(char::from_digit(digit, 16).unwrap_or('0'));
            }
        }
        out
    }
}

/// A client's own `x-request-id` is kept if it is short, visible ASCII.
fn client_request_id(req: &Request<Incoming>) -> Option<String> {
    let value = req.headers().get(&X_REQUEST_ID)?.to_str().ok()?;
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
    let started = Instant::now();
    // The access log: gathered only when its line would be written (see `access`).
    let logging = crate::access::enabled();
    // Kept for the line: the method and the URI are cheap clones (no copy of the path).
    let asked = logging.then(|| (req.method().clone(), req.uri().clone()));
    // Boxed once here: the router's future is several KiB (the largest of its handlers'),
    // and every future that wraps it (the access log's scope, this one, hyper's
    // dispatcher) would otherwise hold and move its own copy (memcpy was a tenth of a GET's
    // CPU before). Any other line the request logs names its id (`access::WithRequestId`).
    let request = Box::pin(route(req, remote));
    let (mut response, line, id) = crate::access::gather(logging, id, request).await;
    if let Some((method, uri)) = asked {
        // Every value from the request reaches the log escaped: the method is a token,
        // the id visible ASCII (both checked by now), and the path is Debug-quoted.
        crate::access::write(&crate::access::Done {
            at: crate::clock::log_time(),
            id: &id,
            method: method.as_str(),
            path: uri.path(),
            line: &line,
            status: response.status().as_u16(),
            latency_us: started.elapsed().as_micros() as u64,
        });
    }
    // The id's own buffer becomes the header's (no copy), under a name made once.
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(id)) {
        response.headers_mut().insert(X_REQUEST_ID, value);
    }
    response
}

/// The header that carries a request's id in its response.
const X_REQUEST_ID: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("x-request-id");

/// A connection whose writes must make progress: once a write (or flush) cannot go on
/// because the client does not read, the client has `limit` to take some bytes, or the
/// write fails with `TimedOut` and hyper closes the connection. This holds for every
/// response, whole or streamed. Reads pass through untouched.
struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Armed when a write is first refused; cleared by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: Duration) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes on what the inner write said, keeping the deadline of a stalled write.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing for the send timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.check(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::RequestIds;

    #[test]
    fn request_ids_are_128_bit_hex_and_never_repeat() {
        let ids = RequestIds::new();
        let seen: std::collections::HashSet<String> = (0..100_000).map(|_| ids.next()).collect();
        assert_eq!(seen.len(), 100_000);
        for id in seen.iter().take(100) {
            assert_eq!(id.len(), 32);
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        // Another process (another key) makes other ids from the same counter values.
        let other = RequestIds::new();
        assert_ne!(RequestIds::new().next(), other.next());
    }
}
