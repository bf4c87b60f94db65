//! The outbound side of partner delivery: one signed HTTP request to a partner program,
//! and what its answer means for the delivery ([`Outcome`]).
//!
//! Requests follow Standard Webhooks (standardwebhooks.com): `webhook-id`,
//! `webhook-timestamp` (epoch seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">` under the partner's secret. How an answer is classified
//! (SPEC § "Partner delivery"):
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx | [`Outcome::Delivered`], with the body's `partnerTransactionId` if usable |
//! | 408, 425, 429, 5xx, timeout, refused or failed connection, TLS failure, cut-off answer | [`Outcome::Retry`], with `Retry-After` if given |
//! | 3xx | [`Outcome::Rejected`]: redirects are never followed (see [`classify`]) |
//! | any other 4xx | [`Outcome::Rejected`] with the status and the first 512 characters of the body |
//!
//! `programs.partner.sandbox = true` answers in-process, without any network (see
//! [`Client::send`]).
//!
//! Invariant: this module keeps no state about deliveries and reads no clock: the caller
//! (the delivery worker) passes the timestamp and the attempt number in, and decides from
//! the [`Outcome`] what to store and when to try again. Nothing it returns or logs holds
//! the partner's secret.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ring::hmac;
use serde_json::Value;

use crate::domain::{Partner, PartnerTarget, PartnerUrl, WebhookSecret};

/// Time to establish the TCP connection. The whole attempt (TLS, request, answer) is
/// bounded by the partner's own `timeout_seconds` on top of this; a partner with a shorter
/// timeout is cut off by that one first.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an answer's body that is read; the rest is dropped with the connection.
/// Enough for any `partnerTransactionId` answer and a reason worth keeping, small enough
/// that a partner streaming megabytes cannot make the worker hold them.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// How much of a rejecting partner's body is kept for the merchant (SPEC).
pub const MAX_DETAIL_CHARS: usize = 512;
/// The longest `partnerTransactionId` kept (SPEC); a longer one is ignored.
pub const MAX_PARTNER_TRANSACTION_ID_CHARS: usize = 100;
/// Connections idle longer than this are closed rather than reused.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The partner confirmed (2xx). `partner_transaction_id` is the partner's own id from
    /// a body `{"partnerTransactionId": "…"}`; `None` when the body has none, is not JSON,
    /// or the id is empty, not a string, longer than 100 characters or holds control
    /// characters: the delivery still succeeded, only the id is not kept.
    Delivered {
        partner_transaction_id: Option<String>,
    },
    /// Try again at the next step of the schedule. `retry_after` is the partner's
    /// `Retry-After` in seconds from the attempt's timestamp (delta-seconds or an HTTP
    /// date), uncapped: capping it to the schedule is the caller's business.
    Retry {
        reason: String,
        http_status: Option<u16>,
        retry_after: Option<u64>,
    },
    /// The partner refused for good: fail now, keep `detail` for the merchant.
    Rejected { http_status: u16, detail: String },
}

type Https = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The outbound HTTP client, built once and shared by every delivery: it holds the
/// connection pools, so connections to a partner are reused across deliveries.
pub struct Client {
    /// Trusts the webpki (Mozilla) roots; for every partner without a `ca_file`.
    public_roots: Https,
    /// For partners with a `ca_file`, one client per set of extra certificates (made on
    /// first use), so that a partner's own CA vouches for that partner's connections and
    /// not for any other partner's.
    with_ca: Mutex<HashMap<Vec<Vec<u8>>, Https>>,
    random: ring::rand::SystemRandom,
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

/// What came back from a partner: enough to classify it.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    location: Option<String>,
    /// At most [`MAX_ANSWER_BYTES`].
    body: Vec<u8>,
}

impl Client {
    pub fn new() -> Client {
        Client {
            public_roots: https_client(&[])
                .expect("the webpki roots are valid trust anchors and ring supports TLS 1.2/1.3"),
            with_ca: Mutex::new(HashMap::new()),
            random: ring::rand::SystemRandom::new(),
        }
    }

