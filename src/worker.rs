//! The delivery worker: a background task that sends due outbox jobs — credits to the
//! partners, events to the merchants' webhooks — and writes each outcome back durably.
//!
//! A job moves due → in flight → done (completed, failed) or due again later; every move
//! is one write through the store's writer, so a crash at any point leaves the job either
//! due (it is sent again after the restart: the receiver dedupes on `webhook-id`, so it
//! acts once) or done. "In flight" is only this process's memory.
//!
//! A credit that completes or fails records the merchant's `transaction.completed` /
//! `transaction.failed` events in the same write, rendered then.
//!
//! At most `concurrency` requests are in flight to one partner (or one webhook URL). The
//! worker wakes when a job becomes due at once (a new issue, a redelivery, a status
//! change), when an attempt finishes, and every [`TICK`] for jobs that come due by time.
//! Time comes from the app's clock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::app::App;
use crate::clock::rfc3339;
use crate::delivery::{Attempt, Delivery, DeliveryError, DeliveryStatus, FailureKind, NewEvent};
use crate::domain::Partner;
use crate::ledger::{Reversal, Transaction};
use crate::partner::Outcome;
use crate::service::Stopping;
use crate::store::{Due, Hold};

/// How often the worker looks for jobs that came due by time.
pub const TICK: Duration = Duration::from_millis(200);
/// Jobs read from the outbox per look (more than the partners' concurrency, so that a
/// look finds work for every free slot).
const BATCH: usize = 64;

/// The body of a credit request (SPEC § Partner delivery).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Credit<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    transaction_id: String,
    business_id: &'a str,
    program_id: &'a str,
    member_id: &'a str,
    points: u64,
    bonus: bool,
    reference_number: &'a str,
    created_at: String,
}

/// The body of a debit request (SPEC § Reversals).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Debit<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    reversal_id: String,
    transaction_id: String,
    partner_transaction_id: Option<&'a str>,
    business_id: &'a str,
    program_id: &'a str,
    member_id: &'a str,
    points: u64,
    reference_number: &'a str,
    created_at: String,
}

/// A job ready to send: what, where, and the limit it counts against.
struct Job {
    key: (u8, u64),
    limit: String,
    endpoint: Partner,
    path: &'static str,
    webhook_id: String,
    payload: Payload,
    before: Delivery,
}

/// What a job sends: a credit is encoded only once the job holds its permit.
enum Payload {
    Credit(Box<Transaction>),
    Debit(Box<(Reversal, Transaction)>),
    Event(Vec<u8>),
}

/// Runs until `stopping` is set, then lets the attempts in flight finish (the lifecycle
/// owner cuts them off after the shutdown grace; a cut attempt stays due).
pub async fn run(app: Arc<App>, mut stopping: Stopping) {
    let mut in_flight: HashSet<(u8, u64)> = HashSet::new();
    let mut limits: HashMap<String, Arc<Semaphore>> = HashMap::new();
    let mut attempts = JoinSet::new();
    let (done_tx, mut done) = mpsc::unbounded_channel::<(u8, u64)>();
    while !stopping.is_set() {
        let now = app.clock.now();
        // Read no more jobs than there are free slots: the loop wakes at every finished
        // attempt, and reading (and decoding) jobs that cannot be sent yet is wasted work.
        // While a partner is saturated its jobs may hold the head of the outbox for a
        // moment; they free their slots within one attempt's time.
        let free: usize = limits.values().map(|l| l.available_permits()).sum();
        let want = if limits.is_empty() {
            BATCH
        } else {
            free.clamp(1, BATCH)
        };
        match app.store.due(now, want, &in_flight).await {
            Ok(due) => {
                for job in due {
                    let Some(send) = prepare(&app, job, &in_flight).await else {
                        continue;
                    };
                    let limit = limits
                        .entry(send.limit.clone())
                        .or_insert_with(|| Arc::new(Semaphore::new(send.endpoint.concurrency)))
                        .clone();
                    let Ok(permit) = limit.try_acquire_owned() else {
                        continue; // at its concurrency: it stays due
                    };
                    in_flight.insert(send.key);
                    let (app, done) = (app.clone(), done_tx.clone());
                    attempts.spawn(async move {
                        let key = send.key;
                        // The permit bounds requests in flight to the partner: it is let
                        // go when the answer is in, before the outcome's commit.
                        attempt(&app, send, permit).await;
                        let _ = done.send(key);
                    });
                }
            }
            Err(e) => tracing::warn!(error = ?e, "cannot read the outbox; retrying"),
        }
        tokio::select! {
            () = stopping.wait() => {}
            () = app.store.outbox_changed() => {}
            Some(key) = done.recv() => {
                in_flight.remove(&key);
            }
            () = tokio::time::sleep(TICK) => {}
        }
        while let Ok(key) = done.try_recv() {
            in_flight.remove(&key);
        }
        while attempts.try_join_next().is_some() {}
    }
    while attempts.join_next().await.is_some() {}
}

