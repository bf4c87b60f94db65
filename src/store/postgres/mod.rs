//! The PostgreSQL backend: several `cosmopoints serve` processes on one database are one
//! service (see docs/API.md, "PostgreSQL backend").
//!
//! - `schema`: the embedded migrations, applied on open under an advisory lock; the
//!   keys every process shares (`meta`).
//! - `rows`: rows ↔ domain values, checked `u64` ↔ `bigint`.
//! - `write`: this process's group-commit writer (one transaction per batch of writes,
//!   re-run after a deadlock or a serialization failure).
//! - `import`: `cosmopoints migrate`, a redb file copied into an empty database.
//! - here: opening, reads (from a connection pool), listings (one snapshot, a server-side
//!   portal), the shared outbox's claims, and the consistency check.
//!
//! Blocking entry points (`open`, `signing_key`, `check`) run their database work on a
//! short-lived thread with a runtime of its own, so that they work inside or outside a
//! tokio runtime. The pool's connections belong to the runtime that uses them (the
//! server's); the writer has its own thread, runtime and connection.

mod import;
mod rows;
mod schema;
mod write;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, NoTls};

pub use import::{migrate_file, MigrateError};
pub use schema::PG_SCHEMA_VERSION;

use rows::{
    big, event_columns, get_u64, reversal_columns, tx_columns, Ciphers, EVENT_FROM, JOB_CREDIT,
    JOB_DEBIT, JOB_EVENT, PENDING, REVERSAL_FROM, TX_FROM,
};
use write::{Done, Job, Op, Stats, Writer};

use super::{
    CheckReport, Connect, Connected, Due, Issue, Issued, JobOutcome, Limits, Listing, OpenError,
    Redelivery, Reverse, Reversed, StoreError, TxQuery, MAX_LISTINGS,
};
use crate::clock::Clock;
use crate::config::PostgresConfig;
use crate::delivery::{Delivery, DeliveryStatus, NewEvent};
use crate::domain::{BusinessId, EndUserId, ProgramId, ReferenceNumber};
use crate::ledger::{Connection, Reversal, ReversalId, Transaction, TransactionId};

/// How long a job that [`Postgres::due`] handed to this process is not handed to another:
/// longer than any attempt can take (a partner's `timeout_seconds` is at most 300, and an
/// attempt's outcome is written back right after it), so that no two processes send one
/// job at once. Recording the outcome ends the claim; a process that dies mid-attempt
/// leaves its jobs to the others once the lease runs out.
pub const LEASE_SECONDS: u64 = 600;

/// How long a request waits for a pooled connection, and for a new connection to open.
const POOL_WAIT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Rows per batch a listing hands to its consumer (as the redb listing).
const LISTING_BATCH: i32 = 64;

/// The PostgreSQL store of this process.
pub struct Postgres {
    pool: Pool,
    config: tokio_postgres::Config,
    ciphers: Arc<Ciphers>,
    jobs: mpsc::Sender<Job>,
    writer: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Stats>,
    listings: Arc<Semaphore>,
    /// How many listings may run at once (see [`listing_slots`]).
    listing_slots: usize,
    migrated_from: Option<u64>,
    outbox_changed: Arc<tokio::sync::Notify>,
    /// This process's claims in `deliveries.claimed_by`: random, made at open.
    claimant: i64,
}

/// The SQLSTATEs after which a transaction may simply be run again.
pub(crate) fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// An error for the log: the server's message and SQLSTATE, or what failed on the way.
/// Never the connection URL (tokio-postgres does not put it in its errors).
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

fn unavailable(e: &tokio_postgres::Error) -> StoreError {
    tracing::error!(error = %describe(e), "PostgreSQL failure");
    StoreError::Unavailable
}

fn pool_unavailable(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => unavailable(&e),
        other => {
            tracing::error!(error = %other, "no PostgreSQL connection");
            StoreError::Unavailable
        }
    }
}

/// Runs `work` to completion on a thread of its own with a runtime of its own: for the
/// blocking entry points, callable inside or outside a runtime.
fn blocking<T: Send>(work: impl std::future::Future<Output = T> + Send) -> Result<T, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|runtime| runtime.block_on(work))
                    .map_err(|e| format!("cannot start a runtime: {e}"))
            })
            .join()
            .unwrap_or_else(|_| Err("the database thread panicked".into()))
    })
}

/// How many listings may stream at once: each holds a pooled connection for its whole
/// life, so they get slots of their own beside `pool_size` (half as many, at least one,
/// at most [`MAX_LISTINGS`]), and slow listings never take the connections that lookups,
/// the delivery worker and `/readyz` need. One more is 503 with Retry-After, as on redb
/// past `MAX_LISTINGS`.
fn listing_slots(pool_size: usize) -> usize {
    (pool_size / 2).clamp(1, MAX_LISTINGS)
}