    /// Sends one delivery attempt: `POST {url}{path}` (`path` is `/credits` or `/debits`)
    /// with `body` (JSON), signed for `webhook_id` (the transaction id: the same on every
    /// attempt, so the partner can dedupe) at `timestamp` (epoch seconds). `attempt`
    /// counts from 1; only the sandbox looks at it.
    ///
    /// The sandbox partner answers from the body's `memberId`: one starting with
    /// `invalid` is rejected (400), one starting with `flaky` is retried on attempts 1
    /// and 2 and delivered on the third, anything else is delivered with a
    /// `partnerTransactionId` derived from `webhook_id` (stable across attempts, as a
    /// real partner's would be).
    pub async fn send(
        &self,
        partner: &Partner,
        path: &str,
        webhook_id: &str,
        timestamp: u64,
        attempt: u32,
        body: &[u8],
    ) -> Outcome {
        let outcome = match &partner.target {
            PartnerTarget::Sandbox => sandbox_send(webhook_id, attempt, body),
            PartnerTarget::Http { base_url, secret } => {
                match self
                    .post(partner, base_url, path, secret, webhook_id, timestamp, body)
                    .await
                {
                    Ok(answer) => classify(&answer, timestamp, secret),
                    Err(reason) => Outcome::Retry {
                        reason,
                        http_status: None,
                        retry_after: None,
                    },
                }
            }
        };
        tracing::debug!(
            path,
            webhook_id,
            attempt,
            ?outcome,
            "partner delivery attempt"
        );
        outcome
    }

    /// Asks the partner whether `member_id` is one of its members: `POST
    /// {url}/members/validate` `{"programId", "memberId"}`, expecting 200 `{"valid":
    /// bool}`. Any other answer, or none, is an `Err` saying why (the API turns it into
    /// 503). The sandbox says `false` for ids starting with `invalid`, else `true`.
    pub async fn validate_member(
        &self,
        partner: &Partner,
        program_id: &str,
        member_id: &str,
        timestamp: u64,
    ) -> Result<bool, String> {
        let (base_url, secret) = match &partner.target {
            PartnerTarget::Sandbox => return Ok(!member_id.starts_with(SANDBOX_INVALID)),
            PartnerTarget::Http { base_url, secret } => (base_url, secret),
        };
        let body = serde_json::json!({ "programId": program_id, "memberId": member_id });
        let body = serde_json::to_vec(&body).expect("a JSON object of two strings serializes");
        // Not a delivery, so no transaction id: a fresh random id per question.
        let id = self.message_id()?;
        let answer = self
            .post(
                partner,
                base_url,
                "/members/validate",
                secret,
                &id,
                timestamp,
                &body,
            )
            .await?;
        if answer.status != 200 {
            return Err(format!(
                "partner answered {} to a member check",
                answer.status
            ));
        }
        serde_json::from_slice::<Value>(&answer.body)
            .ok()
            .and_then(|v| v.get("valid")?.as_bool())
            .ok_or_else(|| "partner answered 200 without a boolean \"valid\"".to_owned())
    }

    /// `msg_` + 16 random bytes in hex, for requests that are not deliveries.
    fn message_id(&self) -> Result<String, String> {
        let mut bytes = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.random, &mut bytes)
            .map_err(|_| "the system random generator failed".to_owned())?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!("msg_{hex}"))
    }

    /// The client whose trust fits `partner`: the public roots, plus its `ca_file`'s.
    fn client_for(&self, partner: &Partner) -> Result<Https, String> {
        if partner.ca_certificates.is_empty() {
            return Ok(self.public_roots.clone());
        }
        // A poisoned lock only means another sender panicked while inserting; the map
        // itself is still whole (an insert either happened or not).
        let mut clients = self.with_ca.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&partner.ca_certificates) {
            return Ok(client.clone());
        }
        let client = https_client(&partner.ca_certificates)?;
        clients.insert(partner.ca_certificates.clone(), client.clone());
        Ok(client)
    }

    /// One signed POST, bounded by the partner's timeout from connecting to the last
    /// byte read. `Err` is a reason to retry (no usable answer arrived).
    #[allow(clippy::too_many_arguments)]
    async fn post(
        &self,
        partner: &Partner,
        base_url: &PartnerUrl,
        path: &str,
        secret: &WebhookSecret,
        webhook_id: &str,
        timestamp: u64,
        body: &[u8],
    ) -> Result<Answer, String> {
        let client = self.client_for(partner)?;
        let url = base_url.join(path);
        let signature = sign(secret.bytes(), webhook_id, timestamp, body);
        let request = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                concat!("cosmopoints/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", webhook_id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::copy_from_slice(body)))
            // The configuration checked the URL and ids are printable, so this is not
            // expected; the message names neither the headers nor the secret.
            .map_err(|e| format!("cannot build the request to {url}: {e}"))?;

        let exchange = async {
            let response = client.request(request).await.map_err(|e| {
                let what = if e.is_connect() {
                    "cannot connect"
                } else {
                    "request failed"
                };
                format!("{what}: {}", error_chain(&e))
            })?;
            let header = |name| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v: &HeaderValue| v.to_str().ok())
                    .map(str::to_owned)
            };
            let (status, retry_after, location) = (
                response.status().as_u16(),
                header(RETRY_AFTER),
                header(LOCATION),
            );
            let body = read_limited(response.into_body(), MAX_ANSWER_BYTES)
                .await
                .map_err(|e| format!("answer {status} cut off: {}", error_chain(&e)))?;
            Ok::<_, String>(Answer {
                status,
                retry_after,
                location,
                body,
            })
        };
        match tokio::time::timeout(partner.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no complete answer within {} s",
                partner.timeout.as_secs()
            )),
        }
    }
}

