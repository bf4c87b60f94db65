//! The delivery worker: a background task that sends due outbox jobs — credits to the
//! partners, events to the merchants' webhooks — and writes each outcome back durably.
//!
//! A job moves due → in flight → done (completed, failed) or due again later; every move
//! is a durable write through the store's writer, so a crash at any point leaves the job
//! either due (it is sent again after the restart: the receiver dedupes on `webhook-id`,
//! so it acts once) or done. "In flight" is only this process's memory, and lasts until
//! the job's outcome is durable. The outcomes that come in while one write-back commits
//! go together in the next one (one writer job for many attempts).
//!
//! A credit that completes or fails records the merchant's `transaction.completed` /
//! `transaction.failed` events in the same write, rendered then; a debit (a reversal at
//! the partner) `reversal.completed` / `reversal.failed`. A debit is sent only once its
//! credit completed: a due debit whose credit is not is held by the store (see
//! [`crate::store::Store::hold_debit`]).
//!
//! At most `concurrency` requests are in flight to one partner (or one webhook URL). The
//! worker looks at the outbox when a job may have become due at once (a new issue, a
//! redelivery, a status change: while a write-back is committing, such a look waits for
//! it, so that one look serves the batch), when its last look filled every free slot and
//! a slot frees, and every [`TICK`] for jobs that come due by time. Time comes from the
//! app's clock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::app::App;
use crate::clock::rfc3339;
use crate::delivery::{Attempt, Delivery, DeliveryError, DeliveryStatus, FailureKind, NewEvent};
use crate::domain::Partner;
use crate::ledger::{Reversal, Transaction};
use crate::partner::Outcome;
use crate::service::Stopping;
use crate::store::{Due, EventsFor, JobOutcome, OutcomeEvents, ReversalEventsFor};

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

/// An attempt whose answer is in: its outcome, to be written back.
struct Finished {
    webhook_id: String,
    outcome: JobOutcome,
}

/// Runs until `stopping` is set, then lets the attempts in flight finish and writes their
/// outcomes back (the lifecycle owner cuts them off after the shutdown grace; a cut
/// attempt stays due).
///
/// Outcomes are written back in batches: those that come in while the previous batch is
/// committing go together in the next write, so a busy worker makes one write (and one
/// look at the outbox) per batch rather than per attempt. A job stays in `in_flight`
/// until its outcome is durable, so that it is not read and sent again before then.
pub async fn run(app: Arc<App>, mut stopping: Stopping) {
    let mut in_flight: HashSet<(u8, u64)> = HashSet::new();
    let mut limits: HashMap<String, Arc<Semaphore>> = HashMap::new();
    let mut attempts: JoinSet<Attempted> = JoinSet::new();
    let mut finished: Vec<Finished> = Vec::new();
    let mut writing: Option<JoinHandle<Vec<(u8, u64)>>> = None;
    // Whether the outbox may hold due jobs this worker has not read: set by the tick, a
    // look that filled its slots or left a job due for want of a permit.
    let mut look = true;
    // A job may have become due at once. While a write-back commits, the look this asks
    // for waits for it: the jobs being written back are still in the outbox, and a look
    // now would pass over each of them, once per new issue.
    let mut changed = false;
    // One timer for the whole run: a fresh sleep per wake-up (a wake-up per issue, under
    // load) would register a timer each time, and would never fire while issues arrive.
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if stopping.is_set() {
            if attempts.is_empty() && finished.is_empty() && writing.is_none() {
                break;
            }
        } else if look || (changed && writing.is_none()) {
            changed = false;
            look = start_due(&app, &mut in_flight, &mut limits, &mut attempts).await;
        }
        if writing.is_none() && !finished.is_empty() {
            writing = Some(tokio::spawn(write_back(
                app.clone(),
                std::mem::take(&mut finished),
            )));
        }
        tokio::select! {
            () = stopping.wait(), if !stopping.is_set() => {}
            () = app.store.outbox_changed() => changed = true,
            Some(joined) = attempts.join_next() => {
                take(joined, &mut finished, &mut in_flight);
            }
            Some(written) = async { Some(writing.as_mut()?.await) } => {
                writing = None;
                match written {
                    Ok(done) => {
                        for key in done {
                            in_flight.remove(&key);
                        }
                    }
                    // The write-back task panicked: its jobs stay due, to be read again.
                    Err(_) => {
                        in_flight.clear();
                        look = true;
                    }
                }
            }
            _ = tick.tick() => look = true,
        }
        while let Some(joined) = attempts.try_join_next() {
            take(joined, &mut finished, &mut in_flight);
        }
    }
}

/// What an attempt's task ends with: its outcome, or the job it could not send (its
/// credit could not be encoded; logged), which stays due.
type Attempted = Result<Finished, (u8, u64)>;