/// What to send for a due job, or `None` (in flight already, or its destination is gone:
/// then it is failed here, not dropped).
async fn prepare(app: &App, job: Due, in_flight: &HashSet<(u8, u64)>) -> Option<Job> {
    // `due` passes over jobs in flight; this guards the ones that started since.
    match job {
        Due::Credit(tx) => {
            let key = (0, tx.seq);
            if in_flight.contains(&key) {
                return None;
            }
            let before = tx.delivery.clone()?;
            let partner = app
                .config
                .programs
                .get(tx.program_id.as_str())
                .and_then(|p| p.partner.clone());
            let Some(endpoint) = partner else {
                let detail = "the program's partner was removed from the configuration";
                let step = move |d: &Delivery, now| {
                    (d.status == DeliveryStatus::Pending).then(|| d.removed(now, detail))
                };
                if let Err(e) = app
                    .store
                    .update_delivery(tx.seq, step, events_for(app))
                    .await
                {
                    tracing::warn!(transaction = %tx.id, error = ?e, "a delivery change was not recorded");
                }
                return None;
            };
            Some(Job {
                key,
                limit: format!("program:{}", tx.program_id),
                endpoint,
                path: "/credits",
                webhook_id: tx.id.to_string(),
                before: before.clone(),
                payload: Payload::Credit(Box::new(tx)),
            })
        }
        Due::Debit {
            reversal,
            transaction,
        } => {
            let key = (1, reversal.seq);
            if in_flight.contains(&key) {
                return None;
            }
            let before = reversal.delivery.clone()?;
            let partner = app
                .config
                .programs
                .get(transaction.program_id.as_str())
                .and_then(|p| p.partner.clone());
            if transaction.status() != DeliveryStatus::Completed {
                // Sent only after the credit completed; settled here if it failed. While
                // its credit is in flight, it waits about as long as one attempt takes.
                let patience = partner.as_ref().map_or(1, |p| p.timeout.as_secs() + 1);
                match app
                    .store
                    .hold_debit(reversal.seq, patience, reversal_events_for(app))
                    .await
                {
                    // The credit completed since this was read: the debit stays due, and
                    // the next look reads it with the credit's partner id.
                    Ok(Hold::Ready | Hold::Held | Hold::Unchanged) => return None,
                    Err(e) => {
                        tracing::warn!(reversal = %reversal.id, error = ?e, "a debit could not be held");
                        return None;
                    }
                }
            }
            let Some(endpoint) = partner else {
                let detail = "the program's partner was removed from the configuration";
                let step = move |d: &Delivery, now| {
                    (d.status == DeliveryStatus::Pending).then(|| d.removed(now, detail))
                };
                if let Err(e) = app
                    .store
                    .update_debit(reversal.seq, step, reversal_events_for(app))
                    .await
                {
                    tracing::warn!(reversal = %reversal.id, error = ?e, "a delivery change was not recorded");
                }
                return None;
            };
            Some(Job {
                key,
                limit: format!("program:{}", transaction.program_id),
                endpoint,
                path: "/debits",
                webhook_id: reversal.id.to_string(),
                before,
                payload: Payload::Debit(Box::new((reversal, *transaction))),
            })
        }
        Due::Event(event) => {
            let key = (2, event.seq);
            if in_flight.contains(&key) {
                return None;
            }
            let webhook = app
                .config
                .business(event.business.as_str())
                .and_then(|b| b.webhooks.iter().find(|w| w.url == event.target));
            let Some(webhook) = webhook else {
                let detail = "the webhook was removed from the configuration";
                let (seq, before) = (event.seq, event.delivery.clone());
                let _ = app
                    .store
                    .update_event(seq, move |d, now| {
                        (d.status == DeliveryStatus::Pending && *d == before)
                            .then(|| d.removed(now, detail))
                    })
                    .await;
                return None;
            };
            Some(Job {
                key,
                limit: format!("webhook:{}", webhook.url),
                endpoint: webhook.endpoint.clone(),
                path: "",
                webhook_id: event.id.clone(),
                before: event.delivery.clone(),
                payload: Payload::Event(event.payload),
            })
        }
    }
}

