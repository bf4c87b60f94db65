//! The server's drain: when the server stops, every connection is told to finish (its
//! request in flight, if any, then close).
//!
//! hyper-util's `GracefulShutdown` does this with a `watch` channel whose receiver each
//! connection polls on every one of its own polls; a receiver waiting for a change locks
//! the channel's one list of waiters, shared by all connections, each time (0.6–0.8% of a
//! GET's worker CPU samples on two cores, and one more contended lock for every poll of
//! every connection on more). Here a connection reads a flag on each poll and files its
//! waker once, under a lock, when first polled (again only if its task's waker changes);
//! [`Drain::stop`] sets the flag and wakes every filed connection.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::GracefulConnection;

/// The stop signal that the server's connections watch.
#[derive(Default)]
pub(super) struct Drain {
    stopping: AtomicBool,
    wakers: Mutex<Wakers>,
}

#[derive(Default)]
struct Wakers {
    next: u64,
    filed: HashMap<u64, Waker>,
    /// How many times a waker was filed, all connections together (for the tests: a
    /// connection's task files once, not on every poll).
    filings: u64,
}

impl Drain {
    /// `conn`, told to shut down gracefully once [`Drain::stop`] is called.
    pub(super) fn watch<C: GracefulConnection>(self: &Arc<Drain>, conn: C) -> Draining<C> {
        Draining {
            conn: Box::pin(conn),
            drain: self.clone(),
            filed: None,
            shutting_down: false,
        }
    }

    /// Tells every watched connection, now and later, to finish.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        // Taken out first: waking runs no code of the connections, but the lock need not
        // be held for it.
        let filed = std::mem::take(&mut self.wakers().filed);
        for waker in filed.into_values() {
            waker.wake();
        }
    }

    fn wakers(&self) -> MutexGuard<'_, Wakers> {
        // Nothing that holds the lock can panic part-way; a poisoned map is still whole.
        self.wakers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stops its drain when dropped: the server's accept loop holds one, so that its
