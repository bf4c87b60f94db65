//! The database: what callers may ask of it ([`Store`], an enum over a closed set of
//! backends that dispatches each method), and its two implementations: an embedded redb
//! file with a single group-commit writer thread ([`Embedded`], the default), and a
//! PostgreSQL database shared by several processes ([`Postgres`], `postgres/`; see
//! docs/API.md, "PostgreSQL backend").
//!
//! Invariant: this is the only module that knows redb, postcard and tokio-postgres, and
//! its interface (this file's public items) names none of them: callers pass domain
//! values and query types and get domain values back, from `async` methods, and listings
//! as a [`Listing`] of batches.
//!
//! The redb implementation:
//!
//! - `embedded`: opening, reads, the writer's queue: what [`Store`] dispatches to.
//! - [`schema`]: tables, versioned records, migrations.
//! - `handle`: opening, sharing and reopening the file.
//! - `prefill`: the file as redb writes it, with zeros written a chunk ahead of its data,
//!   so that a commit seldom allocates disk blocks.
//! - `writer`: the group-commit writer; every write is a closure over its tables.
//! - `read`: read transactions, records → domain values, the listing scan.
//! - `check`: the consistency check.
//!
//! Tables (keys → values):
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | bytes: `schema_version` (u64 LE), `signing_key`, `id_key`, `next_seq` (u64 LE, written by every commit that makes a transaction; on open the next sequence number is the larger of it and the last transaction's + 1) |
//! | `transactions` | seq | postcard `TxRecord` |
//! | `tx_by_reference` | (business, referenceNumber) | seq |
//! | `tx_by_program_date` | (business, programId, createdAt, seq) | seq: a listing of one program is one range of it; a listing of every program merges the business's per-program ranges by (createdAt, seq) |
//! | `connections` | (business, endUserId, programId) | postcard `ConnectionRecord` |
//! | `deliveries` | (job kind, id) | postcard `DeliveryRecord`: a credit's (id = transaction seq), a debit's (reversal seq) or an event's (event seq) delivery state |
//! | `outbox` | (due at, job kind, id) | (): one entry per pending delivery |
//! | `events` | event seq | postcard `EventRecord`: a merchant webhook event |
//! | `reversals` | reversal seq | postcard `ReversalRecord` |
//! | `reversal_by_reference` | (business, the reversal's referenceNumber) | reversal seq |
//! | `reversals_by_tx` | (transaction seq, reversal seq) | () |
//!
//! A transaction issued to a program with a partner gets its `deliveries` row and its
//! `outbox` entry in the same write transaction as the record itself. The delivery worker
//! reads the due entries (one range scan from the start of `outbox`), and the attempts'
//! outcomes are written back through the writer, many in one write, which moves or
//! removes each outbox entry in the same commit.
//!
//! A reversal is written with its two index entries, its transaction's record (whose
//! reversal totals grow) and, when there is a debit to send, the debit's delivery and
//! outbox entry, all in one commit; the writer decides it against the totals it reads in
//! that same write transaction.
//!
//! Transactions are keyed by `seq`, a counter that only grows: new records append to the
//! end of the table instead of rewriting random pages. The id a client sees is `seq`
//! enciphered with a key kept in `meta` (see [`crate::ledger::IdCipher`]), so ids reveal no volume or
//! order and need no index: an id deciphers to its key. The record's `business` is
//! checked after the read. The program-date index carries `seq` in its keys too, so that
//! transactions within one second list in creation order and every key is unique. A
//! record and all its index entries are written in one write transaction.

mod backup;
mod check;
mod embedded;
mod export;
mod handle;
mod postgres;
mod prefill;
mod read;
pub mod schema;
mod writer;

use std::path::Path;

use tokio::sync::mpsc;

pub(crate) use backup::random_suffix;
pub use backup::{restore_file, BackupReport, RestoreError};
pub use check::{check_file, CheckReport};
pub use embedded::Embedded;
pub use export::Counts;
pub use postgres::{
    check_postgres, migrate_file, MigrateError, Postgres, LEASE_SECONDS, PG_SCHEMA_VERSION,
};
pub use schema::SCHEMA_VERSION;

use crate::clock::Clock;
use crate::config::PostgresConfig;
use crate::delivery::{Delivery, DeliveryStatus, Event, NewEvent};
use crate::domain::{BusinessId, DestinationUserId, EndUserId, ProgramId, ReferenceNumber, UserId};
use crate::ledger::{Connection, NewReversal, NewTransaction, Rejection, Reversal, Transaction};

/// How a state change of a delivery is computed: the current state and the commit's
/// time → the next state, or `None` to leave it.
///
/// `Fn`, not `FnOnce`: a backend may apply a write again (PostgreSQL retries a whole batch
/// after a serialization failure or a deadlock), so it must give the same answer each time.
pub type DeliveryStep = Box<dyn Fn(&Delivery, u64) -> Option<Delivery> + Send + Sync>;
/// The merchant webhook events a transaction's change of status causes (see
/// [`Store::update_delivery`]).
pub type EventsFor = Box<dyn Fn(&Transaction, DeliveryStatus) -> Vec<NewEvent> + Send + Sync>;

/// The merchant webhook events a reversal's change of status causes (see
/// [`Store::update_debit`]).
pub type ReversalEventsFor = Box<dyn Fn(&Reversal, DeliveryStatus) -> Vec<NewEvent> + Send + Sync>;

/// The events a job's change of status may cause, by what the job is about.
pub enum OutcomeEvents {
    /// A credit's: the transaction as it now stands.
    Transaction(EventsFor),
    /// A debit's: the reversal as it now stands.
    Reversal(ReversalEventsFor),
}

/// One delivery attempt's outcome, for [`Store::record_outcomes`].
pub struct JobOutcome {
    /// The job as [`Store::due`] names it: (job kind, id).
    pub job: (u8, u64),
    pub step: DeliveryStep,
    /// For a credit or a debit: the events a change of its status causes. `None` when
    /// the business wants none, which also spares reading the transaction or reversal
    /// back.
    pub events: Option<OutcomeEvents>,
}

/// Why the database could not be opened; each is a one-line message for the operator.
#[derive(Debug)]
pub enum OpenError {
    /// Another process (a running server) holds the file.
    Locked,
    /// Written by a newer Cosmopoints.
    NewerSchema(u64),
    /// Not a database, damaged, or unreadable.
    Unusable(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Locked => write!(f, "the database file is in use by another process (is a server already running on it?)"),
            OpenError::NewerSchema(v) => write!(f, "the database has schema version {v}, newer than this build reads (a redb file: {SCHEMA_VERSION}, PostgreSQL: {PG_SCHEMA_VERSION}); use a newer cosmopoints"),
            OpenError::Unusable(reason) => write!(f, "the database file cannot be used: {reason}"),
        }
    }
}