/// A client trusting the webpki roots plus `extra` (DER certificates). Plain TCP for
/// `http://`, rustls on ring for `https://`; HTTP/1.1 only.
fn https_client(extra: &[Vec<u8>]) -> Result<Https, String> {
    let mut roots: rustls::RootCertStore = webpki_roots::TLS_SERVER_ROOTS.iter().cloned().collect();
    for der in extra {
        roots
            .add(rustls::pki_types::CertificateDer::from(der.clone()))
            .map_err(|e| format!("the partner's ca_file holds an unusable certificate: {e}"))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("cannot set up TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    // The https connector below takes `https://` URLs through this connector too.
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    tcp.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    // hyper's client never follows redirects by itself; nothing to turn off.
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector),
    )
}

/// Reads at most `limit` bytes of a body; the rest is left unread (and the connection is
/// then closed rather than reused, which is what an oversized answer deserves).
async fn read_limited(mut body: Incoming, limit: usize) -> Result<Vec<u8>, hyper::Error> {
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(frame) = body.frame().await else {
            break;
        };
        if let Ok(data) = frame?.into_data() {
            let take = data.len().min(limit - out.len());
            out.extend_from_slice(&data[..take]);
        }
    }
    Ok(out)
}

/// An error and its sources, joined: hyper's outer errors say little ("client error
/// (Connect)"); the inner ones say "Connection refused" or "invalid peer certificate".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let more = inner.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = inner.source();
    }
    text
}

/// What an answer means (see the module's table).
///
/// A redirect is a rejection, not a retry and not followed: the configured URL is wrong
/// (moving it is the operator's call, so the merchant should see it at once rather than
/// after a day of retries), and following it would re-send a signed credit to an address
/// nobody configured, which might not be the partner at all (and 301/302/303 would turn
/// the POST into a GET).
fn classify(answer: &Answer, timestamp: u64, secret: &WebhookSecret) -> Outcome {
    let status = answer.status;
    match status {
        200..=299 => Outcome::Delivered {
            partner_transaction_id: partner_transaction_id(&answer.body),
        },
        408 | 425 | 429 | 500..=599 => Outcome::Retry {
            reason: format!("partner answered {status}"),
            http_status: Some(status),
            retry_after: answer
                .retry_after
                .as_deref()
                .and_then(|v| retry_after_seconds(v, timestamp)),
        },
        300..=399 => Outcome::Rejected {
            http_status: status,
            detail: detail(
                format!(
                    "redirect to {} not followed: set the partner url to its final address",
                    answer.location.as_deref().unwrap_or("(no Location)")
                )
                .as_bytes(),
                secret,
            ),
        },
        400..=499 => Outcome::Rejected {
            http_status: status,
            detail: detail(&answer.body, secret),
        },
        // 1xx as a final answer, or a status beyond 599: not a refusal anyone defined, so
        // the partner gets another chance and, if it persists, the delivery runs out.
        _ => Outcome::Retry {
            reason: format!("partner answered the unexpected status {status}"),
            http_status: Some(status),
            retry_after: None,
        },
    }
}

/// The `partnerTransactionId` of a 2xx body, when it is a usable one (see
/// [`Outcome::Delivered`]).
fn partner_transaction_id(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let id = value.get("partnerTransactionId")?.as_str()?;
    let chars = id.chars().count();
    if chars == 0 || chars > MAX_PARTNER_TRANSACTION_ID_CHARS || id.chars().any(char::is_control) {
        return None;
    }
    Some(id.to_owned())
}

/// `Retry-After` as seconds after `timestamp`: delta-seconds, or an HTTP date (a date
/// already past is 0). Anything else is ignored.
fn retry_after_seconds(value: &str, timestamp: u64) -> Option<u64> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds: as good as forever; the caller caps it.
        return Some(value.parse().unwrap_or(u64::MAX));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let at = at.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(at.saturating_sub(timestamp))
}