/// Files an ended attempt: its outcome joins the next write-back, or its job is free.
fn take(
    joined: Result<Attempted, tokio::task::JoinError>,
    finished: &mut Vec<Finished>,
    in_flight: &mut HashSet<(u8, u64)>,
) {
    match joined {
        Ok(Ok(done)) => finished.push(done),
        Ok(Err(key)) => {
            in_flight.remove(&key);
        }
        // A panicked attempt: logged by the panic hook. Its job stays in `in_flight`
        // until the restart, as it did when each attempt wrote its own outcome.
        Err(_) => {}
    }
}

/// Reads the due jobs there are free slots for and starts their attempts. Returns whether
/// the outbox may hold more due jobs than were started.
async fn start_due(
    app: &Arc<App>,
    in_flight: &mut HashSet<(u8, u64)>,
    limits: &mut HashMap<String, Arc<Semaphore>>,
    attempts: &mut JoinSet<Attempted>,
) -> bool {
    let now = app.clock.now();
    // Read no more jobs than there are free slots: reading (and decoding) jobs that cannot
    // be sent yet is wasted work. While a partner is saturated its jobs may hold the head
    // of the outbox for a moment; they free their slots within one attempt's time.
    let free: usize = limits.values().map(|l| l.available_permits()).sum();
    let want = if limits.is_empty() {
        BATCH
    } else if free == 0 {
        return true;
    } else {
        free.min(BATCH)
    };
    let due = match app.store.due(now, want, in_flight).await {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(error = ?e, "cannot read the outbox; retrying");
            return false; // the tick looks again
        }
    };
    let mut more = due.len() == want;
    for job in due {
        let Some(send) = prepare(app, job, in_flight).await else {
            continue;
        };
        let limit = limits
            .entry(send.limit.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(send.endpoint.concurrency)))
            .clone();
        let Ok(permit) = limit.try_acquire_owned() else {
            more = true; // at its concurrency: it stays due
            continue;
        };
        in_flight.insert(send.key);
        let app = app.clone();
        // The permit bounds requests in flight to the partner: it is let go when the
        // answer is in, before the outcome's commit.
        attempts.spawn(async move { attempt(&app, send, permit).await });
    }
    more
}