/// A storage failure on the request path. Details go to the log, never to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The write queue, or the set of running listings, is full.
    Busy,
    /// The database cannot be written or read now (I/O failure, disk full, shutting down).
    Unavailable,
    /// A stored record does not decode: a bug or damage.
    Corrupt,
}

/// The rest of a group-commit batch whose first job is in `batch`: every job queued by
/// now, up to `max` in all. The jobs after a stop (`is_stop`) are dropped, the stop too
/// (their callers see `Unavailable`). Whether a stop came. Both backends' writers batch
/// with this.
fn fill_batch<J>(
    rx: &mut mpsc::Receiver<J>,
    batch: &mut Vec<J>,
    max: usize,
    is_stop: impl Fn(&J) -> bool,
) -> bool {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    match batch.iter().position(is_stop) {
        Some(stop) => {
            batch.truncate(stop);
            true
        }
        None => false,
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    tracing::error!(error = %e, "storage failure");
    StoreError::Unavailable
}

/// What issuing a transaction came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issued {
    /// New and durable.
    Created(Transaction),
    /// The same request was made before; nothing was written.
    Replayed(Transaction),
    /// The referenceNumber exists with another request; the first differing field.
    Conflict(&'static str),
}

/// A program connection write: the stored connection and whether it is new.
pub type Connected = (Connection, bool);

/// An issuance: the checked request and what the ledger decided for it.
pub struct Issue {
    pub business: BusinessId,
    pub program_name: String,
    pub currency: String,
    pub total_points: u64,
    pub request: NewTransaction,
    /// The member id the points go to: the request's `userId`, or the destination of the
    /// end user's program connection.
    pub user_id: UserId,
    /// Whether the program has a partner to deliver to: the transaction then gets an
    /// outbox entry in the same durable write.
    pub deliver: bool,
}

/// A connection upsert.
pub struct Connect {
    pub business: BusinessId,
    pub end_user_id: EndUserId,
    pub program_id: ProgramId,
    pub destination_user_id: DestinationUserId,
}

/// A reversal of one of the business's transactions (found by the caller).
pub struct Reverse {
    pub business: BusinessId,
    pub transaction_seq: u64,
    pub request: NewReversal,
}

/// What a reversal came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reversed {
    /// New and durable.
    Created(Reversal),
    /// The same request was made before; nothing was written.
    Replayed(Reversal),
    /// The referenceNumber exists with another request; the first differing field.
    Conflict(&'static str),
    /// Nothing, or less than asked, is left to reverse.
    Rejected(Rejection),
}

/// What asking to send a failed credit again came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redelivery {
    /// Pending again, with a fresh schedule.
    Redelivered(Box<Transaction>),
    /// Not failed (or without a delivery at all): nothing to send again.
    NotFailed(Option<Box<Transaction>>),
    /// It has reversals, settled while the credit had failed: it stays failed.
    Reversed(Box<Transaction>),
}