/// The connection settings of `config.url`; an error names the key, never the value.
fn connection_config(config: &PostgresConfig) -> Result<tokio_postgres::Config, OpenError> {
    let mut pg: tokio_postgres::Config = config.url.parse().map_err(|e| {
        OpenError::Unusable(format!(
            "storage.url is not a usable PostgreSQL url: {}",
            describe(&e)
        ))
    })?;
    pg.connect_timeout(CONNECT_TIMEOUT);
    // A connection whose server went away without a word (a failed host, a dropped
    // route) is found out by TCP keepalives, and its requests fail instead of hanging.
    // Idle: probed after 30 s, every 10 s, given up after 3 unanswered probes; busy:
    // data unacknowledged for 30 s ends the connection (instead of Linux's ~15 minutes).
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    pg.keepalives_interval(Duration::from_secs(10));
    pg.keepalives_retries(3);
    pg.tcp_user_timeout(Duration::from_secs(30));
    pg.application_name("cosmopoints");
    Ok(pg)
}

/// Connects one client whose connection runs on the current runtime.
async fn connect(
    pg: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl Postgres {
    /// Connects, migrates (see `schema`), and starts the writer thread.
    pub fn open(
        config: &PostgresConfig,
        clock: Clock,
        limits: Limits,
    ) -> Result<Postgres, OpenError> {
        let pg = connection_config(config)?;
        let candidate = crate::auth::random_secret();
        let prepared = blocking(async {
            let mut client = connect(&pg).await.map_err(|e| {
                OpenError::Unusable(format!("cannot connect to PostgreSQL: {}", describe(&e)))
            })?;
            schema::prepare(&mut client, &candidate).await
        })
        .map_err(OpenError::Unusable)??;
        let ciphers = Arc::new(Ciphers::new(&prepared.id_key));
        let manager = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1) + listing_slots(config.pool_size))
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| OpenError::Unusable(format!("cannot make the connection pool: {e}")))?;
        let claimant = crate::auth::random_secret()
            .iter()
            .take(8)
            .fold(0i64, |acc, b| (acc << 8) | i64::from(*b));
        let stats = Arc::new(Stats::default());
        let (jobs, rx) = mpsc::channel(limits.queue.max(1));
        let writer = Writer {
            config: pg.clone(),
            ciphers: ciphers.clone(),
            clock,
            max_batch: limits.max_batch.max(1),
            stats: stats.clone(),
            claimant,
        };
        let thread = std::thread::Builder::new()
            .name("cosmopoints-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| OpenError::Unusable(format!("cannot start the writer thread: {e}")))?;
        Ok(Postgres {
            pool,
            config: pg,
            ciphers,
            jobs,
            writer: Mutex::new(Some(thread)),
            stats,
            listings: Arc::new(Semaphore::new(listing_slots(config.pool_size))),
            listing_slots: listing_slots(config.pool_size),
            migrated_from: prepared.migrated_from,
            outbox_changed: Arc::new(tokio::sync::Notify::new()),
            claimant,
        })
    }

    pub fn migrated_from(&self) -> Option<u64> {
        self.migrated_from
    }

    /// PostgreSQL keeps its own buffers: no page cache of ours.
    pub fn page_cache_bytes(&self) -> Option<usize> {
        None
    }

    /// The token signing key in `meta`: `generate`'s if none is stored yet, else the
    /// stored one (the first process's), so that every process accepts every token.
    pub fn signing_key(&self, generate: impl FnOnce() -> Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let candidate = generate();
        let pg = self.config.clone();
        blocking(async move {
            let client = connect(&pg).await.map_err(|e| unavailable(&e))?;
            schema::shared_key(&client, "signing_key", &candidate)
                .await
                .map_err(|e| unavailable(&e))
        })
        .map_err(|e| {
            tracing::error!(error = %e, "cannot read the signing key");
            StoreError::Unavailable
        })?
    }

    /// Queues `op` for the writer and waits until the batch holding it is durable.
    async fn write(&self, op: Op) -> Result<Done, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job::Write(op, reply))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::Busy,
                mpsc::error::TrySendError::Closed(_) => StoreError::Unavailable,
            })?;
        answer.await.map_err(|_| StoreError::Unavailable)?
    }

    pub async fn issue(&self, issue: Issue) -> Result<Issued, StoreError> {
        let deliver = issue.deliver;
        match self.write(Op::Issue(Box::new(issue))).await? {
            Done::Issued(issued) => {
                if deliver && matches!(issued, Issued::Created(_)) {
                    self.outbox_changed.notify_one();
                }
                Ok(issued)
            }
            _ => Err(mismatch()),
        }
    }

    pub async fn issue_many(&self, issues: Vec<Issue>) -> Result<Vec<Issued>, StoreError> {
        match self.write(Op::IssueMany(issues)).await? {
            Done::IssuedMany(issued) => {
                if issued
                    .iter()
                    .any(|i| matches!(i, Issued::Created(tx) if tx.delivery.is_some()))
                {
                    self.outbox_changed.notify_one();
                }
                Ok(issued)
            }
            _ => Err(mismatch()),
        }
    }

    pub async fn update_delivery(
        &self,
        seq: u64,
        step: impl Fn(&Delivery, u64) -> Option<Delivery> + Send + Sync + 'static,
        events: impl Fn(&Transaction, DeliveryStatus) -> Vec<NewEvent> + Send + Sync + 'static,
    ) -> Result<Option<(Transaction, bool)>, StoreError> {
        let op = Op::UpdateDelivery {
            seq,
            step: Box::new(step),
            events: Box::new(events),
        };
        match self.write(op).await? {
            Done::Delivery(updated) => {
                if let Some((_, true)) = &updated {
                    self.outbox_changed.notify_one();
                }
                Ok(updated)
            }
            _ => Err(mismatch()),
        }
    }

    pub async fn update_event(
        &self,
        seq: u64,
        step: impl Fn(&Delivery, u64) -> Option<Delivery> + Send + Sync + 'static,
    ) -> Result<Option<bool>, StoreError> {
        let op = Op::UpdateEvent {
            seq,
            step: Box::new(step),
        };
        match self.write(op).await? {
            Done::Event(changed) => Ok(changed),
            _ => Err(mismatch()),
        }
    }

    pub async fn redeliver_credit(&self, seq: u64) -> Result<Redelivery, StoreError> {
        match self.write(Op::Redeliver(seq)).await? {
            Done::Redelivery(redelivery) => {
                if matches!(redelivery, Redelivery::Redelivered(_)) {
                    self.outbox_changed.notify_one();
                }
                Ok(redelivery)
            }
            _ => Err(mismatch()),
        }
    }

    pub async fn reverse(&self, reverse: Reverse) -> Result<Reversed, StoreError> {
        match self.write(Op::Reverse(reverse)).await? {
            Done::Reversed(reversed) => {
                if let Reversed::Created(r) = &reversed {
                    if r.delivery.is_some() {
                        self.outbox_changed.notify_one();
                    }
                }
                Ok(reversed)
            }
            _ => Err(mismatch()),
        }
    }

    pub async fn update_debit(
        &self,
        seq: u64,
        step: impl Fn(&Delivery, u64) -> Option<Delivery> + Send + Sync + 'static,
        events: impl Fn(&Reversal, DeliveryStatus) -> Vec<NewEvent> + Send + Sync + 'static,
    ) -> Result<Option<(Reversal, bool)>, StoreError> {
        let op = Op::UpdateDebit {
            seq,
            step: Box::new(step),
            events: Box::new(events),
        };
        match self.write(op).await? {
            Done::Debit(updated) => {
                if let Some((_, true)) = &updated {
                    self.outbox_changed.notify_one();
                }
                Ok(updated)
            }
            _ => Err(mismatch()),
        }
    }

    pub async fn hold_debit(
        &self,
        seq: u64,
        patience: u64,
        events: impl Fn(&Reversal, DeliveryStatus) -> Vec<NewEvent> + Send + Sync + 'static,
    ) -> Result<bool, StoreError> {
        let op = Op::HoldDebit {
            seq,
            patience,
            events: Box::new(events),
        };
        match self.write(op).await? {
            Done::Held(moved) => {
                if moved {
                    self.outbox_changed.notify_one();
                }
                Ok(moved)
            }
            _ => Err(mismatch()),
        }
    }

    pub async fn record_outcomes(&self, outcomes: Vec<JobOutcome>) -> Result<(), StoreError> {
        match self.write(Op::Outcomes(outcomes)).await? {
            Done::Outcomes(look) => {
                if look {
                    self.outbox_changed.notify_one();
                }
                Ok(())
            }
            _ => Err(mismatch()),
        }
    }

    pub async fn connect(&self, connect: Connect) -> Result<Connected, StoreError> {
        match self.write(Op::Connect(connect)).await? {
            Done::Connected(connected) => Ok(connected),
            _ => Err(mismatch()),
        }
    }

    pub async fn outbox_changed(&self) {
        self.outbox_changed.notified().await
    }

    /// Claims up to `limit` due jobs for this process (see [`LEASE_SECONDS`]) and reads
    /// them, in one transaction: `FOR UPDATE SKIP LOCKED` passes over the rows another
    /// process is claiming at this moment, and `claimed_until` over those it claimed
    /// earlier. This process's own claims do not hide a job from it (a job it read but
    /// had no free slot for is read again); `skip` (its jobs in flight) does.
    pub async fn due(
        &self,
        now: u64,
        limit: usize,
        skip: &HashSet<(u8, u64)>,
    ) -> Result<Vec<Due>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut client = self.pool.get().await.map_err(pool_unavailable)?;
        let (kinds, ids): (Vec<i16>, Vec<i64>) = skip
            .iter()
            .filter_map(|&(k, id)| Some((i16::from(k), i64::try_from(id).ok()?)))
            .unzip();
        let now_big = big(now)?;
        let until = big(now.saturating_add(LEASE_SECONDS))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        for attempt in 1.. {
            let t = client
                .build_transaction()
                .isolation_level(IsolationLevel::ReadCommitted)
                .start()
                .await
                .map_err(|e| unavailable(&e))?;
            match self.claim(&t, now_big, until, limit, &kinds, &ids).await {
                Ok(due) => {
                    t.commit().await.map_err(|e| unavailable(&e))?;
                    return Ok(due);
                }
                Err(Err(e)) if retryable(&e) && attempt < 5 => continue,
                Err(Err(e)) => return Err(unavailable(&e)),
                Err(Ok(e)) => return Err(e),
            }
        }
        Err(StoreError::Unavailable)
    }

    /// The claim and the reads of [`Postgres::due`]; `Err(Err(_))` is a database error
    /// (perhaps retryable), `Err(Ok(_))` a store error.
    async fn claim(
        &self,
        t: &deadpool_postgres::Transaction<'_>,
        now: i64,
        until: i64,
        limit: i64,
        kinds: &[i16],
        ids: &[i64],
    ) -> Result<Vec<Due>, Result<StoreError, tokio_postgres::Error>> {
        let claimed = t
            .query(
                "WITH due AS ( \
                   SELECT kind, id FROM deliveries \
                   WHERE status = 0 AND next_attempt_at <= $1 \
                     AND (claimed_until IS NULL OR claimed_until <= $1 OR claimed_by = $3) \
                     AND NOT EXISTS (SELECT 1 FROM unnest($5::smallint[], $6::bigint[]) \
                                     AS s(kind, id) \
                                     WHERE s.kind = deliveries.kind AND s.id = deliveries.id) \
                   ORDER BY next_attempt_at, kind, id LIMIT $4 \
                   FOR UPDATE SKIP LOCKED) \
                 UPDATE deliveries d SET claimed_until = $2, claimed_by = $3 \
                 FROM due WHERE d.kind = due.kind AND d.id = due.id \
                 RETURNING d.kind, d.id, d.next_attempt_at",
                &[&now, &until, &self.claimant, &limit, &kinds, &ids],
            )
            .await
            .map_err(Err)?;
        let mut jobs = Vec::with_capacity(claimed.len());
        for row in &claimed {
            let kind: i16 = row.try_get(0).map_err(Err)?;
            let id = get_u64(row, 1).map_err(Ok)?;
            let at: i64 = row.try_get(2).map_err(Err)?;
            jobs.push((at, kind, id));
        }
        // The longest due first, as the redb outbox's order.
        jobs.sort_unstable();
        let mut due = Vec::with_capacity(jobs.len());
        for (_, kind, id) in jobs {
            let job = match kind {
                JOB_CREDIT => read_tx(t, &self.ciphers, id)
                    .await
                    .map_err(Err)?
                    .transpose()
                    .map_err(Ok)?
                    .map(Due::Credit),
                JOB_DEBIT => match read_reversal(t, &self.ciphers, id)
                    .await
                    .map_err(Err)?
                    .transpose()
                    .map_err(Ok)?
                {
                    Some(reversal) => read_tx(t, &self.ciphers, reversal.transaction_seq)
                        .await
                        .map_err(Err)?
                        .transpose()
                        .map_err(Ok)?
                        .map(|tx| Due::Debit {
                            reversal,
                            transaction: Box::new(tx),
                        }),
                    None => None,
                },
                JOB_EVENT => {
                    let row = t
                        .query_opt(
                            &format!(
                                "SELECT {} FROM {EVENT_FROM} WHERE e.seq = $1",
                                event_columns()
                            ),
                            &[&big(id).map_err(Ok)?],
                        )
                        .await
                        .map_err(Err)?;
                    match row {
                        Some(row) => Some(Due::Event(
                            rows::event(&self.ciphers.event_ids, &row).map_err(Ok)?,
                        )),
                        None => None,
                    }
                }
                _ => None,
            };
            match job {
                Some(job) => due.push(job),
                None => {
                    tracing::error!(kind, id, "a delivery names a missing job");
                    return Err(Ok(StoreError::Corrupt));
                }
            }
        }
        Ok(due)
    }

    pub async fn outbox_depth(&self) -> Result<(u64, Option<u64>), StoreError> {
        let client = self.pool.get().await.map_err(pool_unavailable)?;
        let row = client
            .query_one(
                "SELECT count(*), min(next_attempt_at) FROM deliveries \
                 WHERE status = 0 AND next_attempt_at IS NOT NULL",
                &[],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let depth = get_u64(&row, 0)?;
        let oldest: Option<i64> = row.try_get(1).map_err(|e| unavailable(&e))?;
        Ok((depth, oldest.and_then(|v| u64::try_from(v).ok())))
    }

    pub async fn shutdown(&self) {
        let _ = self.jobs.send(Job::Stop).await;
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        // The delivery worker has stopped (it stops before the store): the jobs this
        // process claimed and did not finish go back to the others now rather than when
        // their lease ends.
        if let Ok(client) = self.pool.get().await {
            if let Err(e) = client
                .execute(
                    "UPDATE deliveries SET claimed_until = NULL, claimed_by = NULL \
                     WHERE claimed_by = $1",
                    &[&self.claimant],
                )
                .await
            {
                tracing::warn!(error = %describe(&e), "the outbox claims were not released; they lapse with their lease");
            }
        }
    }

    pub async fn close(&self) {
        self.pool.close();
    }

    pub fn commit_stats(&self) -> (u64, u64) {
        (
            self.stats.commits.load(Ordering::Relaxed),
            self.stats.writes.load(Ordering::Relaxed),
        )
    }

    pub fn write_queue_depth(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    pub fn on_commit(&self, hook: impl Fn(usize, Duration) + Send + Sync + 'static) {
        let _ = self.stats.on_commit.set(Box::new(hook));
    }

    pub fn running_listings(&self) -> usize {
        self.listing_slots - self.listings.available_permits()
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(pool_unavailable)?;
        client
            .simple_query("SELECT 1")
            .await
            .map(drop)
            .map_err(|e| unavailable(&e))
    }

    /// The business's transaction whose id, else whose referenceNumber, is `key`, with its
    /// reversals: one statement when it has none (most), else read again with them in one
    /// snapshot.
    pub async fn transaction(
        &self,
        business: &BusinessId,
        key: &str,
    ) -> Result<Option<Transaction>, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_unavailable)?;
        match find_tx(&client, &self.ciphers, business, key).await? {
            Some(tx) if tx.reversed_value == 0 => return Ok(Some(tx)),
            None => return Ok(None),
            Some(_) => {}
        }
        let t = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| unavailable(&e))?;
        let Some(mut tx) = find_tx(&t, &self.ciphers, business, key).await? else {
            return Ok(None);
        };
        if tx.reversed_value > 0 {
            tx.reversals = reversals_of(&t, &self.ciphers, &[tx.seq])
                .await?
                .into_iter()
                .map(|(_, r)| r)
                .collect();
        }
        t.commit().await.map_err(|e| unavailable(&e))?;
        Ok(Some(tx))
    }

    pub async fn transaction_head(
        &self,
        business: &BusinessId,
        key: &str,
    ) -> Result<Option<Transaction>, StoreError> {
        let client = self.pool.get().await.map_err(pool_unavailable)?;
        find_tx(&client, &self.ciphers, business, key).await
    }

    pub async fn by_reference(
        &self,
        business: &BusinessId,
        reference: &ReferenceNumber,
    ) -> Result<Option<Transaction>, StoreError> {
        Ok(self
            .by_references(business, &[reference])
            .await?
            .pop()
            .flatten())
    }

    /// [`Postgres::by_reference`] for each of `references`, in their order, in one query.
    pub async fn by_references(
        &self,
        business: &BusinessId,
        references: &[&ReferenceNumber],
    ) -> Result<Vec<Option<Transaction>>, StoreError> {
        if references.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.pool.get().await.map_err(pool_unavailable)?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {} FROM {TX_FROM} WHERE t.business = $1 AND t.reference_number = ANY($2)",
                tx_columns()
            ))
            .await
            .map_err(|e| unavailable(&e))?;
        let wanted: Vec<&str> = references.iter().map(|r| r.as_str()).collect();
        let rows = client
            .query(&statement, &[&business.as_str(), &wanted])
            .await
            .map_err(|e| unavailable(&e))?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let tx = rows::transaction(&self.ciphers.ids, row)?;
            found.insert(tx.reference_number.as_str().to_owned(), tx);
        }
        Ok(references
            .iter()
            .map(|r| found.get(r.as_str()).cloned())
            .collect())
    }

    /// The business's reversal whose id, else whose referenceNumber, is `key`.
    pub async fn reversal(
        &self,
        business: &BusinessId,
        key: &str,
    ) -> Result<Option<Reversal>, StoreError> {
        if key.contains('\0') {
            return Ok(None);
        }
        let client = self.pool.get().await.map_err(pool_unavailable)?;
        let seq = ReversalId::parse(key).and_then(|id| self.ciphers.reversal_ids.decipher(id.0));
        if let Some(seq) = seq {
            if let Some(found) = read_reversal(&client, &self.ciphers, seq)
                .await
                .map_err(|e| unavailable(&e))?
                .transpose()?
            {
                if found.business == *business {
                    return Ok(Some(found));
                }
            }
        }
        let row = client
            .query_opt(
                &format!(
                    "SELECT {} FROM {REVERSAL_FROM} WHERE r.business = $1 AND r.reference_number = $2",
                    reversal_columns()
                ),
                &[&business.as_str(), &key],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        row.map(|row| rows::reversal(&self.ciphers, &row))
            .transpose()
    }

    /// The end user's connections, optionally in one program, ordered by program id.
    pub async fn connections(
        &self,
        business: &BusinessId,
        end_user_id: &EndUserId,
        program: Option<&ProgramId>,
    ) -> Result<Vec<Connection>, StoreError> {
        let client = self.pool.get().await.map_err(pool_unavailable)?;
        let found = client
            .query(
                "SELECT end_user_id, program_id, destination_user_id, created_at, updated_at \
                 FROM connections WHERE business = $1 AND end_user_id = $2 \
                 AND ($3::text IS NULL OR program_id = $3) ORDER BY program_id COLLATE \"C\"",
                &[
                    &business.as_str(),
                    &end_user_id.as_str(),
                    &program.map(|p| p.as_str()),
                ],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        found
            .iter()
            .map(|row| {
                let text = |i: usize| -> Result<String, StoreError> {
                    row.try_get::<_, String>(i).map_err(|e| unavailable(&e))
                };
                Ok(Connection {
                    end_user_id: EndUserId::trusted(text(0)?),
                    program_id: ProgramId::trusted(text(1)?),
                    destination_user_id: crate::domain::DestinationUserId::trusted(text(2)?),
                    created_at: get_u64(row, 3)?,
                    updated_at: get_u64(row, 4)?,
                })
            })
            .collect()
    }

    /// Starts the listing: a task that reads it in ONE snapshot (a `REPEATABLE READ READ
    /// ONLY` transaction) through a server-side portal, [`LISTING_BATCH`] rows at a time,
    /// each batch with its reversals, mapped and sent as it comes.
    pub fn list<T: Send + 'static>(
        &self,
        query: TxQuery,
        map: impl FnMut(&[Transaction]) -> T + Send + 'static,
    ) -> Result<Listing<T>, StoreError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            tracing::error!("a listing was started outside a runtime");
            StoreError::Unavailable
        })?;
        let permit = self
            .listings
            .clone()
            .try_acquire_owned()
            .map_err(|_| StoreError::Busy)?;
        let (tx, rx) = mpsc::channel(2);
        let (pool, ciphers) = (self.pool.clone(), self.ciphers.clone());
        runtime.spawn(async move {
            let _permit = permit;
            if let Err(e) = scan(&pool, &ciphers, &query, map, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Listing { rx })
    }

    /// Verifies the live database (see [`check_postgres`]).
    pub fn check(&self) -> Result<CheckReport, StoreError> {
        let pg = self.config.clone();
        blocking(async move { verify(&pg).await })
            .map_err(|e| {
                tracing::error!(error = %e, "the check could not run");
                StoreError::Unavailable
            })?
            .map_err(|e| {
                tracing::error!(error = %e, "the check could not run");
                StoreError::Unavailable
            })
    }
}