/// The first [`MAX_DETAIL_CHARS`] characters of a partner's body, as text. A partner
/// that echoes the shared secret back gets it blanked out: the detail is shown to the
/// merchant, who must never see the secret. A NUL byte (a binary body) becomes U+FFFD,
/// as invalid UTF-8 does: the detail is text, on every backend.
fn detail(body: &[u8], secret: &WebhookSecret) -> String {
    let text = String::from_utf8_lossy(body);
    let encoded = base64::engine::general_purpose::STANDARD.encode(secret.bytes());
    let text = text.replace(&encoded, "[redacted]");
    text.chars()
        .take(MAX_DETAIL_CHARS)
        .map(|c| {
            if c == '\0' {
                char::REPLACEMENT_CHARACTER
            } else {
                c
            }
        })
        .collect()
}

/// The Standard Webhooks signature header value of one request:
/// `v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`.
pub fn sign(secret: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut context = hmac::Context::with_key(&key);
    context.update(id.as_bytes());
    context.update(b".");
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

/// Member ids the sandbox refuses (and reports as not valid).
const SANDBOX_INVALID: &str = "invalid";
/// Member ids whose deliveries the sandbox fails twice before accepting.
const SANDBOX_FLAKY: &str = "flaky";
/// The attempts a flaky sandbox member fails.
const SANDBOX_FLAKY_FAILURES: u32 = 2;

/// The in-process sandbox partner (see [`Client::send`]).
fn sandbox_send(webhook_id: &str, attempt: u32, body: &[u8]) -> Outcome {
    // A partner would parse the whole body as a JSON object and read its `memberId`
    // string; so does this, into a borrowed field, without building a `Value` tree.
    #[derive(serde::Deserialize)]
    struct Credit<'a> {
        #[serde(rename = "memberId", borrow)]
        member_id: std::borrow::Cow<'a, str>,
    }
    // `Credit` would also take a JSON array (serde's sequence form of a struct).
    let object = body.trim_ascii_start().first() == Some(&b'{');
    let member = object
        .then(|| serde_json::from_slice::<Credit>(body).ok())
        .flatten()
        .map(|c| c.member_id);
    let Some(member) = member else {
        return Outcome::Rejected {
            http_status: 400,
            detail: "sandbox partner: the body has no memberId string".into(),
        };
    };
    if member.starts_with(SANDBOX_INVALID) {
        let detail = format!(
            "sandbox partner: member \"{member}\" does not exist (ids starting with \"{SANDBOX_INVALID}\" never do)"
        );
        return Outcome::Rejected {
            http_status: 400,
            detail: detail.chars().take(MAX_DETAIL_CHARS).collect(),
        };
    }
    if member.starts_with(SANDBOX_FLAKY) && attempt <= SANDBOX_FLAKY_FAILURES {
        return Outcome::Retry {
            reason: format!(
                "sandbox partner: ids starting with \"{SANDBOX_FLAKY}\" fail attempts 1 and 2 (this was attempt {attempt})"
            ),
            http_status: Some(503),
            retry_after: None,
        };
    }
    Outcome::Delivered {
        partner_transaction_id: Some(sandbox_transaction_id(webhook_id)),
    }
}

