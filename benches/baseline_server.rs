//! A bare hyper 1.x server: the ceiling that `benches/load.sh` compares Cosmopoints with.
//!
//! Same stack as the real server (tokio multi-thread runtime with default workers, hyper
//! http1 with keep-alive, TCP_NODELAY, the same allocator), none of its work (no auth, no
//! store, no logging):
//!
//! - `POST` (any path): reads the body, parses it with serde_json into a struct shaped
//!   like an issue-points request, answers 200 with ~150 bytes of JSON.
//! - `GET` (any path): answers 200 with a small JSON object.
//!
//! Usage: `baseline_server [ADDR]` (default `127.0.0.1:0`); prints the bound address on
//! stdout as `listening on ADDR`. Stops on SIGINT/SIGTERM (default signal action).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// The same allocator as the server's (its default feature), so that the comparison is of
/// the work each does, not of their allocators.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct IssueRequest {
    program_id: String,
    value: u64,
    user_id: String,
    reference_number: String,
    description: Option<String>,
    bonus: Option<bool>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IssueResponse<'a> {
    id: &'a str,
    total_points: u64,
    reference_number: &'a str,
    date: &'a str,
    program_id: &'a str,
}

fn json(status: StatusCode, bytes: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == Method::POST {
        let body = match req.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return Ok(json(StatusCode::BAD_REQUEST, b"{}".to_vec())),
        };
        let parsed: IssueRequest = match serde_json::from_slice(&body) {
            Ok(parsed) => parsed,
            Err(_) => {
                return Ok(json(
                    StatusCode::BAD_REQUEST,
                    br#"{"title":"bad json"}"#.to_vec(),
                ))
            }
        };
        let reply = IssueResponse {
            id: "tx_AAAAAAAAAAAAAAAAAAAAAA",
            total_points: parsed.value / 44,
            reference_number: &parsed.reference_number,
            date: "2026-11-27T10:15:00Z",
            program_id: &parsed.program_id,
        };
        let bytes = serde_json::to_vec(&reply).unwrap_or_default();
        Ok(json(StatusCode::OK, bytes))
    } else {
        Ok(json(
            StatusCode::OK,
            br#"{"status":"ok","service":"baseline"}"#.to_vec(),
        ))
    }
}

#[tokio::main]
async fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .expect("argv[1] must be an address like 127.0.0.1:8081");
    let listener = TcpListener::bind(addr).await.expect("bind");
    println!(
        "listening on {}",
        listener.local_addr().expect("local address")
    );
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    }
}
