//! The outbound partner client over real HTTP(S) to the partner simulator: how each kind
//! of answer (or of silence) is classified, that requests are signed, that nothing it
//! returns or logs holds the secret, and that a partner's `ca_file` is what makes its
//! self-signed certificate trusted.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cosmopoints::domain::{Partner, PartnerTarget, PartnerUrl, WebhookSecret};
use cosmopoints::partner::{Client, Outcome};

use common::partner::{refused_port, secret_bytes, Behaviour, PartnerSim, SECRET};

/// 2026-11-27T10:15:00Z, as the other tests.
const NOW: u64 = 1_795_774_500;

/// A partner at `http(s)://{authority}` with the simulators' secret and a 2 s timeout.
fn partner(authority: String, https: bool) -> Partner {
    Partner {
        target: PartnerTarget::Http {
            base_url: PartnerUrl {
                https,
                authority,
                path: String::new(),
            },
            secret: WebhookSecret::new(secret_bytes()),
        },
        timeout: Duration::from_secs(2),
        retry_schedule: vec![1, 2, 4],
        concurrency: 4,
        ca_file: None,
        ca_certificates: Vec::new(),
    }
}

fn to(sim: &PartnerSim) -> Partner {
    partner(sim.addr().to_string(), false)
}

fn credit_body(member: &str) -> Vec<u8> {
    serde_json::json!({
        "type": "points.credit", "transactionId": "tx_1", "businessId": "acme",
        "programId": "skywards", "memberId": member, "points": 833, "bonus": 0,
        "referenceNumber": "r-1", "createdAt": "2026-11-27T10:15:00Z",
    })
    .to_string()
    .into_bytes()
}

/// The one helper: a credit for `member` as `webhook_id`, attempt 1, at [`NOW`].
async fn credit(client: &Client, partner: &Partner, webhook_id: &str, member: &str) -> Outcome {
    let body = credit_body(member);
    client
        .send(partner, "/credits", webhook_id, NOW, 1, &body)
        .await
}

fn retry(status: Option<u16>, retry_after: Option<u64>) -> impl Fn(&Outcome) -> bool {
    move |o| matches!(o, Outcome::Retry { http_status, retry_after: r, .. } if *http_status == status && *r == retry_after)
}

#[tokio::test]
async fn a_2xx_delivers_with_the_partner_id_and_a_verified_signature() {
    let sim = PartnerSim::start().await;
    let client = Client::new();
    let outcome = credit(&client, &to(&sim), "tx_1", "m-1").await;
    assert_eq!(
        outcome,
        Outcome::Delivered {
            partner_transaction_id: Some("ptx_1".into())
        }
    );
    let requests = sim.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(
        (r.path.as_str(), r.webhook_id.as_str(), r.timestamp),
        ("/credits", "tx_1", NOW)
    );
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    assert_eq!(r.member_id.as_deref(), Some("m-1"));
    assert_eq!(r.body["points"], 833);
    assert_eq!(
        r.signature,
        cosmopoints::partner::sign(&secret_bytes(), "tx_1", NOW, &credit_body("m-1"))
    );
    assert_eq!(sim.bad_signatures(), 0);

    // A 2xx without a usable id still delivers.
    sim.set(Behaviour::Raw {
        status: 204,
        headers: vec![],
        body: vec![],
    });
    assert_eq!(
        credit(&client, &to(&sim), "tx_2", "m-1").await,
        Outcome::Delivered {
            partner_transaction_id: None
        }
    );
}

#[tokio::test]
async fn a_repeated_webhook_id_is_answered_again_but_credited_once() {
    let sim = PartnerSim::start().await;
    let client = Client::new();
    let partner = to(&sim);
    let first = credit(&client, &partner, "tx_same", "m-1").await;
    let second = client
        .send(
            &partner,
            "/credits",
            "tx_same",
            NOW + 60,
            2,
            &credit_body("m-1"),
        )
        .await;
    assert_eq!(first, second);
    let credits = sim.credits();
    assert_eq!(credits.len(), 1);
    assert_eq!(credits["tx_same"].answered, 2);
    assert_eq!(sim.attempts("tx_same").len(), 2);
}