/// A job due in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Due {
    /// Credit the transaction's points to its program's partner.
    Credit(Transaction),
    /// Take a reversal's points back at the partner of its transaction's program.
    Debit {
        reversal: Reversal,
        transaction: Box<Transaction>,
    },
    /// Send a merchant webhook event.
    Event(Event),
}

/// A position in a listing: after the transaction created at `created_at` with `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: u64,
    pub seq: u64,
}

impl Cursor {
    pub fn of(tx: &Transaction) -> Cursor {
        Cursor {
            created_at: tx.created_at,
            seq: tx.seq,
        }
    }
}

/// A listing of one business's transactions: created in `start..=end` (epoch seconds),
/// optionally in one program, oldest first (creation order within a second), strictly
/// after `after`, at most `limit` of them.
#[derive(Clone, Debug)]
pub struct TxQuery {
    pub business: BusinessId,
    pub program: Option<ProgramId>,
    pub start: u64,
    pub end: u64,
    pub after: Option<Cursor>,
    pub limit: Option<usize>,
    /// Only transactions whose delivery has this status.
    pub status: Option<DeliveryStatus>,
}

/// The rows of a listing as they are read, in batches (each turned into a `T` by the
/// listing's map), all from one snapshot. Dropping it stops the scan.
pub struct Listing<T> {
    rx: mpsc::Receiver<Result<T, StoreError>>,
}

/// Listings running at once; more get `Busy`. Each holds a blocking thread and a read
/// snapshot (which keeps the file from reusing pages); well below tokio's blocking pool
/// (512 threads), which also runs PBKDF2 for logins.
pub const MAX_LISTINGS: usize = 64;

/// Bounds on the store's memory and batching.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most writes applied in one commit.
    pub max_batch: usize,
    /// Most writes waiting for the writer; beyond it, `StoreError::Busy`.
    pub queue: usize,
    /// redb's page cache, in bytes; `None`: sized from the file each time it is opened
    /// (see `handle::page_cache_bytes`). redb's own default, 1 GiB, would let the cache
    /// grow with any file.
    pub cache_bytes: Option<usize>,
}

impl Limits {
    /// Small limits for tests and benchmarks.
    pub fn new(max_batch: usize, queue: usize) -> Limits {
        Limits {
            max_batch,
            queue,
            cache_bytes: Some(16 << 20),
        }
    }
}

/// The database: one of a closed set of backends, chosen by `[storage] backend`. Every
/// method means the same on each (the integration suites run against both); the enum
/// only dispatches.
pub enum Store {
    /// One embedded redb file (the default).
    Redb(Embedded),
    /// A PostgreSQL database, shared by every process configured with it.
    Postgres(Box<Postgres>),
}

/// Calls the same method on whichever backend this is.
macro_rules! dispatch {
    ($self:expr, $store:ident => $call:expr) => {
        match $self {
            Store::Redb($store) => $call,
            Store::Postgres($store) => $call,
        }
    };
}