fn mismatch() -> StoreError {
    tracing::error!("the writer answered a write with another kind of outcome");
    StoreError::Corrupt
}

/// The transaction `seq` with its delivery, read with `c`. The outer `Result` is the
/// database's, the inner one the row's.
async fn read_tx<C: deadpool_postgres::GenericClient>(
    c: &C,
    ciphers: &Ciphers,
    seq: u64,
) -> Result<Option<Result<Transaction, StoreError>>, tokio_postgres::Error> {
    let Ok(seq) = i64::try_from(seq) else {
        return Ok(None);
    };
    let row = c
        .query_opt(
            &c.prepare_cached(&format!(
                "SELECT {} FROM {TX_FROM} WHERE t.seq = $1",
                tx_columns()
            ))
            .await?,
            &[&seq],
        )
        .await?;
    Ok(row.map(|row| rows::transaction(&ciphers.ids, &row)))
}

async fn read_reversal<C: deadpool_postgres::GenericClient>(
    c: &C,
    ciphers: &Ciphers,
    seq: u64,
) -> Result<Option<Result<Reversal, StoreError>>, tokio_postgres::Error> {
    let Ok(seq) = i64::try_from(seq) else {
        return Ok(None);
    };
    let row = c
        .query_opt(
            &c.prepare_cached(&format!(
                "SELECT {} FROM {REVERSAL_FROM} WHERE r.seq = $1",
                reversal_columns()
            ))
            .await?,
            &[&seq],
        )
        .await?;
    Ok(row.map(|row| rows::reversal(ciphers, &row)))
}