#[tokio::test]
async fn transient_answers_are_retried_with_retry_after() {
    let sim = PartnerSim::start().await;
    let client = Client::new();
    let partner = to(&sim);
    let raw = |status: u16, retry_after: Option<&str>| Behaviour::Raw {
        status,
        headers: retry_after
            .map(|v| vec![("retry-after".to_owned(), v.to_owned())])
            .unwrap_or_default(),
        body: b"busy".to_vec(),
    };
    // The HTTP date 90 s after NOW.
    let date = httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(NOW + 90));
    let cases: Vec<(Behaviour, Option<u16>, Option<u64>)> = vec![
        (
            Behaviour::Unavailable { retry_after: None },
            Some(503),
            None,
        ),
        (
            Behaviour::Unavailable {
                retry_after: Some("7".into()),
            },
            Some(503),
            Some(7),
        ),
        (raw(429, Some(&date)), Some(429), Some(90)),
        (raw(429, Some("soon")), Some(429), None),
        (raw(408, None), Some(408), None),
        (raw(425, None), Some(425), None),
        (raw(500, None), Some(500), None),
        (raw(502, Some("0")), Some(502), Some(0)),
    ];
    for (i, (behaviour, status, retry_after)) in cases.into_iter().enumerate() {
        sim.set(behaviour.clone());
        let outcome = credit(&client, &partner, &format!("tx_{i}"), "m-1").await;
        assert!(
            retry(status, retry_after)(&outcome),
            "{behaviour:?}: {outcome:?}"
        );
    }
    assert!(sim.credits().is_empty());

    // A member scripted to fail twice, then accept.
    sim.set(Behaviour::Accept);
    sim.script_member(
        "m-2",
        vec![
            Behaviour::Unavailable { retry_after: None },
            Behaviour::Unavailable { retry_after: None },
            Behaviour::Accept,
        ],
    );
    for attempt in 1..=3 {
        let outcome = client
            .send(
                &partner,
                "/credits",
                "tx_m2",
                NOW,
                attempt,
                &credit_body("m-2"),
            )
            .await;
        assert_eq!(
            matches!(outcome, Outcome::Delivered { .. }),
            attempt == 3,
            "{attempt}: {outcome:?}"
        );
    }
}