/// Awaits the same async method on whichever backend this is. PostgreSQL's futures are
/// boxed: they hold a query's state (KiBs), and unboxed they would set the size of every
/// future that awaits the store, the embedded one's included (a GET's request future was
/// ~5 KiB, allocated per request outside the allocator's fast sizes).
macro_rules! dispatch_async {
    ($self:expr, $store:ident => $call:expr) => {
        match $self {
            Store::Redb($store) => $call.await,
            Store::Postgres($store) => Box::pin($call).await,
        }
    };
}

impl Store {
    /// Opens (creating if missing, with its folder) the redb database at `path`, migrates
    /// an older schema, and starts the writer. `clock` dates new records.
    pub fn open(path: &Path, clock: Clock, limits: Limits) -> Result<Store, OpenError> {
        Embedded::open(path, clock, limits).map(Store::Redb)
    }

    /// Connects to the PostgreSQL database of `config`, applies the schema migrations this
    /// build has and the database lacks, and starts this process's writer. Blocking: call
    /// it before serving (it may be called inside or outside a tokio runtime).
    pub fn open_postgres(
        config: &PostgresConfig,
        clock: Clock,
        limits: Limits,
    ) -> Result<Store, OpenError> {
        Postgres::open(config, clock, limits).map(|p| Store::Postgres(Box::new(p)))
    }

    /// Whether the database is the embedded file (backups and restores are for it only;
    /// a PostgreSQL database is backed up with PostgreSQL's own tools).
    pub fn is_embedded(&self) -> bool {
        matches!(self, Store::Redb(_))
    }

    /// The schema version the database had if this open migrated it (for the start-up log).
    pub fn migrated_from(&self) -> Option<u64> {
        dispatch!(self, s => s.migrated_from())
    }

    /// The database page cache this process opened the file with, for the start-up log;
    /// `None` where the database keeps its own (PostgreSQL).
    pub fn page_cache_bytes(&self) -> Option<usize> {
        dispatch!(self, s => s.page_cache_bytes())
    }

    /// How the page cache is sized when [`Limits::cache_bytes`] is `None`, in words
    /// (`1/32 of the file, 16 to 1024 MiB`).
    pub fn page_cache_rule() -> String {
        handle::auto_cache_rule()
    }

    /// The token signing key kept in the database, made on first use (by `generate`).
    pub fn signing_key(&self, generate: impl FnOnce() -> Vec<u8>) -> Result<Vec<u8>, StoreError> {
        dispatch!(self, s => s.signing_key(generate))
    }

    /// Issues points: durable before this returns `Created`.
    pub async fn issue(&self, issue: Issue) -> Result<Issued, StoreError> {
        dispatch_async!(self, s => s.issue(issue))
    }

    /// Issues many at once, in ONE write (so one durable commit): each as
    /// [`Store::issue`] would, in order, so that a later one with the referenceNumber of an
    /// earlier one is its replay or a conflict.
    pub async fn issue_many(&self, issues: Vec<Issue>) -> Result<Vec<Issued>, StoreError> {
        dispatch_async!(self, s => s.issue_many(issues))
    }

    /// Moves a transaction's delivery on: `step` gets the current state and the commit's
    /// time and returns the next state, or `None` to leave it. Applied by the writer, so it
    /// never races another change of the same delivery. `None` if the transaction has no
    /// delivery; else the transaction as it now stands and whether it changed.
    ///
    /// When it changed, `events` gets the transaction as it now stands and its status
    /// before, and the merchant webhook events it returns are recorded in the same commit.
    /// Both may be called more than once (a retried write): they must be pure.
    pub async fn update_delivery(
        &self,
        seq: u64,
        step: impl Fn(&Delivery, u64) -> Option<Delivery> + Send + Sync + 'static,
        events: impl Fn(&Transaction, DeliveryStatus) -> Vec<NewEvent> + Send + Sync + 'static,
    ) -> Result<Option<(Transaction, bool)>, StoreError> {
        dispatch_async!(self, s => s.update_delivery(seq, step, events))
    }