/// connections are told to finish even if the loop's future is dropped before its end.
pub(super) struct StopOnDrop(pub(super) Arc<Drain>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A connection watched by a [`Drain`]: polls it, and starts its graceful shutdown on
/// the first poll after the stop. hyper then finishes a request it has begun to read (an
/// answer not yet begun says `connection: close`) and closes the connection after it,
/// and closes an idle connection at once. A second request on a keep-alive connection
/// that is only partly in when the stop comes is not answered: hyper counts the
/// connection idle until a whole head is in.
pub(super) struct Draining<C> {
    /// Boxed so that this wrapper is `Unpin` (one allocation per connection).
    conn: Pin<Box<C>>,
    drain: Arc<Drain>,
    /// The key and waker filed with the drain, until the stop takes them or this drops.
    filed: Option<(u64, Waker)>,
    shutting_down: bool,
}

impl<C> Draining<C> {
    fn file(&mut self, waker: &Waker) {
        let mut wakers = self.drain.wakers();
        let key = match self.filed.take() {
            Some((key, _)) => key,
            None => {
                wakers.next += 1;
                wakers.next
            }
        };
        wakers.filed.insert(key, waker.clone());
        wakers.filings += 1;
        self.filed = Some((key, waker.clone()));
    }

    fn unfile(&mut self) {
        if let Some((key, _)) = self.filed.take() {
            self.drain.wakers().filed.remove(&key);
        }
    }
}

impl<C: GracefulConnection> Future for Draining<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        if !this.shutting_down {
            let current = this
                .filed
                .as_ref()
                .is_some_and(|(_, waker)| waker.will_wake(cx.waker()));
            if !current {
                this.file(cx.waker());
            }
            // Read after filing: a stop before the filing is seen here, and one after it
            // finds the waker.
            if this.drain.stopping.load(Ordering::Acquire) {
                this.shutting_down = true;
                this.unfile();
                // Polled once first, so that a request already in the socket is read and
                // then answered (hyper closes at once a connection that has read nothing,
                // or whose keep-alive is idle).
                if let Poll::Ready(done) = this.conn.as_mut().poll(cx) {
                    return Poll::Ready(done);
                }
                this.conn.as_mut().graceful_shutdown();
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

impl<C> Drop for Draining<C> {
    fn drop(&mut self) {
        self.unfile();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A real hyper connection over an in-memory pipe, and the client's end of it.
    fn connection() -> (
        impl GracefulConnection<Output = Result<(), hyper::Error>>,
        tokio::io::DuplexStream,
    ) {
        let (client, server) = tokio::io::duplex(4096);
        let service = service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(String::from("ok")))
        });
        let conn = http1::Builder::new().serve_connection(TokioIo::new(server), service);
        (conn, client)
    }

    fn filed(drain: &Drain) -> usize {
        drain.wakers().filed.len()
    }

    fn filings(drain: &Drain) -> u64 {
        drain.wakers().filings
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_task_files_its_waker_once_for_all_its_requests() {
        let drain = Arc::new(Drain::default());
        let (conn, mut client) = connection();
        let task = tokio::spawn(drain.watch(conn));
        for _ in 0..50 {
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .expect("request");
            let mut answer = Vec::new();
            while !answer.ends_with(b"ok") {
                let mut chunk = [0u8; 512];
                let n = client.read(&mut chunk).await.expect("answer");
                assert!(n > 0, "closed");
                answer.extend_from_slice(&chunk[..n]);
            }
        }
        assert_eq!(filings(&drain), 1, "filed again on a later poll");
        drop(client);
        let _ = task.await.expect("task");
        assert_eq!(filed(&drain), 0);
    }

    #[tokio::test]
    async fn a_connection_takes_its_waker_back_when_it_ends() {
        let drain = Arc::new(Drain::default());
        let (conn, mut client) = connection();
        let mut watched = drain.watch(conn);
        let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut watched).poll(cx).is_pending()));
        assert!(polled.await, "an idle connection waits");
        assert_eq!(filed(&drain), 1);
        let task = tokio::spawn(watched);
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("answer");
        assert!(
            answer.ends_with(b"ok"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        task.await.expect("task").expect("a clean end");
        assert_eq!(
            filed(&drain),
            0,
            "a finished connection leaves nothing behind"
        );
    }

    #[tokio::test]
    async fn stop_wakes_an_idle_connection_which_then_closes() {
        let drain = Arc::new(Drain::default());
        let (conn, mut client) = connection();
        let task = tokio::spawn(drain.watch(conn));
        // Let it be polled and wait, idle.
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(filed(&drain), 1);
        drain.stop();
        assert_eq!(filed(&drain), 0, "the stop took the waker");
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the stop reached the idle connection")
            .expect("task")
            .expect("a clean end");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("closed");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_request_already_sent_when_the_stop_comes_is_answered() {
        let drain = Arc::new(Drain::default());
        let (conn, mut client) = connection();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("request");
        drain.stop();
        tokio::time::timeout(std::time::Duration::from_secs(5), drain.watch(conn))
            .await
            .expect("ends")
            .expect("a clean end");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("answer");
        let answer = String::from_utf8_lossy(&answer);
        // Answered (here within the first poll, before the shutdown began: so without
        // `connection: close`), and then closed: `read_to_end` returned.
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
    }

    #[tokio::test]
    async fn dropping_the_guard_stops_the_drain() {
        let drain = Arc::new(Drain::default());
        let guard = StopOnDrop(drain.clone());
        let (conn, _client) = connection();
        let task = tokio::spawn(drain.watch(conn));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(guard);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the idle connection was told to finish")
            .expect("task")
            .expect("a clean end");
    }

    #[tokio::test]
    async fn a_connection_first_polled_after_the_stop_shuts_down_at_once() {
        let drain = Arc::new(Drain::default());
        drain.stop();
        let (conn, _client) = connection();
        tokio::time::timeout(std::time::Duration::from_secs(5), drain.watch(conn))
            .await
            .expect("it did not wait for a request")
            .expect("a clean end");
        assert_eq!(filed(&drain), 0);
    }
}