/// The business's transaction whose id, else whose referenceNumber, is `key` (reversals
/// not read in).
async fn find_tx<C: deadpool_postgres::GenericClient>(
    c: &C,
    ciphers: &Ciphers,
    business: &BusinessId,
    key: &str,
) -> Result<Option<Transaction>, StoreError> {
    // No stored reference holds NUL (and PostgreSQL text cannot): nothing is found.
    if key.contains('\0') {
        return Ok(None);
    }
    if let Some(seq) = TransactionId::parse(key).and_then(|id| ciphers.ids.decode(id)) {
        let found = read_tx(c, ciphers, seq)
            .await
            .map_err(|e| unavailable(&e))?
            .transpose()?;
        if let Some(tx) = found.filter(|tx| tx.business == *business) {
            return Ok(Some(tx));
        }
    }
    let row = c
        .query_opt(
            &c.prepare_cached(&format!(
                "SELECT {} FROM {TX_FROM} WHERE t.business = $1 AND t.reference_number = $2",
                tx_columns()
            ))
            .await
            .map_err(|e| unavailable(&e))?,
            &[&business.as_str(), &key],
        )
        .await
        .map_err(|e| unavailable(&e))?;
    row.map(|row| rows::transaction(&ciphers.ids, &row))
        .transpose()
}

