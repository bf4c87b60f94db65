//! Bulk issuance benchmark client: `POST /v1/transactions/batch` from ONE client (one
//! process; IN_FLIGHT keep-alive connections, one request at a time on each) against a
//! running server.
//!
//! Usage: `bulk_bench URL CLIENT_ID SECRET [BATCHES] [ITEMS] [IN_FLIGHT]` (defaults 200
//! batches of 1000, 1 in flight). Every body is built before the clock starts; each
//! answer is checked (200, one 201 per item). Prints `transactions=… seconds=…
//! per_second=…`. `benches/bulk.sh` runs it against the release binary and adds the
//! server's CPU time per transaction.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: bulk_bench URL CLIENT_ID SECRET [BATCHES] [ITEMS]");
        std::process::exit(2);
    }
    let (url, client_id, secret) = (&args[1], &args[2], &args[3]);
    let batches: usize = args.get(4).map_or(200, |a| a.parse().expect("BATCHES"));
    let items: usize = args.get(5).map_or(1000, |a| a.parse().expect("ITEMS"));
    let in_flight: usize = args
        .get(6)
        .map_or(1, |a| a.parse().expect("IN_FLIGHT"))
        .max(1);
    let http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(in_flight)
        .build_http::<Full<Bytes>>();
    let login = serde_json::json!({"clientId": client_id, "clientSecret": secret}).to_string();
    let (status, body) = post(&http, &format!("{url}/v1/auth"), None, login.into()).await;
    assert_eq!(status, 200, "login: {}", String::from_utf8_lossy(&body));
    let token = serde_json::from_slice::<serde_json::Value>(&body).expect("JSON")["accessToken"]
        .as_str()
        .expect("token")
        .to_owned();
    // A run id keeps references unique across runs on one database.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_nanos();
    let bodies: Vec<Bytes> = (0..batches)
        .map(|b| {
            let mut body = String::with_capacity(items * 110);
            body.push_str("{\"items\":[");
            for i in 0..items {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&format!(
                    "{{\"programId\":\"skywards\",\"value\":{},\"userId\":\"EK{}\",\"referenceNumber\":\"bulk-{run}-{b}-{i}\"}}",
                    3673 + i % 5000,
                    i % 997
                ));
            }
            body.push_str("]}");
            Bytes::from(body)
        })
        .collect();
    let target = format!("{url}/v1/transactions/batch");
    let started = Instant::now();
    // IN_FLIGHT requests at a time (each on a connection of its own), the next sent as
    // soon as one is answered.
    let mut running = tokio::task::JoinSet::new();
    for body in bodies {
        if running.len() == in_flight {
            running.join_next().await.expect("a request").expect("task");
        }
        let (http, target, token) = (http.clone(), target.clone(), token.clone());
        running.spawn(async move {
            let (status, answer) = post(&http, &target, Some(&token), body).await;
            assert_eq!(
                status,
                200,
                "{}",
                String::from_utf8_lossy(&answer[..answer.len().min(500)])
            );
            let created = answer
                .windows(12)
                .filter(|w| w == b"\"status\":201")
                .count();
            assert_eq!(created, items, "every item created");
        });
    }
    while let Some(done) = running.join_next().await {
        done.expect("task");
    }
    let seconds = started.elapsed().as_secs_f64();
    let total = batches * items;
    println!(
        "transactions={total} seconds={seconds:.3} per_second={:.0}",
        total as f64 / seconds
    );
}

async fn post(
    http: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    token: Option<&str>,
    body: Bytes,
) -> (u16, Bytes) {
    let mut req = Request::post(url).header("content-type", "application/json");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let response = http
        .request(req.body(Full::new(body)).expect("request"))
        .await
        .expect("the server answers");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, body)
}
