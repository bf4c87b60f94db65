//! Delivery benchmark: how fast issued points reach a partner on this machine.
//!
//! Starts, in one process on 127.0.0.1: a minimal partner (hyper; answers every
//! `POST /credits` with 200 and a `partnerTransactionId`, and notes when each
//! transaction id first arrived) and the real Cosmopoints service (its library, a temp
//! database, `skywards` delivered to that partner with the default concurrency of 16).
//! Then, over real HTTP:
//!
//! 1. throughput: issues `N` transactions from 64 concurrent clients as fast as it can
//!    and reports issues/s and credits/s (distinct transactions the partner received,
//!    over the time from the first issue to the last credit);
//! 2. latency: issues at a steady `RATE`/s for `SECONDS` s and reports the time from each
//!    issue's 201 to the partner receiving its credit: p50, p99, max. (The write-back of
//!    the outcome is one more group commit after that.)
//!
//! Usage: `cargo run --release --example delivery_bench [N] [RATE] [SECONDS]`
//! (defaults 20000 1000 10).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;
type Http = Client<HttpConnector, Full<Bytes>>;

async fn partner(arrivals: Arrivals) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let arrivals = arrivals.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let id = body
                            .ok()
                            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                            .and_then(|v| v["transactionId"].as_str().map(str::to_owned))
                            .unwrap_or_default();
                        arrivals
                            .lock()
                            .expect("arrivals")
                            .entry(id.clone())
                            .or_insert_with(Instant::now);
                        let answer = format!("{{\"partnerTransactionId\":\"p-{id}\"}}");
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

async fn call(
    http: &Http,
    url: String,
    token: Option<&str>,
    body: String,
) -> (u16, serde_json::Value) {
    let mut req = Request::post(url).header("content-type", "application/json");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    let res = http.request(req).await.expect("the server answers");
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

fn issue_body(reference: &str, i: u64) -> String {
    format!(
        "{{\"programId\":\"skywards\",\"value\":{},\"userId\":\"member-{}\",\"referenceNumber\":\"{reference}\"}}",
        3000 + i % 5000,
        i % 10_000
    )
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(20_000);
    let rate = args.get(1).copied().unwrap_or(1_000);
    let seconds = args.get(2).copied().unwrap_or(10);

    let arrivals: Arrivals = Arc::default();
    let partner_url = partner(arrivals.clone()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
log_level = "warn"
[storage]
path = "bench.redb"
[auth]
token_ttl_seconds = 86400
[currencies]
AED = "3.6725"
[[programs]]
id = "skywards"
name = "Skywards Miles"
price_per_point_usd = "0.012"
[programs.partner]
url = "{partner_url}"
secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
[[businesses]]
id = "demo"
name = "Demo"
program_id = "demo-rewards"
currency = "AED"
programs = ["skywards"]
[[businesses.clients]]
client_id = "bench"
secret = "bench-secret"
"#
    );
    let config = cosmopoints::config::Config::parse(&config, dir.path()).expect("config");
    let app = Arc::new(
        cosmopoints::app::App::open(config, cosmopoints::clock::Clock::system())
            .expect("the store opens"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(cosmopoints::service::Service::new(app).run(listener, std::future::pending()));

    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let (_, login) = call(
        &http,
        format!("{base}/v1/auth"),
        None,
        r#"{"clientId":"bench","clientSecret":"bench-secret"}"#.into(),
    )
    .await;
    let token: Arc<str> = login["accessToken"].as_str().expect("a token").into();

    // 1. Throughput.
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..64 {
        let (http, base, token, next) = (http.clone(), base.clone(), token.clone(), next.clone());
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let (status, _) = call(
                    &http,
                    format!("{base}/v1/transactions"),
                    Some(&token),
                    issue_body(&format!("t-{i}"), i),
                )
                .await;
                assert_eq!(status, 201);
            }
        }));
    }
    for c in clients {
        c.await.expect("client");
    }
    let issued_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (arrivals.lock().expect("arrivals").len() as u64) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let received = arrivals.lock().expect("arrivals").len() as u64;
    let last = arrivals
        .lock()
        .expect("arrivals")
        .values()
        .max()
        .copied()
        .unwrap_or(started);
    let delivered_in = last - started;
    println!(
        "throughput: {n} issues in {:.2} s = {:.0} issues/s; {received} credits received in {:.2} s = {:.0} credits/s",
        issued_in.as_secs_f64(),
        n as f64 / issued_in.as_secs_f64(),
        delivered_in.as_secs_f64(),
        received as f64 / delivered_in.as_secs_f64()
    );

    // 2. Latency at a steady rate.
    arrivals.lock().expect("arrivals").clear();
    let total = rate * seconds;
    let acks: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let mut calls = Vec::new();
    for i in 0..total {
        tick.tick().await;
        let (http, base, token, acks) = (http.clone(), base.clone(), token.clone(), acks.clone());
        calls.push(tokio::spawn(async move {
            let (status, body) = call(
                &http,
                format!("{base}/v1/transactions"),
                Some(&token),
                issue_body(&format!("r-{i}"), i),
            )
            .await;
            assert_eq!(status, 201);
            let id = body["id"].as_str().expect("id").to_owned();
            acks.lock().expect("acks").insert(id, Instant::now());
        }));
    }
    for c in calls {
        c.await.expect("call");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (arrivals.lock().expect("arrivals").len() as u64) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let arrivals = arrivals.lock().expect("arrivals");
    let acks = acks.lock().expect("acks");
    let mut latencies: Vec<Duration> = acks
        .iter()
        .filter_map(|(id, acked)| {
            arrivals
                .get(id)
                .map(|got| got.saturating_duration_since(*acked))
        })
        .collect();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    println!(
        "latency at {rate} issues/s for {seconds} s: {} of {total} credited; issue 201 -> partner received: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3
    );
}