#[tokio::test]
async fn other_4xx_reject_with_the_partners_reason_cut_to_512_characters() {
    let sim = PartnerSim::start().await;
    let client = Client::new();
    let partner = to(&sim);
    sim.set_member(
        "gone",
        Behaviour::Reject {
            status: 400,
            reason: "member closed".into(),
        },
    );
    assert_eq!(
        credit(&client, &partner, "tx_1", "gone").await,
        Outcome::Rejected {
            http_status: 400,
            detail: r#"{"reason":"member closed"}"#.into()
        }
    );
    // Other members are unaffected by that member's behaviour.
    assert!(matches!(
        credit(&client, &partner, "tx_2", "fine").await,
        Outcome::Delivered { .. }
    ));

    // A huge answer: only the start is read, only 512 characters are kept.
    sim.set(Behaviour::Raw {
        status: 422,
        headers: vec![],
        body: "é".repeat(1 << 20).into_bytes(),
    });
    let Outcome::Rejected {
        http_status: 422,
        detail,
    } = credit(&client, &partner, "tx_3", "m").await
    else {
        panic!("a 422 rejects");
    };
    assert_eq!(detail, "é".repeat(512));

    // A huge 2xx answer still delivers; its (unreadable) id is not kept.
    let mut body = br#"{"partnerTransactionId":"p-1","padding":""#.to_vec();
    body.extend(std::iter::repeat_n(b'x', 1 << 20));
    body.extend(br#""}"#);
    sim.set(Behaviour::Raw {
        status: 200,
        headers: vec![],
        body,
    });
    assert_eq!(
        credit(&client, &partner, "tx_4", "m").await,
        Outcome::Delivered {
            partner_transaction_id: None
        }
    );
}

#[tokio::test]
async fn redirects_are_rejected_and_not_followed() {
    let sim = PartnerSim::start().await;
    let elsewhere = PartnerSim::start().await;
    sim.set(Behaviour::Redirect {
        location: format!("{}/credits", elsewhere.url()),
    });
    let outcome = credit(&Client::new(), &to(&sim), "tx_1", "m").await;
    let Outcome::Rejected {
        http_status: 302,
        detail,
    } = &outcome
    else {
        panic!("{outcome:?}");
    };
    assert!(detail.contains(&elsewhere.url()), "{detail}");
    assert!(elsewhere.requests().is_empty(), "the redirect was followed");
}

#[tokio::test]
async fn a_partner_that_hangs_is_cut_off_at_its_timeout() {
    let sim = PartnerSim::start().await;
    sim.set(Behaviour::Hang);
    let mut partner = to(&sim);
    partner.timeout = Duration::from_secs(1);
    let started = Instant::now();
    let outcome = credit(&Client::new(), &partner, "tx_1", "m").await;
    let took = started.elapsed();
    assert!(retry(None, None)(&outcome), "{outcome:?}");
    let Outcome::Retry { reason, .. } = outcome else {
        unreachable!()
    };
    assert!(reason.contains("within 1 s"), "{reason}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(sim.requests().len(), 1, "the request did arrive");
}

#[tokio::test]
async fn a_refused_connection_is_retried() {
    let partner = partner(format!("127.0.0.1:{}", refused_port()), false);
    let outcome = credit(&Client::new(), &partner, "tx_1", "m").await;
    let Outcome::Retry {
        reason,
        http_status: None,
        retry_after: None,
    } = &outcome
    else {
        panic!("{outcome:?}");
    };
    assert!(reason.starts_with("cannot connect"), "{reason}");
    assert!(reason.to_lowercase().contains("refused"), "{reason}");
}

#[tokio::test]
async fn a_wrong_secret_is_refused_by_the_partner_and_never_shown() {
    let sim = PartnerSim::start().await;
    let wrong = b"the-wrong-secret-of-24-by".to_vec();
    let wrong_b64 = "dGhlLXdyb25nLXNlY3JldC1vZi0yNC1ieQ==";
    let mut partner = to(&sim);
    partner.target = PartnerTarget::Http {
        base_url: PartnerUrl {
            https: false,
            authority: sim.addr().to_string(),
            path: String::new(),
        },
        secret: WebhookSecret::new(wrong),
    };
    let outcome = credit(&Client::new(), &partner, "tx_1", "m").await;
    assert!(
        matches!(
            &outcome,
            Outcome::Rejected {
                http_status: 401,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(sim.bad_signatures(), 1);
    assert!(sim.requests().is_empty() && sim.credits().is_empty());
    let shown = format!("{outcome:?} {partner:?}");
    assert!(
        !shown.contains(wrong_b64) && !shown.contains("the-wrong-secret"),
        "{shown}"
    );
}

/// A `tracing` writer into a shared buffer, to read what the client logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_secret_appears_in_no_outcome_and_no_log_line() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .finish();
    // The current-thread runtime of #[tokio::test] runs every task of the client on
    // this thread, so a thread-local subscriber sees all of them.
    let _guard = tracing::subscriber::set_default(subscriber);

    let sim = PartnerSim::start().await;
    // The partner echoes the secret back in its refusal; the detail must not carry it.
    sim.set_member(
        "echo",
        Behaviour::Reject {
            status: 400,
            reason: format!("you sent {SECRET}"),
        },
    );
    let client = Client::new();
    let partner = to(&sim);
    let mut outcomes = vec![
        credit(&client, &partner, "tx_1", "m").await,
        credit(&client, &partner, "tx_2", "echo").await,
    ];
    sim.set(Behaviour::Unavailable {
        retry_after: Some("3".into()),
    });
    outcomes.push(credit(&client, &partner, "tx_3", "m").await);
    let refused = self::partner(format!("127.0.0.1:{}", refused_port()), false);
    outcomes.push(credit(&client, &refused, "tx_4", "m").await);
    let validated = client.validate_member(&refused, "skywards", "m", NOW).await;

    let logs = String::from_utf8(logs.0.lock().expect("log buffer").clone()).expect("UTF-8 logs");
    assert!(logs.contains("partner delivery attempt"), "{logs}");
    let secret_b64 = &SECRET["whsec_".len()..];
    let text = format!("{outcomes:?} {validated:?} {partner:?} {logs}");
    assert!(!text.contains(secret_b64), "{text}");
    assert!(
        text.contains("[redacted]"),
        "the echo was blanked out: {text}"
    );
}

#[tokio::test]
async fn member_checks_ask_the_partner() {
    let sim = PartnerSim::start().await;
    let client = Client::new();
    let partner = to(&sim);
    assert_eq!(
        client
            .validate_member(&partner, "skywards", "m-1", NOW)
            .await,
        Ok(true)
    );
    assert_eq!(
        client
            .validate_member(&partner, "skywards", "invalid-1", NOW)
            .await,
        Ok(false)
    );
    let requests = sim.requests();
    assert_eq!(requests[0].path, "/members/validate");
    assert_eq!(
        requests[0].body,
        serde_json::json!({"programId": "skywards", "memberId": "m-1"})
    );
    assert_ne!(requests[0].webhook_id, requests[1].webhook_id);
    assert!(sim.credits().is_empty(), "a member check credits nothing");

    sim.set(Behaviour::Unavailable { retry_after: None });
    let e = client
        .validate_member(&partner, "skywards", "m-1", NOW)
        .await
        .expect_err("a 503 is no answer");
    assert!(e.contains("503"), "{e}");
    sim.set(Behaviour::Raw {
        status: 200,
        headers: vec![],
        body: br#"{"valid":"yes"}"#.to_vec(),
    });
    assert!(client
        .validate_member(&partner, "skywards", "m-1", NOW)
        .await
        .is_err());
    let refused = self::partner(format!("127.0.0.1:{}", refused_port()), false);
    assert!(client
        .validate_member(&refused, "skywards", "m-1", NOW)
        .await
        .is_err());

    let mut sandbox = partner.clone();
    sandbox.target = PartnerTarget::Sandbox;
    assert_eq!(
        client.validate_member(&sandbox, "p", "m", NOW).await,
        Ok(true)
    );
    assert_eq!(
        client
            .validate_member(&sandbox, "p", "invalid-x", NOW)
            .await,
        Ok(false)
    );
}

#[tokio::test]
async fn the_sandbox_partner_answers_without_a_network() {
    let client = Client::new();
    let mut sandbox = partner(format!("127.0.0.1:{}", refused_port()), false);
    sandbox.target = PartnerTarget::Sandbox;
    assert!(matches!(
        credit(&client, &sandbox, "tx_1", "m-1").await,
        Outcome::Delivered {
            partner_transaction_id: Some(_)
        }
    ));
    assert!(matches!(
        credit(&client, &sandbox, "tx_2", "invalid-1").await,
        Outcome::Rejected {
            http_status: 400,
            ..
        }
    ));
    let flaky = credit_body("flaky-1");
    for attempt in 1..=3 {
        let outcome = client
            .send(&sandbox, "/credits", "tx_3", NOW, attempt, &flaky)
            .await;
        assert_eq!(
            matches!(outcome, Outcome::Retry { .. }),
            attempt < 3,
            "{outcome:?}"
        );
    }
}

#[tokio::test]
async fn https_trusts_a_partners_ca_file_and_only_then() {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("a self-signed certificate");
    let der = cert.cert.der().to_vec();
    let sim = PartnerSim::start_tls(der.clone(), cert.signing_key.serialize_der()).await;
    assert!(sim.url().starts_with("https://"));
    let client = Client::new();
    let mut partner = partner(sim.addr().to_string(), true);

    // Without the ca_file the certificate is nobody's: a TLS failure, retried.
    let outcome = credit(&client, &partner, "tx_1", "m").await;
    let Outcome::Retry {
        reason,
        http_status: None,
        ..
    } = &outcome
    else {
        panic!("{outcome:?}");
    };
    assert!(reason.contains("certificate"), "{reason}");
    assert!(sim.requests().is_empty());

    // With it (as the config reads it), delivered over TLS.
    partner.ca_file = Some("partner-ca.pem".into());
    partner.ca_certificates = vec![der];
    assert_eq!(
        credit(&client, &partner, "tx_2", "m").await,
        Outcome::Delivered {
            partner_transaction_id: Some("ptx_1".into())
        }
    );
    // And again, on the pooled client for that CA.
    assert!(matches!(
        credit(&client, &partner, "tx_3", "m").await,
        Outcome::Delivered { .. }
    ));
    assert_eq!(sim.credits().len(), 2);

    // Plain HTTP to the TLS port is no answer either.
    let plain = self::partner(sim.addr().to_string(), false);
    assert!(matches!(
        credit(&client, &plain, "tx_4", "m").await,
        Outcome::Retry { .. }
    ));
}
