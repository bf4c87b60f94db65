//! Slow and greedy clients: header and body read timeouts, idle keep-alive, and the
//! connection cap, shown with real sockets against the real server.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start(max_connections: u32) -> TestServer {
    let dir = Arc::new(tempfile::tempdir().expect("dir"));
    TestServer::start_in(dir, |text| {
        text.replace(
            "[server]\n",
            &format!(
                "[server]\nheader_read_timeout_seconds = 1\nbody_read_timeout_seconds = 1\nmax_connections = {max_connections}\n"
            ),
        )
    })
    .await
}

/// Reads until the peer closes (or `limit` passes); returns what arrived.
/// A new connection to `addr` on which `bytes` were sent.
async fn sending(addr: std::net::SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("send");
    stream
}

async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut buf = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut buf)).await {
        Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn slow_header_senders_are_cut_off_and_do_not_slow_others() {
    let s = start(64).await;
    let mut slow = Vec::new();
    for _ in 0..40 {
        let stream = sending(s.addr, b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await;
        slow.push(stream);
    }
    let started = Instant::now();
    let r = s.get("/healthz", None).await;
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "a normal client waited on slow ones"
    );
    for stream in &mut slow {
        let closed = read_until_closed(stream, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "a slow header sender was never cut off");
    }
}

#[tokio::test]
async fn a_body_that_does_not_arrive_gets_408() {
    let s = start(64).await;
    let token = s.acme().await;
    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    let head = format!(
        "POST /v1/transactions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"value\""
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let reply = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("application/problem+json"), "{reply}");
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let s = start(64).await;
    let mut stream = sending(s.addr, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.expect("response");
    assert_eq!(&first, b"HTTP/1.1 200");
    // Then nothing: the server closes the idle connection.
    let rest = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(rest.is_some(), "an idle keep-alive connection stayed open");
}

/// One whole answer (head and `content-length` body), or `None` if the server closed.
async fn read_answer(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().expect("content-length"));
            if buf.len() >= end + 4 + length {
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The header timeout's sleeps are recycled from request to request (`server/timer.rs`):
/// a keep-alive connection whose requests come within the timeout of each other stays
/// open for several timeouts in all, and is still closed once it goes quiet, not before
/// the timeout.
#[tokio::test]
async fn a_connection_that_keeps_sending_in_time_outlives_the_timeout_and_is_closed_when_quiet() {
    let s = start(64).await;
    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    let started = Instant::now();
    let mut last_sent = started;
    // Ten requests 300 ms apart: 2.7 s on one connection, against a 1 s header timeout.
    for n in 0..10 {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        last_sent = Instant::now();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("request");
        let answer = read_answer(&mut stream)
            .await
            .unwrap_or_else(|| panic!("request {n}: closed after {:?}", started.elapsed()));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let rest = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(rest.is_some(), "the quiet connection stayed open");
    // The server armed its timeout after answering, so after the last request was sent.
    assert!(
        last_sent.elapsed() >= Duration::from_secs(1),
        "closed {:?} after the last request, before the 1 s timeout",
        last_sent.elapsed()
    );
}

#[tokio::test]
async fn beyond_the_connection_cap_new_clients_wait_their_turn() {
    let s = start(4).await;
    let mut hogs = Vec::new();
    for _ in 0..4 {
        let stream = sending(s.addr, b"GET /healthz HTTP/1.1\r\n").await;
        hogs.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The fifth is accepted by the kernel but served only when a slot frees up (here when
    // the header timeout cuts a hog off), not refused and not lost.
    let started = Instant::now();
    let r = s.get("/healthz", None).await;
    assert_eq!(r.status, 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "served beyond the cap after {waited:?}"
    );
    drop(hogs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_listing_is_cut_off() {
    let dir = Arc::new(tempfile::tempdir().expect("dir"));
    let s = TestServer::start_in(dir, |text| {
        text.replace("[server]\n", "[server]\nsend_timeout_seconds = 1\n")
    })
    .await;
    // Enough transactions that the listing outgrows every socket buffer on the way.
    let mut pending = Vec::new();
    for i in 0..20_000 {
        let app = s.app.clone();
        pending.push(tokio::spawn(async move {
            app.store
                .issue(common::store_issue(
                    &format!("slow-{i}"),
                    Some(&"x".repeat(200)),
                ))
                .await
                .expect("stored")
        }));
        if pending.len() == 1000 {
            for p in pending.drain(..) {
                p.await.expect("task");
            }
        }
    }
    for p in pending {
        p.await.expect("task");
    }
    let token = s.acme().await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let mut stream = socket.connect(s.addr).await.expect("connect");
    let request = format!(
        "GET /v1/transactions?startDate=0000000000&endDate=9999999999 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut start = [0u8; 1024];
    stream
        .read_exact(&mut start)
        .await
        .expect("the start of the listing");
    assert!(start.starts_with(b"HTTP/1.1 200"));
    assert_eq!(s.app.store.running_listings(), 1, "the listing is running");
    // The client stops reading: after the send timeout the server lets go.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        s.app.store.running_listings(),
        0,
        "the listing still holds its slot"
    );
    // What the client then reads is a broken transfer, never a complete-looking array.
    let mut rest = Vec::new();
    let outcome =
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(outcome.is_ok(), "the connection was not closed");
    // A whole listing ends with `}}}]` and the last chunk `0\r\n\r\n`; a cut one has neither.
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a cut listing ended like a whole one"
    );
    assert!(
        !text.contains("}}}]"),
        "a cut listing ended like a whole one"
    );
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    // HTTP/1.1 lets a client shut down its sending side once its request is out. The
    // issue must then be answered, not dropped with the connection: a client left
    // without an answer cannot tell whether its points were issued.
    let s = start(64).await;
    let token = s.acme().await;
    let body = common::issue_body("half-closed").to_string();
    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    let request = format!(
        "POST /v1/transactions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("request");
    stream.shutdown().await.expect("half-close");
    let reply = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("the connection is closed after the answer");
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    assert!(
        reply.contains("\"referenceNumber\":\"half-closed\""),
        "{reply}"
    );
    let stored = s.get("/v1/transactions/half-closed", Some(&token)).await;
    assert_eq!(stored.status, 200, "{}", stored.text());
}

/// A stop reaches idle keep-alive connections at once: they are closed and the server
/// is done long before the header timeout or the shutdown grace (both 60 s here), while
/// a request in flight at the stop still gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_idle_keep_alive_connections_at_once() {
    let dir = Arc::new(tempfile::tempdir().expect("dir"));
    let s = TestServer::start_in(dir, |text| {
        text.replace(
            "[server]\n",
            "[server]\nheader_read_timeout_seconds = 60\nshutdown_grace_seconds = 60\n",
        )
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        let mut stream = sending(s.addr, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let answer = read_answer(&mut stream).await.expect("an answer");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        idle.push(stream);
    }
    // One more connection, with a request half sent when the stop comes.
    let mut busy = sending(s.addr, b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = s.addr;
    let stop = tokio::spawn(s.stop());
    // The server tells its connections to finish, then drops its listener: once a new
    // connection is refused, the stop has reached the connections.
    let refused = async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), refused)
        .await
        .expect("the listener was not closed");
    busy.write_all(b"\r\n").await.expect("the rest");
    let answer = read_answer(&mut busy)
        .await
        .expect("the in-flight request's answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    for stream in &mut idle {
        let rest = read_until_closed(stream, Duration::from_secs(10)).await;
        assert_eq!(
            rest.as_deref(),
            Some(""),
            "an idle connection was not closed"
        );
    }
    tokio::time::timeout(Duration::from_secs(20), stop)
        .await
        .expect("the stop waited for idle connections")
        .expect("stop");
}