/// Writes a batch of outcomes back in one write; returns the jobs it is done with (all of
/// them: written, or left due when the write failed).
async fn write_back(app: Arc<App>, batch: Vec<Finished>) -> Vec<(u8, u64)> {
    let keys: Vec<_> = batch.iter().map(|f| f.outcome.job).collect();
    let (ids, outcomes): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|f| (f.webhook_id, f.outcome)).unzip();
    if let Err(e) = app.store.record_outcomes(outcomes).await {
        // Not recorded: the jobs stay due and are sent again (the receivers dedupe).
        tracing::warn!(jobs = ?ids, error = ?e, "delivery outcomes were not recorded");
    }
    keys
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
            let Some(endpoint) = partner_of(app, &tx) else {
                if let Err(e) = app
                    .store
                    .update_delivery(tx.seq, partner_removed, events_for(app))
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
            let partner = partner_of(app, &transaction);
            if transaction.status() != DeliveryStatus::Completed {
                // Sent only after the credit completed; settled here if it failed. While
                // its credit is in flight, it waits about as long as one attempt takes.
                let patience = partner.as_ref().map_or(1, |p| p.timeout.as_secs() + 1);
                // Not sent from this read either way: a credit that completed since leaves
                // the debit due, and the next look reads it with the credit's partner id.
                if let Err(e) = app
                    .store
                    .hold_debit(reversal.seq, patience, reversal_events_for(app))
                    .await
                {
                    tracing::warn!(reversal = %reversal.id, error = ?e, "a debit could not be held");
                }
                return None;
            }
            let Some(endpoint) = partner else {
                if let Err(e) = app
                    .store
                    .update_debit(reversal.seq, partner_removed, reversal_events_for(app))
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

/// The partner of `tx`'s program, as configured now.
fn partner_of(app: &App, tx: &Transaction) -> Option<Partner> {
    app.config
        .programs
        .get(tx.program_id.as_str())
        .and_then(|p| p.partner.clone())
}

/// A pending credit or debit whose program has no partner any more: failed, saying so.
fn partner_removed(d: &Delivery, now: u64) -> Option<Delivery> {
    (d.status == DeliveryStatus::Pending).then(|| {
        d.removed(
            now,
            "the program's partner was removed from the configuration",
        )
    })
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

/// Sends one job; its outcome is written back with the others of its batch.
async fn attempt(app: &App, send: Job, permit: tokio::sync::OwnedSemaphorePermit) -> Attempted {
    let (body, events) = match &send.payload {
        Payload::Credit(tx) => match credit_body(tx) {
            Some(body) => (
                body,
                wants_events(app, tx.business.as_str(), "transaction")
                    .then(|| OutcomeEvents::Transaction(Box::new(events_for(app)) as EventsFor)),
            ),
            None => return Err(send.key),
        },
        Payload::Debit(pair) => match debit_body(&pair.0, &pair.1) {
            Some(body) => (
                body,
                wants_events(app, pair.0.business.as_str(), "reversal").then(|| {
                    OutcomeEvents::Reversal(Box::new(reversal_events_for(app)) as ReversalEventsFor)
                }),
            ),
            None => return Err(send.key),
        },
        Payload::Event(body) => (body.clone(), None),
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
    // A delivered attempt is the common case and the metrics count it: debug. A retry or
    // a refusal is worth an operator's eye.
    match &attempt {
        Attempt::Delivered { .. } => {
            tracing::debug!(job = %send.webhook_id, outcome = "delivered", "delivery attempt")
        }
        other => tracing::info!(
            job = %send.webhook_id,
            outcome = attempt_name(other),
            "delivery attempt"
        ),
    }
    app.metrics.delivery_attempt(attempt_name(&attempt));
    let schedule = send.endpoint.retry_schedule.clone();
    let before = send.before.attempts;
    // Only the attempt this state was read for moves it on: a redelivery or another
    // change in between wins. `Fn`: a write may be applied more than once.
    let step = move |d: &Delivery, now: u64| {
        (d.status == DeliveryStatus::Pending && d.attempts == before)
            .then(|| d.after(attempt.clone(), now, &schedule))
    };
    Ok(Finished {
        webhook_id: send.webhook_id,
        outcome: JobOutcome {
            job: send.key,
            step: Box::new(step),
            events,
        },
    })
}

/// Whether a change of status of a `what` (`transaction` or `reversal`) of `business` may
/// cause merchant events: the business has a webhook that wants `{what}.completed` or
/// `{what}.failed`.
fn wants_events(app: &App, business: &str, what: &str) -> bool {
    let (completed, failed) = (format!("{what}.completed"), format!("{what}.failed"));
    app.config.business(business).is_some_and(|b| {
        b.webhooks
            .iter()
            .any(|w| w.wants(&completed) || w.wants(&failed))
    })
}

/// The merchant webhook events a credit's change of status causes: `transaction.completed`
/// or `transaction.failed` to each of the business's webhooks that wants it, with the
/// transaction as GET shows it now.
fn events_for(
    app: &App,
) -> impl Fn(&Transaction, DeliveryStatus) -> Vec<NewEvent> + Send + Sync + 'static {
    let (config, now) = (app.config.clone(), app.clock.now());
    move |tx, before| {
        let kind = match status_change(tx.status(), before) {
            Some(DeliveryStatus::Completed) => "transaction.completed",
            Some(_) => "transaction.failed",
            None => return Vec::new(),
        };
        events(&config, now, tx.business.as_str(), kind, |out| {
            crate::api::write_transaction_json(tx, out)
        })
    }
}

/// The merchant webhook events a debit's change of status causes: `reversal.completed` or
/// `reversal.failed`, with the reversal as GET shows it now.
fn reversal_events_for(
    app: &App,
) -> impl Fn(&Reversal, DeliveryStatus) -> Vec<NewEvent> + Send + Sync + 'static {
    let (config, now) = (app.config.clone(), app.clock.now());
    move |reversal, before| {
        let kind = match status_change(reversal.status(), before) {
            Some(DeliveryStatus::Completed) => "reversal.completed",
            Some(_) => "reversal.failed",
            None => return Vec::new(),
        };
        events(&config, now, reversal.business.as_str(), kind, |out| {
            crate::api::write_reversal_json(reversal, out)
        })
    }
}

/// The status a delivery came to, if it changed to a final one (events are sent for
/// those only).
fn status_change(now: DeliveryStatus, before: DeliveryStatus) -> Option<DeliveryStatus> {
    (now != before && now != DeliveryStatus::Pending).then_some(now)
}

/// One `kind` event for each of `business`'s webhooks that wants it: `{"type", "timestamp",
/// "data": <what `data` writes>}`, rendered once.
fn events(
    config: &crate::config::Config,
    now: u64,
    business: &str,
    kind: &'static str,
    data: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
) -> Vec<NewEvent> {
    let Some(business) = config.business(business) else {
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
    if let Err(e) = data(&mut payload) {
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

fn attempt_name(attempt: &Attempt) -> &'static str {
    match attempt {
        Attempt::Delivered { .. } => "delivered",
        Attempt::Retry { .. } => "retry",
        Attempt::Failed(_) => "failed",
    }
}
