//! A partner program simulator for the tests: a real HTTP (or HTTPS) server on
//! 127.0.0.1 that behaves like a well-made partner: it checks every request's Standard
//! Webhooks signature (401 when wrong), records what it accepted, and credits each
//! `webhook-id` once (a repeat is answered 200 again with the same partner id, and not
//! credited again). Tests tell it how to answer, for everyone or per member id.
//!
//! ```ignore
//! let sim = PartnerSim::start().await;
//! sim.set_member("m-1", Behaviour::Unavailable { retry_after: Some("7".into()) });
//! // config: [programs.partner] + sim.partner_toml()
//! assert_eq!(sim.credits().len(), 1);
//! ```
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ring::hmac;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// The shared secret of every simulator (24 bytes: the Standard Webhooks example's).
pub const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// The bytes behind [`SECRET`].
pub fn secret_bytes() -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(&SECRET["whsec_".len()..])
        .expect("SECRET is base64")
}

/// How the simulator answers a request (deduped repeats aside).
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// 200 `{"partnerTransactionId": "ptx_<n>"}` (n counts credits from 1); a member check
    /// answers `{"valid": true}` unless the member id starts with `invalid`.
    Accept,
    /// 503, with this `Retry-After` header value if given.
    Unavailable { retry_after: Option<String> },
    /// `status` (a 4xx, say) with `{"reason": reason}`.
    Reject { status: u16, reason: String },
    /// Reads the request and never answers.
    Hang,
    /// 302 to `location`.
    Redirect { location: String },
    /// Any answer at all: status, extra headers, body. It credits nothing, even as a 2xx:
    /// for testing how answers are read, not what the partner keeps.
    Raw {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
}

/// One request whose signature checked out.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub webhook_id: String,
    pub timestamp: u64,
    pub signature: String,
    pub content_type: Option<String>,
    /// The body as JSON (`Value::Null` if it was not JSON).
    pub body: Value,
    /// The body's `memberId`, if any.
    pub member_id: Option<String>,
}

/// One credited (or debited) `webhook-id`.
#[derive(Clone, Debug)]
pub struct Credit {
    /// `/credits` or `/debits`.
    pub path: String,
    /// The body of the request that was credited (the first accepted one).
    pub body: Value,
    pub partner_transaction_id: String,
    /// Requests with this id answered 2xx: 1, plus one for each deduped repeat.
    pub answered: u32,
}

/// A queue of behaviours: each request takes the front one; the last one stays.
#[derive(Default)]
struct Script(VecDeque<Behaviour>);

impl Script {
    fn next(&mut self) -> Option<Behaviour> {
        if self.0.len() > 1 {
            self.0.pop_front()
        } else {
            self.0.front().cloned()
        }
    }
}

#[derive(Default)]
struct State {
    default: Script,
    members: HashMap<String, Script>,
    received: Vec<Received>,
    bad_signatures: usize,
    credits: BTreeMap<String, Credit>,
}

/// A running simulator; dropping it stops it (its port then refuses connections).
pub struct PartnerSim {
    addr: SocketAddr,
    https: bool,
    secret: Vec<u8>,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for PartnerSim {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl PartnerSim {
    /// A plain-HTTP simulator that accepts everything.
    pub async fn start() -> PartnerSim {
        PartnerSim::serve(None).await
    }

    /// An HTTPS simulator presenting `cert_der` (a chain of one) with `key_der` (PKCS#8).
    pub async fn start_tls(cert_der: Vec<u8>, key_der: Vec<u8>) -> PartnerSim {
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key_der.into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.into()], key)
        .expect("a valid certificate and key");
        PartnerSim::serve(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> PartnerSim {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut state = State::default();
        state.default.0.push_back(Behaviour::Accept);
        let state = Arc::new(Mutex::new(state));
        let secret = secret_bytes();
        let https = tls.is_some();
        let server = tokio::spawn({
            let state = state.clone();
            let secret = secret.clone();
            async move {
                // Dropped (so every connection aborted) when this task is aborted.
                let mut connections = JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (state, secret, tls) = (state.clone(), secret.clone(), tls.clone());
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let (state, secret) = (state.clone(), secret.clone());
                            async move {
                                Ok::<_, std::convert::Infallible>(
                                    handle(&state, &secret, req).await,
                                )
                            }
                        });
                        let http = hyper::server::conn::http1::Builder::new();
                        match tls {
                            None => {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                            Some(tls) => {
                                // A client that does not trust the certificate hangs up here.
                                let Ok(stream) = tls.accept(stream).await else {
                                    return;
                                };
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    });
                    // Reap finished connections so the set does not grow without bound.
                    while connections.try_join_next().is_some() {}
                }
            }
        });
        PartnerSim {
            addr,
            https,
            secret,
            state,
            server,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (or `https://`): the partner `url`.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The `url` and `secret` lines of a `[programs.partner]` table for this simulator.
    pub fn partner_toml(&self) -> String {
        format!("url = \"{}\"\nsecret = \"{SECRET}\"\n", self.url())
    }

    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("simulator state")
    }

    /// How to answer everyone without a behaviour of their own.
    pub fn set(&self, behaviour: Behaviour) {
        self.script(vec![behaviour]);
    }

    /// Answers in this order, one per request; the last one then stays.
    pub fn script(&self, behaviours: Vec<Behaviour>) {
        assert!(!behaviours.is_empty(), "a script needs a behaviour");
        self.lock().default = Script(behaviours.into());
    }

    /// How to answer requests whose body's `memberId` is `member_id`.
    pub fn set_member(&self, member_id: &str, behaviour: Behaviour) {
        self.script_member(member_id, vec![behaviour]);
    }

    /// Like [`PartnerSim::script`], for one member id.
    pub fn script_member(&self, member_id: &str, behaviours: Vec<Behaviour>) {
        assert!(!behaviours.is_empty(), "a script needs a behaviour");
        self.lock()
            .members
            .insert(member_id.to_owned(), Script(behaviours.into()));
    }

    /// Every request whose signature checked out, in arrival order (deduped repeats,
    /// refused and hung ones included).
    pub fn requests(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// The requests carrying this `webhook-id`: its delivery attempts as the partner saw them.
    pub fn attempts(&self, webhook_id: &str) -> Vec<Received> {
        let state = self.lock();
        let mine = state.received.iter().filter(|r| r.webhook_id == webhook_id);
        mine.cloned().collect()
    }

    /// The requests whose body's `memberId` is `member_id`.
    pub fn attempts_of_member(&self, member_id: &str) -> Vec<Received> {
        let state = self.lock();
        let mine = state
            .received
            .iter()
            .filter(|r| r.member_id.as_deref() == Some(member_id));
        mine.cloned().collect()
    }

    /// Requests refused with 401 because their signature did not check out.
    pub fn bad_signatures(&self) -> usize {
        self.lock().bad_signatures
    }

    /// The distinct credited `webhook-id`s, each with how often it was answered 2xx.
    pub fn credits(&self) -> BTreeMap<String, Credit> {
        self.lock().credits.clone()
    }
}

/// A port on 127.0.0.1 where nothing listens: connections to it are refused. (It was
/// free a moment ago; another test taking it in between is possible but unlikely.)
pub fn refused_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").port()
}

fn answer(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

/// Standard Webhooks verification, written out here rather than borrowed from the crate
/// under test: the header may carry several space-separated `v1,<base64>` signatures.
fn signature_ok(secret: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut signed = format!("{id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    header.split(' ').any(|one| {
        let Some(("v1", b64)) = one.split_once(',') else {
            return false;
        };
        let Ok(tag) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            return false;
        };
        hmac::verify(&key, &signed, &tag).is_ok()
    })
}

