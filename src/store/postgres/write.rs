//! This process's writer: a thread of its own (with a small runtime and one connection of
//! its own) that takes every write waiting in the queue (up to `max_batch`), applies them
//! in ONE `READ COMMITTED` transaction, COMMITs (with `synchronous_commit = on`), and only
//! then answers each caller: group commit, per process.
//!
//! A write is an [`Op`]: owned data and `Fn` closures, applied by async functions, so
//! that a batch can be applied again from the start. PostgreSQL breaks a deadlock
//! (40P01) or a serialization failure (40001) by aborting one transaction; the writer
//! then re-runs the whole batch, a few times with a short random backoff, and never
//! answers 500 for it. Any other failure (a lost connection, a full disk) aborts the
//! batch: every caller in it gets `Unavailable` (nothing of it committed, or, for a
//! connection lost during COMMIT, nothing the caller may count on: the idempotent
//! referenceNumber makes a retry safe), and the next batch connects again.
//!
//! Idempotency rests on the UNIQUE constraints, never on a check-then-insert: an issue is
//! `INSERT … ON CONFLICT (business, reference_number) DO NOTHING RETURNING seq`, and
//! when nothing returns, the row that holds the reference is read (a new statement: under
//! READ COMMITTED it sees the row of the transaction the insert waited for) and the
//! request is its replay or a conflict.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, IsolationLevel, NoTls, Statement};

use super::rows::{
    self, big, big_opt, delivery_at, delivery_columns, get_u64, reversal_columns, status_code,
    tx_columns, Ciphers, DELIVERY_COLUMN_COUNT, JOB_CREDIT, JOB_DEBIT, JOB_EVENT, REVERSAL_FROM,
    TX_FROM,
};
use super::{describe, retryable};
use crate::clock::Clock;
use crate::delivery::{Delivery, DeliveryStatus, NewEvent};
use crate::domain::{DestinationUserId, EndUserId, ProgramId};
use crate::ledger::Connection;
use crate::ledger::{plan_reversal, Recipient, Rejection, Reversal, Transaction, MAX_REVERSALS};
use crate::store::{
    fill_batch, Connect, Connected, DeliveryStep, EventsFor, Issue, Issued, JobOutcome,
    OutcomeEvents, Redelivery, ReversalEventsFor, Reverse, Reversed, StoreError,
};

/// How many times a batch is applied when PostgreSQL aborts it for a deadlock or a
/// serialization failure, before its callers get `Unavailable`.
const ATTEMPTS: u32 = 8;

/// One write, as data: it can be applied again.
pub(crate) enum Op {
    Issue(Box<Issue>),
    IssueMany(Vec<Issue>),
    Connect(Connect),
    Reverse(Reverse),
    UpdateDelivery {
        seq: u64,
        step: DeliveryStep,
        events: EventsFor,
    },
    UpdateEvent {
        seq: u64,
        step: DeliveryStep,
    },
    Redeliver(u64),
    UpdateDebit {
        seq: u64,
        step: DeliveryStep,
        events: ReversalEventsFor,
    },
    HoldDebit {
        seq: u64,
        patience: u64,
        events: ReversalEventsFor,
    },
    Outcomes(Vec<JobOutcome>),
}

/// What an [`Op`] came to, by its kind.
pub(crate) enum Done {
    Issued(Issued),
    IssuedMany(Vec<Issued>),
    Connected(Connected),
    Reversed(Reversed),
    Delivery(Option<(Transaction, bool)>),
    Event(Option<bool>),
    Redelivery(Redelivery),
    Debit(Option<(Reversal, bool)>),
    Held(bool),
    /// Whether the outbox may have a job due at once (the worker should look).
    Outcomes(bool),
}

pub(crate) enum Job {
    Write(Op, oneshot::Sender<Result<Done, StoreError>>),
    /// Finish what is queued before this, then stop.
    Stop,
}

/// What the writer shares with the store: its counters and the commit hook.
#[derive(Default)]
pub(crate) struct Stats {
    pub commits: AtomicU64,
    pub writes: AtomicU64,
    pub on_commit: OnceLock<Box<dyn Fn(usize, Duration) + Send + Sync>>,
}

pub(crate) struct Writer {
    pub config: tokio_postgres::Config,
    pub ciphers: Arc<Ciphers>,
    pub clock: Clock,
    pub max_batch: usize,
    pub stats: Arc<Stats>,
    /// This process's `claimed_by` (see `Postgres::due`).
    pub claimant: i64,
}

/// Why a batch did not commit.
pub(crate) enum Fail {
    /// A deadlock or serialization failure, or a row that a conflicting insert promised
    /// and that is not there: apply the batch again.
    Retry,
    /// The batch cannot be written now (a lost connection, a failed COMMIT): every caller
    /// in it gets this.
    Store(StoreError),
    /// This op's own data cannot be written (a value PostgreSQL refuses, a stored row
    /// that does not decode): it alone fails, and the batch runs again without it.
    Op(StoreError),
    /// [`Fail::Op`] of the op at this position of the batch.
    OpAt(usize, StoreError),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        Fail::Op(e)
    }
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Fail {
        if retryable(&e) {
            return Fail::Retry;
        }
        tracing::error!(error = %describe(&e), "PostgreSQL write failed");
        // Class 22 (data exception) and 23 (integrity constraint violation): what this
        // op wrote, not the connection or the server.
        match e.code().map(|c| c.code()) {
            Some(code) if code.starts_with("22") || code.starts_with("23") => {
                Fail::Op(StoreError::Corrupt)
            }
            _ => Fail::Store(StoreError::Unavailable),
        }
    }
}