/// `sbx_` + 16 hex digits of SHA-256(webhook id): the same for every attempt of one
/// delivery, and short whatever the id's length.
fn sandbox_transaction_id(webhook_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, webhook_id.as_bytes());
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sbx_{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of the Standard Webhooks reference libraries: `test_sign` in
    /// github.com/standard-webhooks/standard-webhooks, `libraries/rust/src/lib.rs` (the
    /// same secret, id, timestamp and payload appear in the other languages' tests).
    #[test]
    fn signatures_match_the_standard_webhooks_test_vector() {
        let secret = base64::engine::general_purpose::STANDARD
            .decode("C2FVsBQIhrscChlQIMV+b5sSYspob7oD")
            .expect("the vector's secret is base64");
        assert_eq!(
            sign(
                &secret,
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                br#"{"email":"test@example.com","username":"test_user"}"#,
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            retry_after: None,
            location: None,
            body: body.as_bytes().to_vec(),
        }
    }

    fn secret() -> WebhookSecret {
        WebhookSecret::new(b"0123456789abcdef01234567".to_vec())
    }

    #[test]
    fn partner_transaction_ids_are_kept_only_when_usable() {
        let id = |body: &str| match classify(&answer(201, body), 0, &secret()) {
            Outcome::Delivered {
                partner_transaction_id,
            } => partner_transaction_id,
            other => panic!("{other:?}"),
        };
        assert_eq!(id(r#"{"partnerTransactionId":"p-1"}"#), Some("p-1".into()));
        let longest = "é".repeat(100);
        assert_eq!(
            id(&format!(r#"{{"partnerTransactionId":"{longest}"}}"#)),
            Some(longest)
        );
        for body in [
            "",
            "not json",
            "{}",
            r#"{"partnerTransactionId":""}"#,
            r#"{"partnerTransactionId":42}"#,
            r#"{"partnerTransactionId":"a\nb"}"#,
            &format!(r#"{{"partnerTransactionId":"{}"}}"#, "x".repeat(101)),
        ] {
            assert_eq!(id(body), None, "{body}");
        }
    }

    #[test]
    fn statuses_are_classified_as_the_spec_says() {
        for status in [408, 425, 429, 500, 502, 503, 599, 600, 999] {
            assert!(
                matches!(classify(&answer(status, ""), 0, &secret()), Outcome::Retry { http_status: Some(s), .. } if s == status),
                "{status}"
            );
        }
        for status in [
            300, 301, 302, 307, 308, 400, 401, 403, 404, 409, 410, 422, 499,
        ] {
            assert!(
                matches!(classify(&answer(status, ""), 0, &secret()), Outcome::Rejected { http_status, .. } if http_status == status),
                "{status}"
            );
        }
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        assert_eq!(retry_after_seconds("120", 1_000), Some(120));
        assert_eq!(retry_after_seconds(" 0 ", 1_000), Some(0));
        assert_eq!(
            retry_after_seconds("99999999999999999999999", 0),
            Some(u64::MAX)
        );
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example date).
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(retry_after_seconds(date, 784_111_777 - 30), Some(30));
        assert_eq!(retry_after_seconds(date, 784_111_777 + 30), Some(0));
        for junk in ["", "-5", "1.5", "soon", "120 s"] {
            assert_eq!(retry_after_seconds(junk, 0), None, "{junk}");
        }
    }

    #[test]
    fn details_are_cut_to_512_characters_and_never_hold_the_secret() {
        let s = secret();
        let encoded = base64::engine::general_purpose::STANDARD.encode(s.bytes());
        let body = format!("your secret is whsec_{encoded}; {}", "é".repeat(600));
        let detail = detail(body.as_bytes(), &s);
        assert_eq!(detail.chars().count(), 512);
        assert!(!detail.contains(&encoded), "{detail}");
        assert!(detail.starts_with("your secret is whsec_[redacted]; é"));
    }

    #[test]
    fn a_binary_body_is_kept_as_text_without_nul() {
        let detail = detail(b"\x1f\x8b\x00\x00gz\xff", &secret());
        assert_eq!(detail, "\u{1f}\u{fffd}\u{fffd}\u{fffd}gz\u{fffd}");
    }

    #[test]
    fn the_sandbox_rejects_invalid_and_fails_flaky_twice() {
        let body = |member: &str| format!(r#"{{"type":"points.credit","memberId":"{member}"}}"#);
        assert!(matches!(
            sandbox_send("tx_1", 1, body("invalid-7").as_bytes()),
            Outcome::Rejected { http_status: 400, detail } if detail.contains("invalid-7")
        ));
        for attempt in [1, 2] {
            assert!(matches!(
                sandbox_send("tx_2", attempt, body("flaky-1").as_bytes()),
                Outcome::Retry { .. }
            ));
        }
        let third = sandbox_send("tx_2", 3, body("flaky-1").as_bytes());
        let fine = sandbox_send("tx_2", 1, body("member-9").as_bytes());
        assert_eq!(third, fine, "the same delivery gets the same partner id");
        let Outcome::Delivered {
            partner_transaction_id: Some(id),
        } = fine
        else {
            panic!("{fine:?}");
        };
        assert!(id.starts_with("sbx_") && id.len() == 20, "{id}");
        for body in [
            &b"[]"[..],
            br#"["member-9"]"#,
            br#"{"memberId":42}"#,
            br#"{"type":"points.credit"}"#,
            br#"{"memberId":"member-9""#,
            br#"{"memberId":"member-9"} trailing"#,
        ] {
            assert!(
                matches!(
                    sandbox_send("tx_3", 1, body),
                    Outcome::Rejected {
                        http_status: 400,
                        ..
                    }
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Escapes are read as JSON says.
        assert!(matches!(
            sandbox_send("tx_4", 1, br#"{"memberId":"inval\u0069d-1"}"#),
            Outcome::Rejected { detail, .. } if detail.contains("invalid-1")
        ));
    }
}