fn credit_body(tx: &Transaction) -> Option<Vec<u8>> {
    serde_json::to_vec(&Credit {
        kind: "points.credit",
        transaction_id: tx.id.to_string(),
        business_id: tx.business.as_str(),
        program_id: tx.program_id.as_str(),
        member_id: tx.user_id.as_str(),
        points: tx.total_points,
        bonus: tx.bonus,
        reference_number: tx.reference_number.as_str(),
        created_at: rfc3339(tx.created_at),
    })
    .map_err(|e| tracing::error!(transaction = %tx.id, error = %e, "cannot encode a credit"))
    .ok()
}

fn debit_body(reversal: &Reversal, tx: &Transaction) -> Option<Vec<u8>> {
    serde_json::to_vec(&Debit {
        kind: "points.debit",
        reversal_id: reversal.id.to_string(),
        transaction_id: tx.id.to_string(),
        partner_transaction_id: tx
            .delivery
            .as_ref()
            .and_then(|d| d.partner_transaction_id.as_deref()),
        business_id: tx.business.as_str(),
        program_id: tx.program_id.as_str(),
        member_id: tx.user_id.as_str(),
        points: reversal.points,
        reference_number: reversal.reference_number.as_str(),
        created_at: rfc3339(reversal.created_at),
    })
    .map_err(|e| tracing::error!(reversal = %reversal.id, error = %e, "cannot encode a debit"))
    .ok()
}

/// Sends one job and writes its outcome back.
async fn attempt(app: &App, send: Job, permit: tokio::sync::OwnedSemaphorePermit) {
    let body = match &send.payload {
        Payload::Credit(tx) => match credit_body(tx) {
            Some(body) => body,
            None => return,
        },
        Payload::Debit(pair) => match debit_body(&pair.0, &pair.1) {
            Some(body) => body,
            None => return,
        },
        Payload::Event(body) => body.clone(),
    };
    let outcome = app
        .partners
        .send(
            &send.endpoint,
            send.path,
            &send.webhook_id,
            app.clock.now(),
            send.before.attempts.saturating_add(1),
            &body,
        )
        .await;
    drop(permit);
    let attempt = match outcome {
        Outcome::Delivered {
            partner_transaction_id,
        } => Attempt::Delivered {
            partner_transaction_id,
        },
        Outcome::Retry {
            reason,
            http_status,
            retry_after,
        } => Attempt::Retry {
            http_status,
            detail: reason,
            retry_after,
        },
        Outcome::Rejected {
            http_status,
            detail,
        } => Attempt::Failed(DeliveryError {
            kind: FailureKind::Rejected,
            http_status: Some(http_status),
            detail,
        }),
    };
    tracing::info!(
        job = %send.webhook_id,
        outcome = attempt_name(&attempt),
        "delivery attempt"
    );
    app.metrics.delivery_attempt(attempt_name(&attempt));
    let schedule = send.endpoint.retry_schedule.clone();
    let before = send.before.clone();
    // Only the attempt this state was read for moves it on: a redelivery or another
    // change in between wins.
    let step = move |d: &Delivery, now: u64| {
        (d.status == DeliveryStatus::Pending && d.attempts == before.attempts)
            .then(|| d.after(attempt, now, &schedule))
    };
    let written = match send.key {
        (0, seq) => app
            .store
            .update_delivery(seq, step, events_for(app))
            .await
            .map(|_| ()),
        (1, seq) => app
            .store
            .update_debit(seq, step, reversal_events_for(app))
            .await
            .map(|_| ()),
        (_, seq) => app.store.update_event(seq, step).await.map(|_| ()),
    };
    if let Err(e) = written {
        // Not recorded: the job stays due and is sent again (the receiver dedupes).
        tracing::warn!(job = %send.webhook_id, error = ?e, "a delivery outcome was not recorded");
    }
}