/// The reversals of the transactions `seqs`, each with its transaction's seq, in order
/// of (transaction, reversal).
async fn reversals_of<C: deadpool_postgres::GenericClient>(
    c: &C,
    ciphers: &Ciphers,
    seqs: &[u64],
) -> Result<Vec<(u64, Reversal)>, StoreError> {
    let seqs: Vec<i64> = seqs.iter().map(|&s| big(s)).collect::<Result<_, _>>()?;
    let found = c
        .query(
            &c.prepare_cached(&format!(
                "SELECT {} FROM {REVERSAL_FROM} WHERE r.tx_seq = ANY($1) ORDER BY r.tx_seq, r.seq",
                reversal_columns()
            ))
            .await
            .map_err(|e| unavailable(&e))?,
            &[&seqs],
        )
        .await
        .map_err(|e| unavailable(&e))?;
    found
        .iter()
        .map(|row| rows::reversal(ciphers, row).map(|r| (r.transaction_seq, r)))
        .collect()
}

/// The listing `q` (see [`Postgres::list`]).
async fn scan<T>(
    pool: &Pool,
    ciphers: &Ciphers,
    q: &TxQuery,
    mut map: impl FnMut(&[Transaction]) -> T,
    out: &mpsc::Sender<Result<T, StoreError>>,
) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(pool_unavailable)?;
    let t = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| unavailable(&e))?;
    let after = q.after.filter(|c| c.created_at >= q.start);
    let (after_at, after_seq) = match after {
        Some(c) => (Some(big(c.created_at)?), Some(big(c.seq)?)),
        None => (None, None),
    };
    let status = q.status.map(rows::status_code);
    let limit = q.limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX));
    let sql = format!(
        "SELECT {} FROM {TX_FROM} \
         WHERE t.business = $1 AND t.created_at >= $2 AND t.created_at <= $3 \
         AND ($4::text IS NULL OR t.program_id = $4) \
         AND ($5::bigint IS NULL OR (t.created_at, t.seq) > ($5, $6::bigint)) \
         AND ($7::smallint IS NULL OR COALESCE(d.status, 1::smallint) = $7) \
         ORDER BY t.created_at, t.seq LIMIT $8",
        tx_columns()
    );
    let statement = t.prepare(&sql).await.map_err(|e| unavailable(&e))?;
    let program = q.program.as_ref().map(|p| p.as_str());
    let (start, end) = (big(q.start)?, big(q.end.min(i64::MAX as u64))?);
    let portal = t
        .bind(
            &statement,
            &[
                &q.business.as_str(),
                &start,
                &end,
                &program,
                &after_at,
                &after_seq,
                &status,
                &limit,
            ],
        )
        .await
        .map_err(|e| unavailable(&e))?;
    loop {
        let found = t
            .query_portal(&portal, LISTING_BATCH)
            .await
            .map_err(|e| unavailable(&e))?;
        if found.is_empty() {
            break;
        }
        let mut batch = Vec::with_capacity(found.len());
        for row in &found {
            batch.push(rows::transaction(&ciphers.ids, row)?);
        }
        let reversed: Vec<u64> = batch
            .iter()
            .filter(|tx| tx.reversed_value > 0)
            .map(|tx| tx.seq)
            .collect();
        if !reversed.is_empty() {
            for (tx_seq, reversal) in reversals_of(&t, ciphers, &reversed).await? {
                if let Some(tx) = batch.iter_mut().find(|tx| tx.seq == tx_seq) {
                    tx.reversals.push(reversal);
                }
            }
        }
        let last = found.len() < LISTING_BATCH as usize;
        if out.send(Ok(map(&batch))).await.is_err() || last {
            break;
        }
    }
    // Read only: ending it changes nothing.
    let _ = t.commit().await;
    Ok(())
}