    /// Moves the delivery of merchant webhook event `seq` on (see
    /// [`Store::update_delivery`]); `None` if there is no such event, else whether it
    /// changed.
    pub async fn update_event(
        &self,
        seq: u64,
        step: impl Fn(&Delivery, u64) -> Option<Delivery> + Send + Sync + 'static,
    ) -> Result<Option<bool>, StoreError> {
        dispatch_async!(self, s => s.update_event(seq, step))
    }

    /// Sends a failed credit again, with a fresh schedule (see [`Redelivery`]).
    pub async fn redeliver_credit(&self, seq: u64) -> Result<Redelivery, StoreError> {
        dispatch_async!(self, s => s.redeliver_credit(seq))
    }

    /// Reverses (part of) a transaction: durable before this returns `Created`. The
    /// writer decides against what remains, so concurrent reversals never take more than
    /// the transaction has.
    pub async fn reverse(&self, reverse: Reverse) -> Result<Reversed, StoreError> {
        dispatch_async!(self, s => s.reverse(reverse))
    }

    /// Moves the debit of reversal `seq` on (see [`Store::update_delivery`]): `None` if it
    /// has no debit, else the reversal as it now stands and whether it changed.
    pub async fn update_debit(
        &self,
        seq: u64,
        step: impl Fn(&Delivery, u64) -> Option<Delivery> + Send + Sync + 'static,
        events: impl Fn(&Reversal, DeliveryStatus) -> Vec<NewEvent> + Send + Sync + 'static,
    ) -> Result<Option<(Reversal, bool)>, StoreError> {
        dispatch_async!(self, s => s.update_debit(seq, step, events))
    }

    /// A due debit whose credit may not be done: it waits while the credit is pending
    /// (`patience` seconds when the credit is due already: its next move re-times it),
    /// and completes without a partner call once the credit failed (the partner never had
    /// the points). `events` makes the merchant events of a change, as for
    /// [`Store::update_debit`]. Whether it moved the debit; one whose credit completed
    /// meanwhile stays due, to be read again (with the credit's partner id) and sent.
    pub async fn hold_debit(
        &self,
        seq: u64,
        patience: u64,
        events: impl Fn(&Reversal, DeliveryStatus) -> Vec<NewEvent> + Send + Sync + 'static,
    ) -> Result<bool, StoreError> {
        dispatch_async!(self, s => s.hold_debit(seq, patience, events))
    }

    /// The business's reversal whose id, else whose referenceNumber, is `key`.
    pub async fn reversal(
        &self,
        business: &BusinessId,
        key: &str,
    ) -> Result<Option<Reversal>, StoreError> {
        dispatch_async!(self, s => s.reversal(business, key))
    }

    /// Records the outcomes of many delivery attempts in one write, durable before this
    /// returns: each as [`Store::update_delivery`] or [`Store::update_event`] would, by its
    /// job's kind.
    pub async fn record_outcomes(&self, outcomes: Vec<JobOutcome>) -> Result<(), StoreError> {
        dispatch_async!(self, s => s.record_outcomes(outcomes))
    }

    /// Completes when a delivery may have become due at once since the last call.
    pub async fn outbox_changed(&self) {
        dispatch_async!(self, s => s.outbox_changed())
    }

    /// Up to `limit` jobs due at `now`, the longest due first, passing over those in
    /// `skip` (job kind, id). On PostgreSQL the jobs returned are claimed for this process
    /// for a lease (see docs/API.md), so that no other process sends them meanwhile.
    pub async fn due(
        &self,
        now: u64,
        limit: usize,
        skip: &std::collections::HashSet<(u8, u64)>,
    ) -> Result<Vec<Due>, StoreError> {
        dispatch_async!(self, s => s.due(now, limit, skip))
    }

    /// Pending deliveries, and the due time of the longest waiting one.
    pub async fn outbox_depth(&self) -> Result<(u64, Option<u64>), StoreError> {
        dispatch_async!(self, s => s.outbox_depth())
    }

    /// Creates or updates a program connection: durable before this returns.
    pub async fn connect(&self, connect: Connect) -> Result<Connected, StoreError> {
        dispatch_async!(self, s => s.connect(connect))
    }

    /// Lets the writer finish every queued write, then stops it. Later writes get
    /// `Unavailable`.
    pub async fn shutdown(&self) {
        dispatch_async!(self, s => s.shutdown())
    }