/// The merchant webhook events a credit's change of status causes: `transaction.completed`
/// or `transaction.failed` to each of the business's webhooks that wants it, with the
/// transaction as GET shows it now.
fn events_for(
    app: &App,
) -> impl FnOnce(&Transaction, DeliveryStatus) -> Vec<NewEvent> + Send + 'static {
    let config = app.config.clone();
    let now = app.clock.now();
    move |tx, before| {
        let kind = match tx.status() {
            s if s == before => return Vec::new(),
            DeliveryStatus::Completed => "transaction.completed",
            DeliveryStatus::Failed => "transaction.failed",
            DeliveryStatus::Pending => return Vec::new(),
        };
        let Some(business) = config.business(tx.business.as_str()) else {
            return Vec::new();
        };
        let hooks: Vec<_> = business.webhooks.iter().filter(|w| w.wants(kind)).collect();
        if hooks.is_empty() {
            return Vec::new();
        }
        let mut payload = format!(
            "{{\"type\":\"{kind}\",\"timestamp\":\"{}\",\"data\":",
            rfc3339(now)
        )
        .into_bytes();
        if let Err(e) = crate::api::write_transaction_json(tx, &mut payload) {
            tracing::error!(error = %e, "cannot render a webhook event");
            return Vec::new();
        }
        payload.push(b'}');
        hooks
            .into_iter()
            .map(|w| NewEvent {
                target: w.url.clone(),
                kind,
                payload: payload.clone(),
            })
            .collect()
    }
}

/// The merchant webhook events a debit's change of status causes: `reversal.completed` or
/// `reversal.failed`, with the reversal as GET shows it now.
fn reversal_events_for(
    app: &App,
) -> impl FnOnce(&Reversal, DeliveryStatus) -> Vec<NewEvent> + Send + 'static {
    let config = app.config.clone();
    let now = app.clock.now();
    move |reversal, before| {
        let kind = match reversal.status() {
            s if s == before => return Vec::new(),
            DeliveryStatus::Completed => "reversal.completed",
            DeliveryStatus::Failed => "reversal.failed",
            DeliveryStatus::Pending => return Vec::new(),
        };
        let Some(business) = config.business(reversal.business.as_str()) else {
            return Vec::new();
        };
        let hooks: Vec<_> = business.webhooks.iter().filter(|w| w.wants(kind)).collect();
        if hooks.is_empty() {
            return Vec::new();
        }
        let mut payload = format!(
            "{{\"type\":\"{kind}\",\"timestamp\":\"{}\",\"data\":",
            rfc3339(now)
        )
        .into_bytes();
        if let Err(e) = crate::api::write_reversal_json(reversal, &mut payload) {
            tracing::error!(error = %e, "cannot render a webhook event");
            return Vec::new();
        }
        payload.push(b'}');
        hooks
            .into_iter()
            .map(|w| NewEvent {
                target: w.url.clone(),
                kind,
                payload: payload.clone(),
            })
            .collect()
    }
}

fn attempt_name(attempt: &Attempt) -> &'static str {
    match attempt {
        Attempt::Delivered { .. } => "delivered",
        Attempt::Retry { .. } => "retry",
        Attempt::Failed(_) => "failed",
    }
}