async fn handle(
    state: &Mutex<State>,
    secret: &[u8],
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (id, timestamp, signature, content_type) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
        header("content-type"),
    );
    let Ok(body) = Limited::new(req.into_body(), 1 << 20).collect().await else {
        return answer(400, json!({"reason": "body unreadable or over 1 MiB"}));
    };
    let body = body.to_bytes();
    let (Some(id), Some(timestamp), Some(signature)) = (id, timestamp, signature) else {
        state.lock().expect("state").bad_signatures += 1;
        return answer(401, json!({"reason": "missing webhook headers"}));
    };
    if !signature_ok(secret, &id, &timestamp, &body, &signature) {
        state.lock().expect("state").bad_signatures += 1;
        return answer(401, json!({"reason": "bad signature"}));
    }
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let member_id = json
        .get("memberId")
        .and_then(Value::as_str)
        .map(str::to_owned);

    let behaviour = {
        let mut state = state.lock().expect("state");
        state.received.push(Received {
            path: path.clone(),
            webhook_id: id.clone(),
            timestamp: timestamp.parse().unwrap_or(0),
            signature,
            content_type,
            body: json.clone(),
            member_id: member_id.clone(),
        });
        // A partner that dedupes: an id already credited gets the same answer again.
        if let Some(credit) = state.credits.get_mut(&id) {
            credit.answered += 1;
            let ptx = credit.partner_transaction_id.clone();
            return answer(200, json!({ "partnerTransactionId": ptx }));
        }
        let member_script = member_id.as_ref().and_then(|m| state.members.get_mut(m));
        match member_script.and_then(Script::next) {
            Some(b) => b,
            None => state.default.next().unwrap_or(Behaviour::Accept),
        }
    };

    match behaviour {
        Behaviour::Accept if path.ends_with("/members/validate") => {
            let valid = !member_id.unwrap_or_default().starts_with("invalid");
            answer(200, json!({ "valid": valid }))
        }
        Behaviour::Accept => {
            let mut state = state.lock().expect("state");
            let ptx = format!("ptx_{}", state.credits.len() + 1);
            state.credits.insert(
                id,
                Credit {
                    path,
                    body: json,
                    partner_transaction_id: ptx.clone(),
                    answered: 1,
                },
            );
            answer(200, json!({ "partnerTransactionId": ptx }))
        }
        Behaviour::Unavailable { retry_after } => {
            let mut response = answer(503, json!({"reason": "try later"}));
            if let Some(value) = retry_after {
                response.headers_mut().insert(
                    "retry-after",
                    value.parse().expect("a valid Retry-After value"),
                );
            }
            response
        }
        Behaviour::Reject { status, reason } => answer(status, json!({ "reason": reason })),
        Behaviour::Hang => std::future::pending().await,
        Behaviour::Redirect { location } => Response::builder()
            .status(StatusCode::FOUND)
            .header("location", location)
            .body(Full::new(Bytes::new()))
            .expect("a valid response"),
        Behaviour::Raw {
            status,
            headers,
            body,
        } => {
            let mut response = Response::builder().status(status);
            for (name, value) in headers {
                response = response.header(name, value);
            }
            response
                .body(Full::new(Bytes::from(body)))
                .expect("a valid response")
        }
    }
}