    /// Releases the database (after [`Store::shutdown`]). Later reads get `Unavailable`.
    pub async fn close(&self) {
        dispatch_async!(self, s => s.close())
    }

    /// Durable commits the writer has made since start, and the writes they held: the
    /// ratio is the mean group-commit batch size.
    pub fn commit_stats(&self) -> (u64, u64) {
        dispatch!(self, s => s.commit_stats())
    }

    /// Writes waiting for the writer now.
    pub fn write_queue_depth(&self) -> usize {
        dispatch!(self, s => s.write_queue_depth())
    }

    /// Calls `hook` after every durable commit with its number of writes and the time the
    /// commit took, on the writer thread: keep it cheap. Only the first hook set is kept.
    pub fn on_commit(&self, hook: impl Fn(usize, std::time::Duration) + Send + Sync + 'static) {
        dispatch!(self, s => s.on_commit(hook))
    }

    /// Writes a consistent snapshot of the whole database, from one read transaction, as
    /// a new database file at `path`. The embedded file only: on PostgreSQL this is
    /// `Unavailable` (callers check [`Store::is_embedded`] first and say to use pg_dump).
    pub async fn backup_to(&self, path: &Path) -> Result<BackupReport, StoreError> {
        match self {
            Store::Redb(s) => s.backup_to(path).await,
            Store::Postgres(_) => {
                tracing::error!("a file backup was asked of a PostgreSQL store");
                Err(StoreError::Unavailable)
            }
        }
    }

    /// Listings running now.
    pub fn running_listings(&self) -> usize {
        dispatch!(self, s => s.running_listings())
    }

    /// Whether the database answers a read.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch_async!(self, s => s.ping())
    }

    /// The business's transaction whose id, else whose referenceNumber, is `key`, with its
    /// reversals.
    pub async fn transaction(
        &self,
        business: &BusinessId,
        key: &str,
    ) -> Result<Option<Transaction>, StoreError> {
        dispatch_async!(self, s => s.transaction(business, key))
    }

    /// As [`Store::transaction`], without reading its reversals (their totals are on the
    /// record): for a write that only needs to know the transaction.
    pub async fn transaction_head(
        &self,
        business: &BusinessId,
        key: &str,
    ) -> Result<Option<Transaction>, StoreError> {
        dispatch_async!(self, s => s.transaction_head(business, key))
    }

    /// The business's transaction with this referenceNumber.
    pub async fn by_reference(
        &self,
        business: &BusinessId,
        reference: &ReferenceNumber,
    ) -> Result<Option<Transaction>, StoreError> {
        dispatch_async!(self, s => s.by_reference(business, reference))
    }

    /// The business's transactions with these referenceNumbers, in their order: for a
    /// bulk issue, whose items are all looked up before any is written. On redb they are
    /// read from one snapshot (one read transaction, each table opened once); on
    /// PostgreSQL in one query.
    pub async fn by_references(
        &self,
        business: &BusinessId,
        references: &[&ReferenceNumber],
    ) -> Result<Vec<Option<Transaction>>, StoreError> {
        match self {
            Store::Redb(s) => s.by_references(business, references),
            Store::Postgres(s) => Box::pin(s.by_references(business, references)).await,
        }
    }

    /// Starts the listing `query`; its rows arrive through the [`Listing`], each batch of
    /// at most a few hundred turned into a `T` by `map` where the rows are read. All rows
    /// come from one snapshot. `Busy` when [`MAX_LISTINGS`] are running.
    pub fn list<T: Send + 'static>(
        &self,
        query: TxQuery,
        map: impl FnMut(&[Transaction]) -> T + Send + 'static,
    ) -> Result<Listing<T>, StoreError> {
        dispatch!(self, s => s.list(query, map))
    }

    /// The end user's connections, optionally in one program, ordered by program id.
    pub async fn connections(
        &self,
        business: &BusinessId,
        end_user_id: &EndUserId,
        program: Option<&ProgramId>,
    ) -> Result<Vec<Connection>, StoreError> {
        dispatch_async!(self, s => s.connections(business, end_user_id, program))
    }

    /// Verifies the live database (see [`check_file`], [`check_postgres`]).
    pub fn check(&self) -> Result<CheckReport, StoreError> {
        dispatch!(self, s => s.check())
    }
}