impl Writer {
    /// Runs on its own thread until the queue closes or a `Stop` arrives.
    pub fn run(self, rx: mpsc::Receiver<Job>) {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(self.serve(rx)),
            Err(e) => tracing::error!(error = %e, "the PostgreSQL writer cannot start"),
        }
    }

    async fn serve(self, mut rx: mpsc::Receiver<Job>) {
        let mut client: Option<Session> = None;
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut stopping = false;
        while !stopping {
            let Some(first) = rx.recv().await else {
                break;
            };
            batch.push(first);
            stopping = fill_batch(&mut rx, &mut batch, self.max_batch, |j| {
                matches!(j, Job::Stop)
            });
            let (ops, replies): (Vec<Op>, Vec<_>) = batch
                .drain(..)
                .filter_map(|job| match job {
                    Job::Write(op, reply) => Some((op, reply)),
                    Job::Stop => None,
                })
                .unzip();
            if ops.is_empty() {
                continue;
            }
            match self.write(&mut client, &ops).await {
                Ok(done) => {
                    for (reply, done) in replies.into_iter().zip(done) {
                        let _ = reply.send(done);
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
        rx.close();
    }

    async fn connect(&self) -> Result<Session, StoreError> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(|e| {
            tracing::error!(error = %describe(&e), "the writer cannot connect to PostgreSQL");
            StoreError::Unavailable
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %describe(&e), "the writer's PostgreSQL connection ended");
            }
        });
        // Acknowledged only once durable, whatever the database's default says.
        // A batch that hangs (a lock held by a process that went silent) or a process that
        // goes silent holding this session's locks is ended by the server, so no other
        // process's writes wait on it for long: the batch fails (503) and runs no more.
        client
            .batch_execute(
                "SET synchronous_commit = on; SET statement_timeout = '60s'; \
                 SET idle_in_transaction_session_timeout = '60s'",
            )
            .await
            .map_err(|e| {
                tracing::error!(error = %describe(&e), "cannot set synchronous_commit");
                StoreError::Unavailable
            })?;
        Ok(Session {
            client,
            statements: Mutex::new(HashMap::new()),
        })
    }

    /// Applies `ops` in one transaction and commits, again after a deadlock or a
    /// serialization failure. Every op's outcome, in order.
    async fn write(
        &self,
        client: &mut Option<Session>,
        ops: &[Op],
    ) -> Result<Vec<Result<Done, StoreError>>, StoreError> {
        // The ops that failed on their own data: left out of the next application.
        let mut failed: Vec<Option<StoreError>> = vec![None; ops.len()];
        let mut attempt = 0;
        loop {
            if client.as_ref().is_none_or(|s| s.client.is_closed()) {
                *client = None;
                *client = Some(self.connect().await?);
            }
            let Some(c) = client.as_mut() else {
                return Err(StoreError::Unavailable);
            };
            let (positions, running): (Vec<usize>, Vec<&Op>) = ops
                .iter()
                .enumerate()
                .filter(|(i, _)| failed[*i].is_none())
                .unzip();
            match apply(c, &self.ciphers, self.claimant, self.clock.now(), &running).await {
                Ok((done, took)) => {
                    if let Some(hook) = self.stats.on_commit.get() {
                        hook(done.len(), took);
                    }
                    self.stats.commits.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .writes
                        .fetch_add(done.len() as u64, Ordering::Relaxed);
                    let mut done = done.into_iter();
                    return Ok(failed
                        .into_iter()
                        .map(|f| match f {
                            Some(e) => Err(e),
                            None => done.next().ok_or(StoreError::Corrupt),
                        })
                        .collect());
                }
                Err(Fail::OpAt(at, e)) => {
                    // Rolled back; the others run again without it (at most once per op).
                    if let Some(&position) = positions.get(at) {
                        failed[position] = Some(e);
                    } else {
                        return Err(StoreError::Corrupt);
                    }
                }
                Err(Fail::Retry) if attempt + 1 < ATTEMPTS => {
                    attempt += 1;
                    tracing::debug!(
                        attempt,
                        "a batch met a deadlock or a serialization failure; applying it again"
                    );
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(Fail::Retry) => {
                    tracing::error!(
                        attempts = attempt + 1,
                        "a batch kept meeting deadlocks; given up"
                    );
                    return Err(StoreError::Unavailable);
                }
                Err(Fail::Store(e) | Fail::Op(e)) => {
                    if c.client.is_closed() {
                        *client = None;
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// A random wait that grows with the attempt (2–4 ms, 4–8 ms, …, at most about 0.5 s), so
/// that two processes whose batches deadlocked do not meet again in step.
fn backoff(attempt: u32) -> Duration {
    let base = 2u64 << attempt.min(8);
    let random = crate::auth::random_secret()
        .first()
        .copied()
        .map_or(0, u64::from);
    Duration::from_millis(base + base * random / 256)
}

/// One application of a batch: begin, every op in order, commit. Its outcomes and how long
/// the COMMIT took.
async fn apply(
    session: &mut Session,
    ciphers: &Ciphers,
    claimant: i64,
    now: u64,
    ops: &[&Op],
) -> Result<(Vec<Done>, Duration), Fail> {
    let t = session
        .client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await?;
    let mut done = Vec::with_capacity(ops.len());
    {
        let batch = Batch {
            t: &t,
            statements: &session.statements,
            c: ciphers,
            claimant,
            now,
        };
        for (at, op) in ops.iter().enumerate() {
            match batch.apply(op).await {
                Ok(outcome) => done.push(outcome),
                Err(Fail::Op(e)) => return Err(Fail::OpAt(at, e)),
                Err(e) => return Err(e),
            }
        }
    }
    let committing = Instant::now();
    t.commit().await?;
    Ok((done, committing.elapsed()))
}

type Step<'a> = &'a (dyn Fn(&Delivery, u64) -> Option<Delivery> + Send + Sync);
type TxEvents<'a> = &'a (dyn Fn(&Transaction, DeliveryStatus) -> Vec<NewEvent> + Send + Sync);
type RevEvents<'a> = &'a (dyn Fn(&Reversal, DeliveryStatus) -> Vec<NewEvent> + Send + Sync);

fn no_tx_events(_: &Transaction, _: DeliveryStatus) -> Vec<NewEvent> {
    Vec::new()
}

/// The writer's connection and the statements prepared on it (each SQL text is parsed
/// and planned once per connection, then only bound and executed: one round trip).
pub(crate) struct Session {
    client: Client,
    statements: Mutex<HashMap<String, Statement>>,
}

/// The transaction a batch runs in, and what its writes share.
pub(crate) struct Batch<'a> {
    pub t: &'a tokio_postgres::Transaction<'a>,
    pub statements: &'a Mutex<HashMap<String, Statement>>,
    pub c: &'a Ciphers,
    /// This process's `claimed_by`.
    pub claimant: i64,
    /// The batch's time: every record it writes is dated with it.
    pub now: u64,
}

impl Batch<'_> {
    /// `sql` prepared on this connection, once.
    async fn prepared(&self, sql: &str) -> Result<Statement, Fail> {
        let cached = self
            .statements
            .lock()
            .ok()
            .and_then(|cache| cache.get(sql).cloned());
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = self.t.prepare(sql).await?;
        if let Ok(mut cache) = self.statements.lock() {
            cache.insert(sql.to_owned(), statement.clone());
        }
        Ok(statement)
    }

    async fn apply(&self, op: &Op) -> Result<Done, Fail> {
        Ok(match op {
            Op::Issue(issue) => Done::Issued(self.issue(issue).await?),
            Op::IssueMany(issues) => {
                let mut out = Vec::with_capacity(issues.len());
                for issue in issues {
                    out.push(self.issue(issue).await?);
                }
                Done::IssuedMany(out)
            }
            Op::Connect(c) => Done::Connected(self.connect(c).await?),
            Op::Reverse(r) => Done::Reversed(self.reverse(r).await?),
            Op::UpdateDelivery { seq, step, events } => Done::Delivery(
                self.update_delivery(*seq, step.as_ref(), events.as_ref())
                    .await?,
            ),
            Op::UpdateEvent { seq, step } => Done::Event(
                self.step_delivery(JOB_EVENT, *seq, step.as_ref())
                    .await?
                    .map(|(_, next)| next.is_some()),
            ),
            Op::Redeliver(seq) => Done::Redelivery(self.redeliver_credit(*seq).await?),
            Op::UpdateDebit { seq, step, events } => Done::Debit(
                self.update_debit(*seq, step.as_ref(), events.as_ref())
                    .await?,
            ),
            Op::HoldDebit {
                seq,
                patience,
                events,
            } => Done::Held(self.hold_debit(*seq, *patience, events.as_ref()).await?),
            Op::Outcomes(outcomes) => {
                let mut look = false;
                for outcome in outcomes {
                    let (due_now, recorded) = self.record_outcome(outcome).await?;
                    look |= due_now || recorded;
                }
                Done::Outcomes(look)
            }
        })
    }

    /// A replay or a conflict if the referenceNumber exists (also when an earlier write of
    /// this batch, or a concurrent one of another process, made it); else the new row and,
    /// for a program with a partner, its credit's delivery.
    async fn issue(&self, issue: &Issue) -> Result<Issued, Fail> {
        let r = &issue.request;
        let end_user = match &r.recipient {
            Recipient::EndUser(e) => Some(e.as_str()),
            Recipient::Member(_) => None,
        };
        let description = r.description.as_ref().map(|d| d.as_str());
        let inserted = self
            .t
            .query_opt(
                &self
                    .prepared(
                        "INSERT INTO transactions (seq, business, reference_number, program_id, \
                 program_name, user_id, description, currency, value, total_points, bonus, \
                 created_at, end_user_id) \
                 VALUES (nextval('transactions_seq'), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
                 $11, $12) \
                 ON CONFLICT (business, reference_number) DO NOTHING RETURNING seq",
                    )
                    .await?,
                &[
                    &issue.business.as_str(),
                    &r.reference_number.as_str(),
                    &r.program_id.as_str(),
                    &issue.program_name,
                    &issue.user_id.as_str(),
                    &description,
                    &issue.currency,
                    &big(r.value)?,
                    &big(issue.total_points)?,
                    &r.bonus,
                    &big(self.now)?,
                    &end_user,
                ],
            )
            .await?;
        let Some(row) = inserted else {
            let existing = self
                .t
                .query_opt(
                    &self.prepared(&format!(
                        "SELECT {} FROM {TX_FROM} WHERE t.business = $1 AND t.reference_number = $2",
                        tx_columns()
                    )).await?,
                    &[&issue.business.as_str(), &r.reference_number.as_str()],
                )
                .await?;
            // The insert that conflicted rolled back after all: apply the batch again.
            let Some(row) = existing else {
                return Err(Fail::Retry);
            };
            let tx = rows::transaction(&self.c.ids, &row)?;
            return Ok(match tx.differing_field(r) {
                None => Issued::Replayed(tx),
                Some(field) => Issued::Conflict(field),
            });
        };
        let seq = get_u64(&row, 0)?;
        let delivery = issue.deliver.then(|| Delivery::new(self.now));
        if let Some(d) = &delivery {
            self.insert_delivery(JOB_CREDIT, seq, d).await?;
        }
        Ok(Issued::Created(Transaction {
            id: self.c.ids.encode(seq),
            business: issue.business.clone(),
            reference_number: r.reference_number.clone(),
            program_id: r.program_id.clone(),
            program_name: issue.program_name.clone(),
            user_id: issue.user_id.clone(),
            end_user_id: match &r.recipient {
                Recipient::EndUser(e) => Some(e.clone()),
                Recipient::Member(_) => None,
            },
            description: r.description.clone(),
            currency: issue.currency.clone(),
            value: r.value,
            total_points: issue.total_points,
            bonus: r.bonus,
            created_at: self.now,
            seq,
            delivery,
            reversed_value: 0,
            reversed_points: 0,
            reversals: Vec::new(),
        }))
    }

    /// Creates the connection, or updates its destination and `updated_at` (keeping
    /// `created_at`): one upsert.
    async fn connect(&self, c: &Connect) -> Result<Connected, Fail> {
        let now = big(self.now)?;
        let row = self
            .t
            .query_one(
                &self
                    .prepared(
                        "INSERT INTO connections (business, end_user_id, program_id, \
                 destination_user_id, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5) \
                 ON CONFLICT (business, end_user_id, program_id) DO UPDATE \
                 SET destination_user_id = EXCLUDED.destination_user_id, \
                 updated_at = EXCLUDED.updated_at \
                 RETURNING created_at, (xmax = 0) AS inserted",
                    )
                    .await?,
                &[
                    &c.business.as_str(),
                    &c.end_user_id.as_str(),
                    &c.program_id.as_str(),
                    &c.destination_user_id.as_str(),
                    &now,
                ],
            )
            .await?;
        let created_at = get_u64(&row, 0)?;
        let inserted: bool = row.try_get(1).map_err(|e| {
            tracing::error!(error = %e, "an upsert answered without its flag");
            StoreError::Corrupt
        })?;
        Ok((
            Connection {
                end_user_id: EndUserId::trusted(c.end_user_id.as_str().to_owned()),
                program_id: ProgramId::trusted(c.program_id.as_str().to_owned()),
                destination_user_id: DestinationUserId::trusted(
                    c.destination_user_id.as_str().to_owned(),
                ),
                created_at,
                updated_at: self.now,
            },
            inserted,
        ))
    }

    /// The transaction `seq` with its delivery (reversals not read in).
    async fn transaction(&self, seq: u64) -> Result<Option<Transaction>, Fail> {
        let row = self
            .t
            .query_opt(
                &self
                    .prepared(&format!(
                        "SELECT {} FROM {TX_FROM} WHERE t.seq = $1",
                        tx_columns()
                    ))
                    .await?,
                &[&big(seq)?],
            )
            .await?;
        Ok(row
            .map(|row| rows::transaction(&self.c.ids, &row))
            .transpose()?)
    }

    async fn transaction_of(&self, seq: u64) -> Result<Transaction, Fail> {
        self.transaction(seq).await?.ok_or_else(|| {
            tracing::error!(seq, "a delivery names a missing transaction");
            Fail::Store(StoreError::Corrupt)
        })
    }

    async fn with_reversals(&self, mut tx: Transaction) -> Result<Transaction, Fail> {
        if tx.reversed_value == 0 {
            return Ok(tx);
        }
        let found = self
            .t
            .query(
                &self
                    .prepared(&format!(
                        "SELECT {} FROM {REVERSAL_FROM} WHERE r.tx_seq = $1 ORDER BY r.seq",
                        reversal_columns()
                    ))
                    .await?,
                &[&big(tx.seq)?],
            )
            .await?;
        for row in &found {
            tx.reversals.push(rows::reversal(self.c, row)?);
        }
        Ok(tx)
    }

    async fn reversal(&self, seq: u64) -> Result<Option<Reversal>, Fail> {
        let row = self
            .t
            .query_opt(
                &self
                    .prepared(&format!(
                        "SELECT {} FROM {REVERSAL_FROM} WHERE r.seq = $1",
                        reversal_columns()
                    ))
                    .await?,
                &[&big(seq)?],
            )
            .await?;
        Ok(row.map(|row| rows::reversal(self.c, &row)).transpose()?)
    }

    async fn reversal_of(&self, seq: u64) -> Result<Reversal, Fail> {
        self.reversal(seq).await?.ok_or_else(|| {
            tracing::error!(seq, "a debit names a missing reversal");
            Fail::Store(StoreError::Corrupt)
        })
    }

    async fn reversal_by_reference(
        &self,
        business: &str,
        reference: &str,
    ) -> Result<Option<Reversal>, Fail> {
        let row = self
            .t
            .query_opt(
                &self.prepared(&format!(
                    "SELECT {} FROM {REVERSAL_FROM} WHERE r.business = $1 AND r.reference_number = $2",
                    reversal_columns()
                )).await?,
                &[&business, &reference],
            )
            .await?;
        Ok(row.map(|row| rows::reversal(self.c, &row)).transpose()?)
    }

    /// The delivery `(kind, id)`, locked until the batch commits.
    async fn lock_delivery(&self, kind: i16, id: u64) -> Result<Option<Delivery>, Fail> {
        Ok(self.lock_claimed(kind, id).await?.map(|(d, _)| d))
    }

    /// The delivery `(kind, id)`, locked, and whether another process holds a live claim
    /// on it (see `Postgres::due`).
    async fn lock_claimed(&self, kind: i16, id: u64) -> Result<Option<(Delivery, bool)>, Fail> {
        let statement = self
            .prepared(&format!(
                "SELECT {}, d.claimed_by, d.claimed_until FROM deliveries d \
                 WHERE d.kind = $1 AND d.id = $2 FOR UPDATE",
                delivery_columns()
            ))
            .await?;
        let Some(row) = self.t.query_opt(&statement, &[&kind, &big(id)?]).await? else {
            return Ok(None);
        };
        let Some(delivery) = delivery_at(&row, 0)? else {
            return Ok(None);
        };
        let claimed_by: Option<i64> = row.try_get(DELIVERY_COLUMN_COUNT)?;
        let claimed_until: Option<i64> = row.try_get(DELIVERY_COLUMN_COUNT + 1)?;
        let now = big(self.now)?;
        let theirs = claimed_by.is_some_and(|by| by != self.claimant)
            && claimed_until.is_some_and(|until| until > now);
        Ok(Some((delivery, theirs)))
    }

    async fn insert_delivery(&self, kind: i16, id: u64, d: &Delivery) -> Result<(), Fail> {
        let p = DeliveryParams::of(kind, id, d)?;
        let statement = self
            .prepared(
                "INSERT INTO deliveries (kind, id, status, attempts, step, last_attempt_at, \
                 next_attempt_at, partner_transaction_id, error_kind, error_http_status, \
                 error_detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .await?;
        self.t.execute(&statement, &p.params()).await?;
        Ok(())
    }

    /// Writes a delivery's new state; any claim on it ends (its attempt is over).
    async fn put_delivery(&self, kind: i16, id: u64, d: &Delivery) -> Result<(), Fail> {
        let p = DeliveryParams::of(kind, id, d)?;
        let statement = self
            .prepared(
                "UPDATE deliveries SET status = $3, attempts = $4, step = $5, \
                 last_attempt_at = $6, next_attempt_at = $7, partner_transaction_id = $8, \
                 error_kind = $9, error_http_status = $10, error_detail = $11, \
                 claimed_until = NULL, claimed_by = NULL \
                 WHERE kind = $1 AND id = $2",
            )
            .await?;
        self.t.execute(&statement, &p.params()).await?;
        Ok(())
    }

    /// Moves the delivery `(kind, id)` on with `step`: `None` if there is none, else its
    /// status before and the new state (`None`: left as it was).
    async fn step_delivery(
        &self,
        kind: i16,
        id: u64,
        step: Step<'_>,
    ) -> Result<Option<(DeliveryStatus, Option<Delivery>)>, Fail> {
        self.step_delivery_as(kind, id, step, false).await
    }

    /// [`Batch::step_delivery`]; for an attempt's outcome (`outcome`), the delivery is
    /// left as it is while another process holds a live claim on it: the attempt
    /// outlived its lease (this process stalled) and the other process is sending the job
    /// now, so its outcome decides, and this late one must neither end its claim nor make
    /// the job due again beside it.
    async fn step_delivery_as(
        &self,
        kind: i16,
        id: u64,
        step: Step<'_>,
        outcome: bool,
    ) -> Result<Option<(DeliveryStatus, Option<Delivery>)>, Fail> {
        let Some((current, theirs)) = self.lock_claimed(kind, id).await? else {
            return Ok(None);
        };
        if outcome && theirs {
            tracing::warn!(
                kind,
                id,
                "an attempt's outcome came after its lease and another process's claim; not recorded"
            );
            return Ok(Some((current.status, None)));
        }
        let next = step(&current, self.now);
        if let Some(next) = &next {
            self.put_delivery(kind, id, next).await?;
        }
        Ok(Some((current.status, next)))
    }

    /// As the redb writer's `update_delivery`: the credit moves on, its waiting debits
    /// follow it, and a change records the events `events` makes.
    async fn update_delivery(
        &self,
        seq: u64,
        step: Step<'_>,
        events: TxEvents<'_>,
    ) -> Result<Option<(Transaction, bool)>, Fail> {
        let Some((before, next)) = self.step_delivery(JOB_CREDIT, seq, step).await? else {
            return Ok(None);
        };
        let tx = self.transaction_of(seq).await?;
        if let (Some(next), true) = (&next, tx.reversed_value > 0) {
            self.retime_debits(seq, next).await?;
        }
        let tx = self.with_reversals(tx).await?;
        if next.is_some() {
            for event in events(&tx, before) {
                self.record_event(tx.business.as_str(), event).await?;
            }
        }
        Ok(Some((tx, next.is_some())))
    }

    /// As the redb writer's `record_outcome`: whether the job is due again at once (or made
    /// a debit due), and whether events were recorded.
    async fn record_outcome(&self, outcome: &JobOutcome) -> Result<(bool, bool), Fail> {
        let (kind, id) = outcome.job;
        let now = self.now;
        let due_now = |next: &Delivery| next.next_attempt_at.is_some_and(|at| at <= now);
        let kind = i16::from(kind);
        let step = outcome.step.as_ref();
        match kind {
            JOB_EVENT => {
                let Some((_, Some(next))) = self.step_delivery_as(kind, id, step, true).await?
                else {
                    return Ok((false, false));
                };
                Ok((due_now(&next), false))
            }
            JOB_CREDIT => {
                let Some((before, Some(next))) =
                    self.step_delivery_as(kind, id, step, true).await?
                else {
                    return Ok((false, false));
                };
                let debits_due = self.retime_debits(id, &next).await?;
                let mut recorded = false;
                if let (Some(OutcomeEvents::Transaction(events)), true) =
                    (&outcome.events, next.status != before)
                {
                    let tx = self.transaction_of(id).await?;
                    let tx = self.with_reversals(tx).await?;
                    for event in events(&tx, before) {
                        self.record_event(tx.business.as_str(), event).await?;
                        recorded = true;
                    }
                }
                Ok((due_now(&next) || debits_due, recorded))
            }
            JOB_DEBIT => {
                let Some((before, Some(next))) =
                    self.step_delivery_as(kind, id, step, true).await?
                else {
                    return Ok((false, false));
                };
                let mut recorded = false;
                if let (Some(OutcomeEvents::Reversal(events)), true) =
                    (&outcome.events, next.status != before)
                {
                    let found = self.reversal_of(id).await?;
                    for event in events(&found, before) {
                        self.record_event(found.business.as_str(), event).await?;
                        recorded = true;
                    }
                }
                Ok((due_now(&next), recorded))
            }
            _ => {
                tracing::error!(
                    kind,
                    id,
                    "an outcome for a job kind this build does not know"
                );
                Ok((false, false))
            }
        }
    }

    /// Re-times the pending, never attempted debits of transaction `tx_seq` after its
    /// credit changed to `credit` (as the redb writer does): due now once the credit is
    /// done, else with the credit's next attempt. Whether any became due now. Only the due
    /// time changes: a claim on a debit stays.
    async fn retime_debits(&self, tx_seq: u64, credit: &Delivery) -> Result<bool, Fail> {
        let due = match (credit.status, credit.next_attempt_at) {
            (DeliveryStatus::Pending, Some(credit_due)) => credit_due.max(self.now),
            _ => self.now,
        };
        let moved = self
            .t
            .execute(
                &self
                    .prepared(
                        "UPDATE deliveries d SET next_attempt_at = $2 FROM reversals r \
                 WHERE r.tx_seq = $1 AND d.kind = 1 AND d.id = r.seq \
                 AND d.status = 0 AND d.attempts = 0",
                    )
                    .await?,
                &[&big(tx_seq)?, &big(due)?],
            )
            .await?;
        Ok(moved > 0 && due <= self.now)
    }

    /// As the redb writer's `redeliver_credit`. The transaction's row is locked first (as
    /// a reversal locks it), so that no reversal comes between the check and the change.
    async fn redeliver_credit(&self, seq: u64) -> Result<Redelivery, Fail> {
        let row = self
            .t
            .query_opt(
                &self
                    .prepared(&format!(
                        "SELECT {} FROM {TX_FROM} WHERE t.seq = $1 FOR UPDATE OF t",
                        tx_columns()
                    ))
                    .await?,
                &[&big(seq)?],
            )
            .await?;
        let Some(row) = row else {
            return Ok(Redelivery::NotFailed(None));
        };
        let tx = rows::transaction(&self.c.ids, &row)?;
        if tx.reversed_value > 0 {
            return Ok(Redelivery::Reversed(Box::new(tx)));
        }
        let redeliver = |d: &Delivery, now: u64| d.redeliver(now);
        match self.update_delivery(seq, &redeliver, &no_tx_events).await? {
            Some((tx, true)) => Ok(Redelivery::Redelivered(Box::new(tx))),
            Some((tx, false)) => Ok(Redelivery::NotFailed(Some(Box::new(tx)))),
            None => Ok(Redelivery::NotFailed(Some(Box::new(tx)))),
        }
    }

    /// As the redb writer's `reverse`, with the transaction's row locked (`FOR UPDATE`)
    /// while it decides: concurrent reversals of one transaction, from any process, are
    /// decided one after the other against the totals the row holds. The reversal's
    /// referenceNumber is looked up after the lock (a concurrent identical request that
    /// committed first is then a replay), and its UNIQUE constraint settles any race left.
    async fn reverse(&self, r: &Reverse) -> Result<Reversed, Fail> {
        let b = r.business.as_str();
        let request = &r.request;
        let reference = request.reference_number.as_str();
        let tx_seq = big(r.transaction_seq)?;
        let locked = self
            .t
            .query_opt(
                &self
                    .prepared(
                        "SELECT business, value, total_points, reversed_value, reversals \
                 FROM transactions WHERE seq = $1 FOR UPDATE",
                    )
                    .await?,
                &[&tx_seq],
            )
            .await?;
        let replay = |found: Reversal| match found.differing_field(r.transaction_seq, request) {
            None => Reversed::Replayed(found),
            Some(field) => Reversed::Conflict(field),
        };
        if let Some(found) = self.reversal_by_reference(b, reference).await? {
            return Ok(replay(found));
        }
        let Some(row) = locked else {
            tracing::error!(
                seq = r.transaction_seq,
                "a reversal names a missing transaction"
            );
            return Err(Fail::Store(StoreError::Corrupt));
        };
        let business: String = row.try_get(0).map_err(|e| {
            tracing::error!(error = %e, "a transaction row does not read");
            StoreError::Corrupt
        })?;
        if business != b {
            tracing::error!(
                seq = r.transaction_seq,
                "a reversal names another business's transaction"
            );
            return Err(Fail::Store(StoreError::Corrupt));
        }
        let (value, total_points, reversed_value) =
            (get_u64(&row, 1)?, get_u64(&row, 2)?, get_u64(&row, 3)?);
        let count: i32 = row.try_get(4).map_err(|e| {
            tracing::error!(error = %e, "a transaction row does not read");
            StoreError::Corrupt
        })?;
        // The rest can always be reversed: that one is the last.
        if u32::try_from(count).unwrap_or(u32::MAX) >= MAX_REVERSALS && request.value.is_some() {
            return Ok(Reversed::Rejected(Rejection::TooManyReversals {
                max: MAX_REVERSALS,
            }));
        }
        let (value, points) =
            match plan_reversal(value, total_points, reversed_value, request.value) {
                Ok(plan) => plan,
                Err(rejection) => return Ok(Reversed::Rejected(rejection)),
            };
        // Locked after the transaction's row, as the credit's own moves lock it: a change
        // of the credit is either before this (and seen) or after (and re-times the debit).
        let credit = self.lock_delivery(JOB_CREDIT, r.transaction_seq).await?;
        let reason = request.reason.as_ref().map(|d| d.as_str());
        let inserted = self
            .t
            .query_opt(
                &self.prepared("INSERT INTO reversals (seq, business, reference_number, tx_seq, value, points, \
                 is_full, reason, created_at) \
                 VALUES (nextval('reversals_seq'), $1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (business, reference_number) DO NOTHING RETURNING seq").await?,
                &[
                    &b,
                    &reference,
                    &tx_seq,
                    &big(value)?,
                    &big(points)?,
                    &request.value.is_none(),
                    &reason,
                    &big(self.now)?,
                ],
            )
            .await?;
        let Some(row) = inserted else {
            // Another process's reversal of another transaction took the reference.
            return match self.reversal_by_reference(b, reference).await? {
                Some(found) => Ok(replay(found)),
                None => Err(Fail::Retry),
            };
        };
        let seq = get_u64(&row, 0)?;
        self.t
            .execute(
                &self
                    .prepared(
                        "UPDATE transactions SET reversed_value = reversed_value + $2, \
                 reversed_points = reversed_points + $3, reversals = reversals + 1 \
                 WHERE seq = $1",
                    )
                    .await?,
                &[&tx_seq, &big(value)?, &big(points)?],
            )
            .await?;
        let now = self.now;
        let debit = match credit {
            Some(credit) if points > 0 && credit.status != DeliveryStatus::Failed => {
                let due = credit.next_attempt_at.unwrap_or(now).max(now);
                Some(Delivery {
                    next_attempt_at: Some(due),
                    ..Delivery::new(now)
                })
            }
            // No partner, nothing to take back there, or a credit that never arrived.
            _ => None,
        };
        if let Some(d) = &debit {
            self.insert_delivery(JOB_DEBIT, seq, d).await?;
        }
        Ok(Reversed::Created(Reversal {
            id: crate::ledger::ReversalId(self.c.reversal_ids.encipher(seq)),
            seq,
            business: r.business.clone(),
            transaction_id: self.c.ids.encode(r.transaction_seq),
            transaction_seq: r.transaction_seq,
            reference_number: request.reference_number.clone(),
            value,
            points,
            full: request.value.is_none(),
            reason: request.reason.clone(),
            created_at: now,
            delivery: debit,
        }))
    }

    /// As the redb writer's `update_debit`.
    async fn update_debit(
        &self,
        seq: u64,
        step: Step<'_>,
        events: RevEvents<'_>,
    ) -> Result<Option<(Reversal, bool)>, Fail> {
        let Some((before, next)) = self.step_delivery(JOB_DEBIT, seq, step).await? else {
            return Ok(None);
        };
        let found = self.reversal_of(seq).await?;
        if next.is_some() {
            for event in events(&found, before) {
                self.record_event(found.business.as_str(), event).await?;
            }
        }
        Ok(Some((found, next.is_some())))
    }

    /// As the redb writer's `hold_debit`.
    async fn hold_debit(
        &self,
        seq: u64,
        patience: u64,
        events: RevEvents<'_>,
    ) -> Result<bool, Fail> {
        let Some(debit) = self.lock_delivery(JOB_DEBIT, seq).await? else {
            return Ok(false);
        };
        if debit.status != DeliveryStatus::Pending {
            return Ok(false);
        }
        let tx_seq = self.reversal_of(seq).await?.transaction_seq;
        let credit = self
            .t
            .query_opt(
                &self
                    .prepared(&format!(
                        "SELECT {} FROM deliveries d WHERE d.kind = 0 AND d.id = $1",
                        delivery_columns()
                    ))
                    .await?,
                &[&big(tx_seq)?],
            )
            .await?;
        let credit = match credit {
            Some(row) => delivery_at(&row, 0)?,
            None => None,
        };
        let Some(next) = debit.held_behind(credit.as_ref(), self.now, patience) else {
            return Ok(false);
        };
        let step = move |_: &Delivery, _: u64| Some(next.clone());
        Ok(self
            .update_debit(seq, &step, events)
            .await?
            .is_some_and(|(_, moved)| moved))
    }

    /// A merchant webhook event and its delivery, due at once.
    async fn record_event(&self, business: &str, event: NewEvent) -> Result<(), Fail> {
        let row = self
            .t
            .query_one(
                &self
                    .prepared(
                        "INSERT INTO events (seq, business, target, kind, created_at, payload) \
                 VALUES (nextval('events_seq'), $1, $2, $3, $4, $5) RETURNING seq",
                    )
                    .await?,
                &[
                    &business,
                    &event.target,
                    &event.kind,
                    &big(self.now)?,
                    &event.payload,
                ],
            )
            .await?;
        let seq = get_u64(&row, 0)?;
        self.insert_delivery(JOB_EVENT, seq, &Delivery::new(self.now))
            .await
    }
}

/// A delivery's row as parameters: `$1`…`$11` of [`Batch::insert_delivery`] and
/// [`Batch::put_delivery`] (kind, id, then the state's columns in table order).
pub(super) struct DeliveryParams {
    pub kind: i16,
    pub id: i64,
    pub status: i16,
    pub attempts: i64,
    pub step: i64,
    pub last_attempt_at: Option<i64>,
    pub next_attempt_at: Option<i64>,
    pub partner_transaction_id: Option<String>,
    pub error_kind: Option<i16>,
    pub error_http_status: Option<i32>,
    pub error_detail: Option<String>,
}

impl DeliveryParams {
    pub fn of(kind: i16, id: u64, d: &Delivery) -> Result<DeliveryParams, StoreError> {
        Ok(DeliveryParams {
            kind,
            id: big(id)?,
            status: status_code(d.status),
            attempts: i64::from(d.attempts),
            step: i64::from(d.step),
            last_attempt_at: big_opt(d.last_attempt_at)?,
            next_attempt_at: big_opt(d.next_attempt_at)?,
            partner_transaction_id: d.partner_transaction_id.clone(),
            error_kind: d.error.as_ref().map(|e| i16::from(e.kind.code())),
            error_http_status: d.error.as_ref().and_then(|e| e.http_status).map(i32::from),
            error_detail: d.error.as_ref().map(|e| e.detail.clone()),
        })
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 11] {
        [
            &self.kind,
            &self.id,
            &self.status,
            &self.attempts,
            &self.step,
            &self.last_attempt_at,
            &self.next_attempt_at,
            &self.partner_transaction_id,
            &self.error_kind,
            &self.error_http_status,
            &self.error_detail,
        ]
    }
}