/// `cosmopoints check` on the PostgreSQL database of `config` (read-only: one snapshot).
pub fn check_postgres(config: &PostgresConfig) -> Result<CheckReport, OpenError> {
    let pg = connection_config(config)?;
    blocking(async move { verify(&pg).await }).map_err(OpenError::Unusable)?
}

/// Verifies that the reversal totals on each transaction match its reversals, that every
/// delivery names an existing row, every event has its delivery, a delivery is pending
/// exactly when it has a due time, and every stored code is known.
async fn verify(pg: &tokio_postgres::Config) -> Result<CheckReport, OpenError> {
    let fail =
        |e: tokio_postgres::Error| OpenError::Unusable(format!("PostgreSQL: {}", describe(&e)));
    let mut client = connect(pg).await.map_err(|e| {
        OpenError::Unusable(format!("cannot connect to PostgreSQL: {}", describe(&e)))
    })?;
    let t = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(fail)?;
    let has_meta = t
        .query_one("SELECT to_regclass('meta') IS NOT NULL", &[])
        .await
        .map_err(fail)?
        .try_get::<_, bool>(0)
        .map_err(fail)?;
    if !has_meta {
        return Err(OpenError::Unusable(
            "the PostgreSQL database has no Cosmopoints schema (a server creates it on start)"
                .into(),
        ));
    }
    let schema = schema::version(&t).await?;
    if schema > PG_SCHEMA_VERSION {
        return Err(OpenError::NewerSchema(schema));
    }
    if schema == 0 {
        return Err(OpenError::Unusable(
            "the PostgreSQL database has no Cosmopoints schema (a server creates it on start)"
                .into(),
        ));
    }
    let count = |sql: &'static str| {
        let t = &t;
        async move {
            let row = t.query_one(sql, &[]).await.map_err(fail)?;
            let n: i64 = row.try_get(0).map_err(fail)?;
            Ok::<u64, OpenError>(u64::try_from(n).unwrap_or(0))
        }
    };
    let transactions = count("SELECT count(*) FROM transactions").await?;
    let mut report = CheckReport {
        schema,
        transactions,
        // The UNIQUE constraint and the indexes are PostgreSQL's: one entry per row.
        references: transactions,
        program_date_entries: transactions,
        connections: count("SELECT count(*) FROM connections").await?,
        deliveries: count("SELECT count(*) FROM deliveries").await?,
        events: count("SELECT count(*) FROM events").await?,
        outbox_entries: count(
            "SELECT count(*) FROM deliveries WHERE status = 0 AND next_attempt_at IS NOT NULL",
        )
        .await?,
        reversals: count("SELECT count(*) FROM reversals").await?,
        problems: Vec::new(),
    };
    let problems = &mut report.problems;
    for row in t
        .query(
            "SELECT t.seq, COALESCE(sum(r.value), 0)::bigint, COALESCE(sum(r.points), 0)::bigint, \
             count(r.seq), t.reversed_value, t.reversed_points, t.reversals::bigint \
             FROM transactions t LEFT JOIN reversals r ON r.tx_seq = t.seq \
             GROUP BY t.seq \
             HAVING COALESCE(sum(r.value), 0) <> t.reversed_value \
                 OR COALESCE(sum(r.points), 0) <> t.reversed_points \
                 OR count(r.seq) <> t.reversals \
             ORDER BY t.seq",
            &[],
        )
        .await
        .map_err(fail)?
    {
        let n = |i: usize| row.try_get::<_, i64>(i).unwrap_or(-1);
        problems.push(format!(
            "transaction seq {}: its reversals add up to value {}, points {} in {}, but the \
             record says {}, {} in {}",
            n(0),
            n(1),
            n(2),
            n(3),
            n(4),
            n(5),
            n(6)
        ));
    }
    for row in t
        .query(
            "SELECT seq, reversed_value, value, reversed_points, total_points FROM transactions \
             WHERE reversed_value > value OR reversed_points > total_points ORDER BY seq",
            &[],
        )
        .await
        .map_err(fail)?
    {
        let n = |i: usize| row.try_get::<_, i64>(i).unwrap_or(-1);
        problems.push(format!(
            "transaction seq {}: reversed {} of value {} and {} of {} points",
            n(0),
            n(1),
            n(2),
            n(3),
            n(4)
        ));
    }
    for row in t
        .query(
            "SELECT r.seq FROM reversals r JOIN transactions t ON t.seq = r.tx_seq \
             WHERE t.business <> r.business ORDER BY r.seq",
            &[],
        )
        .await
        .map_err(fail)?
    {
        let seq: i64 = row.try_get(0).map_err(fail)?;
        problems.push(format!(
            "reversal {seq} names another business's transaction"
        ));
    }
    for row in t
        .query(
            "SELECT d.kind, d.id FROM deliveries d WHERE NOT CASE d.kind \
               WHEN 0 THEN EXISTS (SELECT 1 FROM transactions t WHERE t.seq = d.id) \
               WHEN 1 THEN EXISTS (SELECT 1 FROM reversals r WHERE r.seq = d.id) \
               WHEN 2 THEN EXISTS (SELECT 1 FROM events e WHERE e.seq = d.id) \
               ELSE false END \
             ORDER BY d.kind, d.id",
            &[],
        )
        .await
        .map_err(fail)?
    {
        let kind: i16 = row.try_get(0).map_err(fail)?;
        let seq: i64 = row.try_get(1).map_err(fail)?;
        problems.push(match kind {
            JOB_CREDIT => format!("delivery {seq} names a missing transaction"),
            JOB_DEBIT => format!("debit {seq} names a missing reversal"),
            JOB_EVENT => format!("event delivery {seq} names a missing event"),
            _ => format!("delivery ({kind}, {seq}) has an unknown job kind"),
        });
    }
    for row in t
        .query(
            "SELECT e.seq FROM events e WHERE NOT EXISTS \
             (SELECT 1 FROM deliveries d WHERE d.kind = 2 AND d.id = e.seq) ORDER BY e.seq",
            &[],
        )
        .await
        .map_err(fail)?
    {
        let seq: i64 = row.try_get(0).map_err(fail)?;
        problems.push(format!("event {seq} has no delivery state"));
    }
    for row in t
        .query(
            "SELECT kind, id, status, next_attempt_at IS NOT NULL FROM deliveries \
             WHERE status NOT IN (0, 1, 2) OR (status = 0) <> (next_attempt_at IS NOT NULL) \
             OR (error_kind IS NOT NULL AND error_kind NOT IN (1, 2, 3)) \
             OR attempts < 0 OR step < 0 ORDER BY kind, id",
            &[],
        )
        .await
        .map_err(fail)?
    {
        let kind: i16 = row.try_get(0).map_err(fail)?;
        let seq: i64 = row.try_get(1).map_err(fail)?;
        let status: i16 = row.try_get(2).map_err(fail)?;
        let due: bool = row.try_get(3).map_err(fail)?;
        problems.push(match (status, due) {
            (PENDING, false) => format!("delivery ({kind}, {seq}) is pending with no due time"),
            (1 | 2, true) => format!("delivery ({kind}, {seq}) is not pending but has a due time"),
            (0..=2, _) => {
                format!("delivery ({kind}, {seq}) has an unknown error kind or a negative count")
            }
            (other, _) => format!("delivery ({kind}, {seq}) has an unknown status {other}"),
        });
    }
    let _ = t.commit().await;
    Ok(report)
}
