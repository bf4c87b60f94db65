//! The embedded database: redb tables, postcard records, and the single writer thread
//! that applies write requests in groups (one durable commit for many requests).
//!
//! Invariant: this is the only module that knows redb and postcard. Everything it returns
//! is a domain type from `ledger`.
//!
//! Tables (keys → values):
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | bytes: `schema_version` (u64 LE), `signing_key`, `id_key`, `next_seq` (u64 LE) |
//! | `transactions` | seq | postcard [`TxRecord`] |
//! | `tx_by_reference` | (business, referenceNumber) | seq |
//! | `tx_by_date` | (business, createdAt, seq) | seq |
//! | `tx_by_program_date` | (business, programId, createdAt, seq) | seq |
//! | `connections` | (business, endUserId, programId) | postcard [`ConnectionRecord`] |
//!
//! Transactions are keyed by `seq`, a counter that only grows: new records append to the
//! end of the table instead of rewriting random pages. The id a client sees is `seq`
//! enciphered with a key kept in `meta` (see [`IdCipher`]), so ids reveal no volume or
//! order and need no index: an id deciphers to its key. The record's `business` is
//! checked after the read. The date indexes carry `seq` in their keys too, so that
//! transactions within one second list in creation order and every key is unique. A
//! record and all its index entries are written in one write transaction.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition,
    TableError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::ledger::{Connection, IdCipher, NewTransaction, Transaction, TransactionId};

/// The on-disk layout this build reads and writes.
pub const SCHEMA_VERSION: u64 = 1;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TRANSACTIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("transactions");
const BY_REFERENCE: TableDefinition<(&str, &str), u64> = TableDefinition::new("tx_by_reference");
const BY_DATE: TableDefinition<(&str, u64, u64), u64> = TableDefinition::new("tx_by_date");
const BY_PROGRAM_DATE: TableDefinition<(&str, &str, u64, u64), u64> =
    TableDefinition::new("tx_by_program_date");
const CONNECTIONS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("connections");

/// A transaction as stored. Field order is the format: append only, and bump
/// [`SCHEMA_VERSION`] for anything else (a golden test pins the bytes).
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct TxRecord {
    business: String,
    reference_number: String,
    program_id: String,
    program_name: String,
    user_id: String,
    description: Option<String>,
    currency: String,
    value: u64,
    total_points: u64,
    bonus: bool,
    created_at: u64,
    seq: u64,
}

/// A program connection as stored (the key holds business, end user and program).
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct ConnectionRecord {
    destination_user_id: String,
    created_at: u64,
    updated_at: u64,
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
            OpenError::NewerSchema(v) => write!(f, "the database file has schema version {v}, newer than this build's {SCHEMA_VERSION}; use a newer cosmopoints"),
            OpenError::Unusable(reason) => write!(f, "the database file cannot be used: {reason}"),
        }
    }
}

/// A storage failure on the request path. Details go to the log, never to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The write queue is full.
    Busy,
    /// The database cannot be written or read now (I/O failure, disk full, shutting down).
    Unavailable,
    /// A stored record does not decode: a bug or damage.
    Corrupt,
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

/// The issuance inputs the writer needs beyond the request itself.
pub struct Issue {
    pub business: String,
    pub program_name: String,
    pub currency: String,
    pub total_points: u64,
    pub request: NewTransaction,
}

/// A connection upsert for the writer.
pub struct Connect {
    pub business: String,
    pub end_user_id: String,
    pub program_id: String,
    pub destination_user_id: String,
}

enum Job {
    Issue(Issue, oneshot::Sender<Result<Issued, StoreError>>),
    Connect(Connect, oneshot::Sender<Result<Connected, StoreError>>),
    /// Finish what is queued before this, then stop.
    Stop,
}

/// Bounds on the store's memory and batching.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most writes applied in one commit.
    pub max_batch: usize,
    /// Most writes waiting for the writer; beyond it, `StoreError::Busy`.
    pub queue: usize,
    /// redb's page cache (its default, 1 GiB, would let the cache grow with the file).
    pub cache_bytes: usize,
}

impl Limits {
    /// Small limits for tests and benchmarks.
    pub fn new(max_batch: usize, queue: usize) -> Limits {
        Limits {
            max_batch,
            queue,
            cache_bytes: 16 << 20,
        }
    }
}

/// The database and its writer. Reads run on the caller's thread (redb reads never wait
/// for the writer); writes queue for the one writer thread.
pub struct Store {
    handle: Arc<Handle>,
    jobs: mpsc::Sender<Job>,
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Store {
    /// Opens (creating if missing, with its folder) the database at `path` and starts the
    /// writer. `clock` dates new records.
    pub fn open(path: &Path, clock: Clock, limits: Limits) -> Result<Store, OpenError> {
        let Limits {
            max_batch,
            queue,
            cache_bytes,
        } = limits;
        // Owner-only: the file holds the token signing key and the id key.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::files::create_private_dir_all(dir).map_err(|e| {
                OpenError::Unusable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        crate::files::ensure_private_file(path)
            .map_err(|e| OpenError::Unusable(format!("cannot create {}: {e}", path.display())))?;
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(open_error)?;
        let (next_seq, id_key) = prepare(&db)?;
        let handle = Arc::new(Handle {
            path: path.to_path_buf(),
            ids: IdCipher::new(&id_key),
            cache_bytes,
            db: std::sync::RwLock::new(Some(Arc::new(db))),
            commits: std::sync::atomic::AtomicU64::new(0),
            writes: std::sync::atomic::AtomicU64::new(0),
        });
        let (jobs, rx) = mpsc::channel(queue.max(1));
        let writer = Writer {
            handle: handle.clone(),
            clock,
            max_batch: max_batch.max(1),
            next_seq,
        };
        let thread = std::thread::Builder::new()
            .name("cosmopoints-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| OpenError::Unusable(format!("cannot start the writer thread: {e}")))?;
        Ok(Store {
            handle,
            jobs,
            writer: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// The token signing key kept in the database, made on first use.
    pub fn signing_key(&self, generate: impl FnOnce() -> Vec<u8>) -> Result<Vec<u8>, StoreError> {
        {
            // The handle stays held while the transaction reads: a reopen waits for it.
            let db = self.handle.db()?;
            let txn = db.begin_read().map_err(unavailable)?;
            let meta = txn.open_table(META).map_err(unavailable)?;
            if let Some(key) = meta.get("signing_key").map_err(unavailable)? {
                return Ok(key.value().to_vec());
            }
        }
        // First start: only `open` (single-threaded, before serving) gets here.
        let key = generate();
        let txn = self.handle.db()?.begin_write().map_err(unavailable)?;
        {
            let mut meta = txn.open_table(META).map_err(unavailable)?;
            meta.insert("signing_key", key.as_slice())
                .map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)?;
        Ok(key)
    }

    /// Issues points: durable before this returns `Created`.
    pub async fn issue(&self, issue: Issue) -> Result<Issued, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Issue(issue, reply))?;
        answer.await.map_err(|_| StoreError::Unavailable)?
    }

    /// Creates or updates a program connection: durable before this returns.
    pub async fn connect(&self, connect: Connect) -> Result<Connected, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Connect(connect, reply))?;
        answer.await.map_err(|_| StoreError::Unavailable)?
    }

    fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreError::Busy,
            mpsc::error::TrySendError::Closed(_) => StoreError::Unavailable,
        })
    }

    /// Lets the writer finish every queued write, then stops it. Later writes get
    /// `Unavailable`.
    pub async fn shutdown(&self) {
        let _ = self.jobs.send(Job::Stop).await;
        let handle = self
            .writer
            .lock()
            .expect("writer lock is never poisoned")
            .take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    /// Durable commits the writer has made since start, and the writes they held: the
    /// ratio is the mean group-commit batch size.
    pub fn commit_stats(&self) -> (u64, u64) {
        let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        (load(&self.handle.commits), load(&self.handle.writes))
    }

    /// Whether the database answers a read.
    pub fn ping(&self) -> Result<(), StoreError> {
        // The handle stays held while the transaction reads: a reopen waits for it.
        let db = self.handle.db()?;
        let txn = db.begin_read().map_err(unavailable)?;
        txn.open_table(META).map_err(unavailable)?;
        Ok(())
    }

    /// The business's transaction whose id, else whose referenceNumber, is `key`.
    pub fn transaction(
        &self,
        business: &str,
        key: &str,
    ) -> Result<Option<Transaction>, StoreError> {
        // The handle stays held while the transaction reads: a reopen waits for it.
        let db = self.handle.db()?;
        let txn = db.begin_read().map_err(unavailable)?;
        let records = txn.open_table(TRANSACTIONS).map_err(unavailable)?;
        let seq = TransactionId::parse(key).and_then(|id| self.handle.ids.decode(id));
        if let Some(seq) = seq {
            if let Some(tx) = read_tx(&self.handle.ids, &records, seq)? {
                if tx.business == business {
                    return Ok(Some(tx));
                }
            }
        }
        let by_ref = txn.open_table(BY_REFERENCE).map_err(unavailable)?;
        match by_ref.get((business, key)).map_err(unavailable)? {
            Some(seq) => read_tx(&self.handle.ids, &records, seq.value()),
            None => Ok(None),
        }
    }

    /// The business's transaction with this referenceNumber.
    pub fn by_reference(
        &self,
        business: &str,
        reference: &str,
    ) -> Result<Option<Transaction>, StoreError> {
        // The handle stays held while the transaction reads: a reopen waits for it.
        let db = self.handle.db()?;
        let txn = db.begin_read().map_err(unavailable)?;
        let by_ref = txn.open_table(BY_REFERENCE).map_err(unavailable)?;
        match by_ref.get((business, reference)).map_err(unavailable)? {
            Some(id) => {
                let records = txn.open_table(TRANSACTIONS).map_err(unavailable)?;
                read_tx(&self.handle.ids, &records, id.value())
            }
            None => Ok(None),
        }
    }

    /// The business's transactions created in `start..=end` (epoch seconds), optionally in
    /// one program, oldest first, strictly after the `after` cursor. Calls `visit` with each
    /// until it returns `false`. Blocking: run it off the async workers.
    pub fn scan(
        &self,
        business: &str,
        program: Option<&str>,
        start: u64,
        end: u64,
        after: Option<Cursor>,
        mut visit: impl FnMut(Transaction) -> bool,
    ) -> Result<(), StoreError> {
        use std::ops::Bound::{Excluded, Included};
        // The handle stays held while the transaction reads: a reopen waits for it.
        let db = self.handle.db()?;
        let txn = db.begin_read().map_err(unavailable)?;
        let records = txn.open_table(TRANSACTIONS).map_err(unavailable)?;
        let mut emit = |seq: u64| -> Result<bool, StoreError> {
            let tx = read_tx(&self.handle.ids, &records, seq)?.ok_or_else(|| {
                tracing::error!(seq, "an index entry names a missing transaction");
                StoreError::Corrupt
            })?;
            Ok(visit(tx))
        };
        match program {
            None => {
                let index = txn.open_table(BY_DATE).map_err(unavailable)?;
                let lower = match after.filter(|c| c.created_at >= start) {
                    Some(c) => Excluded((business, c.created_at, c.seq)),
                    None => Included((business, start, 0)),
                };
                for entry in index
                    .range((lower, Included((business, end, u64::MAX))))
                    .map_err(unavailable)?
                {
                    let (_, id) = entry.map_err(unavailable)?;
                    if !emit(id.value())? {
                        break;
                    }
                }
            }
            Some(program) => {
                let index = txn.open_table(BY_PROGRAM_DATE).map_err(unavailable)?;
                let lower = match after.filter(|c| c.created_at >= start) {
                    Some(c) => Excluded((business, program, c.created_at, c.seq)),
                    None => Included((business, program, start, 0)),
                };
                let upper = Included((business, program, end, u64::MAX));
                for entry in index.range((lower, upper)).map_err(unavailable)? {
                    let (_, id) = entry.map_err(unavailable)?;
                    if !emit(id.value())? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// The end user's connections, optionally in one program, ordered by program id.
    pub fn connections(
        &self,
        business: &str,
        end_user_id: &str,
        program: Option<&str>,
    ) -> Result<Vec<Connection>, StoreError> {
        // The handle stays held while the transaction reads: a reopen waits for it.
        let db = self.handle.db()?;
        let txn = db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(CONNECTIONS).map_err(unavailable)?;
        let mut found = Vec::new();
        for entry in table
            .range((business, end_user_id, "")..)
            .map_err(unavailable)?
        {
            let (key, value) = entry.map_err(unavailable)?;
            let (b, user, program_id) = key.value();
            if b != business || user != end_user_id {
                break;
            }
            if program.is_some_and(|p| p != program_id) {
                continue;
            }
            let record: ConnectionRecord = decode(value.value())?;
            found.push(connection(user, program_id, record));
        }
        Ok(found)
    }
}

/// The open database, shared by readers and the writer, and replaced by the writer after
/// an I/O failure.
///
/// redb latches an I/O error (a full disk, say): every later operation on that `Database`
/// fails until it is reopened. So after a failed commit the writer takes the database out
/// (requests meanwhile get 503 at once), waits for readers to let go of it, and opens the
/// file again, which makes redb recover it to the last durable commit. Until that works
/// (for instance while the disk is still full) it retries on every write and at least
/// every [`RECOVERY_RETRY`].
struct Handle {
    path: std::path::PathBuf,
    /// Turns sequence numbers into client-facing ids and back.
    ids: IdCipher,
    cache_bytes: usize,
    db: std::sync::RwLock<Option<Arc<Database>>>,
    /// Durable commits made by the writer, and the writes they held.
    commits: std::sync::atomic::AtomicU64,
    writes: std::sync::atomic::AtomicU64,
}

/// How often the writer retries opening a database it had to close.
const RECOVERY_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

impl Handle {
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(StoreError::Unavailable)
    }

    fn is_open(&self) -> bool {
        self.db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    /// Closes the database (waiting up to a few seconds for readers to let go of it) and
    /// opens it again; returns the sequence counter read back from the file.
    fn reopen(&self) -> Option<u64> {
        let old = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(mut old) = old {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(shared) if std::time::Instant::now() < deadline => {
                        old = shared;
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    Err(shared) => {
                        // A long listing still reads it: put it back, retry later.
                        *self
                            .db
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(shared);
                        return None;
                    }
                }
            }
        }
        let reopened = Database::builder()
            .set_cache_size(self.cache_bytes)
            .create(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|db| {
                prepare(&db)
                    .map(|(seq, _)| (db, seq))
                    .map_err(|e| e.to_string())
            });
        match reopened {
            Ok((db, next_seq)) => {
                *self
                    .db
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(db));
                tracing::warn!("database reopened after a storage failure");
                Some(next_seq)
            }
            Err(e) => {
                tracing::error!(error = %e, "database cannot be reopened yet");
                None
            }
        }
    }
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

fn open_error(e: DatabaseError) -> OpenError {
    match e {
        DatabaseError::DatabaseAlreadyOpen => OpenError::Locked,
        other => OpenError::Unusable(other.to_string()),
    }
}

/// Checks the schema version (writing it and a new id key into a new file) and reads the
/// next sequence number and the id key; creates every table so that readers never meet a
/// missing one.
fn prepare(db: &Database) -> Result<(u64, Vec<u8>), OpenError> {
    let bad = |e: &dyn std::fmt::Display| OpenError::Unusable(e.to_string());
    {
        let txn = db.begin_read().map_err(|e| bad(&e))?;
        match txn.open_table(META) {
            Ok(meta) => {
                if let Some(v) = meta.get("schema_version").map_err(|e| bad(&e))? {
                    let version = u64_value(v.value()).ok_or_else(|| {
                        OpenError::Unusable("the schema version is unreadable".into())
                    })?;
                    if version > SCHEMA_VERSION {
                        return Err(OpenError::NewerSchema(version));
                    }
                }
            }
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(bad(&e)),
        }
    }
    let txn = db.begin_write().map_err(|e| bad(&e))?;
    let next_seq;
    let id_key;
    {
        let mut meta = txn.open_table(META).map_err(|e| bad(&e))?;
        let fresh = meta.get("schema_version").map_err(|e| bad(&e))?.is_none();
        if fresh {
            let data_tables = txn.list_tables().map_err(|e| bad(&e))?.count();
            if data_tables > 1 {
                return Err(OpenError::Unusable(
                    "it has tables but no schema version: not a Cosmopoints database".into(),
                ));
            }
            meta.insert("schema_version", SCHEMA_VERSION.to_le_bytes().as_slice())
                .map_err(|e| bad(&e))?;
        }
        let stored_key = meta
            .get("id_key")
            .map_err(|e| bad(&e))?
            .map(|k| k.value().to_vec());
        id_key = match stored_key {
            Some(key) => key,
            None => {
                let key = crate::auth::random_secret();
                meta.insert("id_key", key.as_slice()).map_err(|e| bad(&e))?;
                key
            }
        };
        next_seq = match meta.get("next_seq").map_err(|e| bad(&e))? {
            Some(v) => u64_value(v.value())
                .ok_or_else(|| OpenError::Unusable("the sequence counter is unreadable".into()))?,
            None => 0,
        };
        txn.open_table(TRANSACTIONS).map_err(|e| bad(&e))?;
        txn.open_table(BY_REFERENCE).map_err(|e| bad(&e))?;
        txn.open_table(BY_DATE).map_err(|e| bad(&e))?;
        txn.open_table(BY_PROGRAM_DATE).map_err(|e| bad(&e))?;
        txn.open_table(CONNECTIONS).map_err(|e| bad(&e))?;
    }
    txn.commit().map_err(|e| bad(&e))?;
    Ok((next_seq, id_key))
}

fn u64_value(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| {
        tracing::error!(error = %e, "a stored record does not decode");
        StoreError::Corrupt
    })
}

fn read_tx(
    ids: &IdCipher,
    records: &impl ReadableTable<u64, &'static [u8]>,
    seq: u64,
) -> Result<Option<Transaction>, StoreError> {
    match records.get(seq).map_err(unavailable)? {
        Some(bytes) => Ok(Some(transaction(ids, decode(bytes.value())?))),
        None => Ok(None),
    }
}

fn transaction(ids: &IdCipher, r: TxRecord) -> Transaction {
    Transaction {
        id: ids.encode(r.seq),
        business: r.business,
        reference_number: r.reference_number,
        program_id: r.program_id,
        program_name: r.program_name,
        user_id: r.user_id,
        description: r.description,
        currency: r.currency,
        value: r.value,
        total_points: r.total_points,
        bonus: r.bonus,
        created_at: r.created_at,
        seq: r.seq,
    }
}

fn connection(end_user_id: &str, program_id: &str, r: ConnectionRecord) -> Connection {
    Connection {
        end_user_id: end_user_id.to_owned(),
        program_id: program_id.to_owned(),
        destination_user_id: r.destination_user_id,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// The one thread that writes. It takes every job waiting in the queue (up to
/// `max_batch`), applies them in one write transaction, commits once with
/// `Durability::Immediate`, and only then answers each job.
struct Writer {
    handle: Arc<Handle>,
    clock: Clock,
    max_batch: usize,
    next_seq: u64,
}

/// An answer held back until the batch's commit returns.
enum Pending {
    Issue(oneshot::Sender<Result<Issued, StoreError>>, Issued),
    Connect(oneshot::Sender<Result<Connected, StoreError>>, Connected),
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut stopping = false;
        while !stopping {
            if !self.handle.is_open() {
                // Closed after a storage failure: retry now and then, even with no writes,
                // so that reads come back too.
                self.recover();
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(mpsc::error::TryRecvError::Empty) => {
                        std::thread::sleep(RECOVERY_RETRY);
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else {
                let Some(first) = rx.blocking_recv() else {
                    break;
                };
                batch.push(first);
            }
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if let Some(stop) = batch.iter().position(|j| matches!(j, Job::Stop)) {
                // Jobs queued after Stop are dropped: their callers get Unavailable.
                batch.truncate(stop);
                stopping = true;
            }
            self.apply(&mut batch);
        }
        rx.close();
    }

    /// Writes the batch and answers every job in it. A job whose reply is dropped unsent
    /// (the batch failed) makes its caller see `Unavailable`: nothing of it was committed.
    fn apply(&mut self, batch: &mut Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        let first_seq = self.next_seq;
        let mut pending = Vec::with_capacity(batch.len());
        match self.write(batch, &mut pending) {
            Ok(()) => {
                for answer in pending {
                    match answer {
                        Pending::Issue(reply, issued) => {
                            let _ = reply.send(Ok(issued));
                        }
                        Pending::Connect(reply, connected) => {
                            let _ = reply.send(Ok(connected));
                        }
                    }
                }
            }
            Err(_) => {
                // Logged where it happened. Nothing was committed, so the sequence
                // numbers are free again; the database may have latched the error.
                self.next_seq = first_seq;
                self.recover();
            }
        }
        batch.clear();
    }

    fn recover(&mut self) {
        if let Some(next_seq) = self.handle.reopen() {
            self.next_seq = next_seq;
        }
    }

    /// Applies the batch in one write transaction and commits it durably, moving each
    /// job's reply and outcome into `pending`. On error nothing is committed.
    fn write(
        &mut self,
        batch: &mut Vec<Job>,
        pending: &mut Vec<Pending>,
    ) -> Result<(), StoreError> {
        let now = self.clock.now();
        let db = self.handle.db()?;
        let mut txn = db.begin_write().map_err(unavailable)?;
        txn.set_durability(Durability::Immediate)
            .map_err(unavailable)?;
        {
            let mut tables = WriteTables {
                ids: &self.handle.ids,
                records: txn.open_table(TRANSACTIONS).map_err(unavailable)?,
                by_ref: txn.open_table(BY_REFERENCE).map_err(unavailable)?,
                by_date: txn.open_table(BY_DATE).map_err(unavailable)?,
                by_program: txn.open_table(BY_PROGRAM_DATE).map_err(unavailable)?,
                connections: txn.open_table(CONNECTIONS).map_err(unavailable)?,
            };
            for job in batch.drain(..) {
                match job {
                    Job::Issue(issue, reply) => {
                        let issued = tables.issue(&issue, now, &mut self.next_seq)?;
                        pending.push(Pending::Issue(reply, issued));
                    }
                    Job::Connect(connect, reply) => {
                        let connected = tables.connect(&connect, now)?;
                        pending.push(Pending::Connect(reply, connected));
                    }
                    Job::Stop => {}
                }
            }
            let mut meta = txn.open_table(META).map_err(unavailable)?;
            meta.insert("next_seq", self.next_seq.to_le_bytes().as_slice())
                .map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)?;
        self.handle
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .writes
            .fetch_add(pending.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// The tables one write transaction changes.
struct WriteTables<'txn> {
    ids: &'txn IdCipher,
    records: redb::Table<'txn, u64, &'static [u8]>,
    by_ref: redb::Table<'txn, (&'static str, &'static str), u64>,
    by_date: redb::Table<'txn, (&'static str, u64, u64), u64>,
    by_program: redb::Table<'txn, (&'static str, &'static str, u64, u64), u64>,
    connections: redb::Table<'txn, (&'static str, &'static str, &'static str), &'static [u8]>,
}

impl WriteTables<'_> {
    /// A replay or a conflict if the referenceNumber exists (also when an earlier job of
    /// this same batch made it); else the record and its three index entries.
    fn issue(&mut self, issue: &Issue, now: u64, next_seq: &mut u64) -> Result<Issued, StoreError> {
        let b = issue.business.as_str();
        let r = &issue.request;
        let existing = self
            .by_ref
            .get((b, r.reference_number.as_str()))
            .map_err(unavailable)?
            .map(|seq| seq.value());
        if let Some(seq) = existing {
            let tx = read_tx(self.ids, &self.records, seq)?.ok_or_else(|| {
                tracing::error!(seq, "the reference index names a missing transaction");
                StoreError::Corrupt
            })?;
            return Ok(match tx.differing_field(r) {
                None => Issued::Replayed(tx),
                Some(field) => Issued::Conflict(field),
            });
        }
        let seq = *next_seq;
        *next_seq += 1;
        let record = TxRecord {
            business: issue.business.clone(),
            reference_number: r.reference_number.clone(),
            program_id: r.program_id.clone(),
            program_name: issue.program_name.clone(),
            user_id: r.user_id.clone(),
            description: r.description.clone(),
            currency: issue.currency.clone(),
            value: r.value,
            total_points: issue.total_points,
            bonus: r.bonus,
            created_at: now,
            seq,
        };
        let bytes = postcard::to_allocvec(&record).map_err(unavailable)?;
        self.records
            .insert(seq, bytes.as_slice())
            .map_err(unavailable)?;
        self.by_ref
            .insert((b, r.reference_number.as_str()), seq)
            .map_err(unavailable)?;
        self.by_date
            .insert((b, now, seq), seq)
            .map_err(unavailable)?;
        self.by_program
            .insert((b, r.program_id.as_str(), now, seq), seq)
            .map_err(unavailable)?;
        Ok(Issued::Created(transaction(self.ids, record)))
    }

    /// Creates the connection, or updates its destination and `updated_at`.
    fn connect(&mut self, c: &Connect, now: u64) -> Result<Connected, StoreError> {
        let key = (
            c.business.as_str(),
            c.end_user_id.as_str(),
            c.program_id.as_str(),
        );
        let previous: Option<ConnectionRecord> =
            match self.connections.get(key).map_err(unavailable)? {
                Some(bytes) => Some(decode(bytes.value())?),
                None => None,
            };
        let record = ConnectionRecord {
            destination_user_id: c.destination_user_id.clone(),
            created_at: previous.as_ref().map_or(now, |p| p.created_at),
            updated_at: now,
        };
        let bytes = postcard::to_allocvec(&record).map_err(unavailable)?;
        self.connections
            .insert(key, bytes.as_slice())
            .map_err(unavailable)?;
        Ok((
            connection(&c.end_user_id, &c.program_id, record),
            previous.is_none(),
        ))
    }
}

/// What `check` found: how many of each, and every inconsistency.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub transactions: u64,
    pub references: u64,
    pub date_entries: u64,
    pub program_date_entries: u64,
    pub connections: u64,
    pub problems: Vec<String>,
}

impl Store {
    /// Verifies the live database (see [`check_file`]).
    pub fn check(&self) -> Result<CheckReport, StoreError> {
        // The handle stays held while the transaction reads: a reopen waits for it.
        let db = self.handle.db()?;
        let txn = db.begin_read().map_err(unavailable)?;
        verify(&txn).map_err(unavailable)
    }
}

/// Opens the file at `path` read-only (after redb's own recovery if the last process
/// using it crashed) and verifies that every index entry points to a
/// record with the same key fields, every record has exactly its index entries (so no
/// two records share a business and referenceNumber), and every record decodes.
pub fn check_file(path: &Path) -> Result<CheckReport, OpenError> {
    if !path.exists() {
        return Err(OpenError::Unusable(format!(
            "{} does not exist",
            path.display()
        )));
    }
    let db = match Database::builder().open_read_only(path) {
        // Not shut down cleanly (a crash, kill -9): redb recovers such a file when it is
        // opened for writing, as a server start would. Do that, then check read-only.
        Err(DatabaseError::RepairAborted) => {
            drop(Database::open(path).map_err(open_error)?);
            Database::builder()
                .open_read_only(path)
                .map_err(open_error)?
        }
        other => other.map_err(open_error)?,
    };
    let txn = db
        .begin_read()
        .map_err(|e| OpenError::Unusable(e.to_string()))?;
    {
        let meta = txn
            .open_table(META)
            .map_err(|e| OpenError::Unusable(format!("no meta table: {e}")))?;
        let version = meta
            .get("schema_version")
            .map_err(|e| OpenError::Unusable(e.to_string()))?
            .and_then(|v| u64_value(v.value()));
        match version {
            Some(v) if v > SCHEMA_VERSION => return Err(OpenError::NewerSchema(v)),
            Some(_) => {}
            None => return Err(OpenError::Unusable("no schema version".into())),
        }
    }
    verify(&txn).map_err(|e| OpenError::Unusable(e.to_string()))
}

fn verify(txn: &redb::ReadTransaction) -> Result<CheckReport, redb::Error> {
    let mut report = CheckReport::default();
    let records = txn.open_table(TRANSACTIONS)?;
    let by_ref = txn.open_table(BY_REFERENCE)?;
    let by_date = txn.open_table(BY_DATE)?;
    let by_program = txn.open_table(BY_PROGRAM_DATE)?;
    let problems = &mut report.problems;
    let mut decoded = std::collections::HashMap::new();
    for entry in records.iter()? {
        let (id, bytes) = entry?;
        report.transactions += 1;
        let id = id.value();
        match postcard::from_bytes::<TxRecord>(bytes.value()) {
            Ok(r) => {
                let tx = format!("transaction seq {id}");
                if r.seq != id {
                    problems.push(format!("{tx}: the record says seq {}", r.seq));
                }
                let b = r.business.as_str();
                if by_ref
                    .get((b, r.reference_number.as_str()))?
                    .map(|v| v.value())
                    != Some(id)
                {
                    problems.push(format!(
                        "{tx}: reference index entry missing or pointing elsewhere"
                    ));
                }
                if by_date.get((b, r.created_at, r.seq))?.map(|v| v.value()) != Some(id) {
                    problems.push(format!(
                        "{tx}: date index entry missing or pointing elsewhere"
                    ));
                }
                if by_program
                    .get((b, r.program_id.as_str(), r.created_at, r.seq))?
                    .map(|v| v.value())
                    != Some(id)
                {
                    problems.push(format!(
                        "{tx}: program date index entry missing or pointing elsewhere"
                    ));
                }
                decoded.insert(id, r);
            }
            Err(e) => problems.push(format!("transaction seq {id}: record does not decode: {e}")),
        }
    }
    for entry in by_ref.iter()? {
        let (key, id) = entry?;
        report.references += 1;
        let (b, reference) = key.value();
        match decoded.get(&id.value()) {
            Some(r) if r.business == b && r.reference_number == reference => {}
            _ => problems.push(format!(
                "reference index ({b}, {reference}) names a missing or different record"
            )),
        }
    }
    for entry in by_date.iter()? {
        let (key, id) = entry?;
        report.date_entries += 1;
        let (b, created, seq) = key.value();
        match decoded.get(&id.value()) {
            Some(r) if r.business == b && r.created_at == created && r.seq == seq => {}
            _ => problems.push(format!(
                "date index ({b}, {created}, {seq}) names a missing or different record"
            )),
        }
    }
    for entry in by_program.iter()? {
        let (key, id) = entry?;
        report.program_date_entries += 1;
        let (b, program, created, seq) = key.value();
        match decoded.get(&id.value()) {
            Some(r) if r.business == b && r.program_id == program && r.created_at == created && r.seq == seq => {}
            _ => problems.push(format!(
                "program date index ({b}, {program}, {created}, {seq}) names a missing or different record"
            )),
        }
    }
    for entry in txn.open_table(CONNECTIONS)?.iter()? {
        let (key, bytes) = entry?;
        report.connections += 1;
        if let Err(e) = postcard::from_bytes::<ConnectionRecord>(bytes.value()) {
            let (b, user, program) = key.value();
            problems.push(format!(
                "connection ({b}, {user}, {program}) does not decode: {e}"
            ));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(reference: &str, value: u64) -> Issue {
        Issue {
            business: "acme".into(),
            program_name: "Skywards".into(),
            currency: "AED".into(),
            total_points: value / 10,
            request: NewTransaction {
                program_id: "skywards".into(),
                value,
                user_id: "u".into(),
                reference_number: reference.into(),
                description: None,
                bonus: false,
            },
        }
    }

    #[test]
    fn the_stored_record_format_is_pinned() {
        let record = TxRecord {
            business: "acme".into(),
            reference_number: "inv-1".into(),
            program_id: "sky".into(),
            program_name: "Sky".into(),
            user_id: "u1".into(),
            description: Some("d".into()),
            currency: "AED".into(),
            value: 3673,
            total_points: 833,
            bonus: true,
            created_at: 1_795_774_500,
            seq: 7,
        };
        let bytes = postcard::to_allocvec(&record).expect("encodes");
        let golden: &[u8] = &[
            4, b'a', b'c', b'm', b'e', 5, b'i', b'n', b'v', b'-', b'1', 3, b's', b'k', b'y', 3,
            b'S', b'k', b'y', 2, b'u', b'1', 1, 1, b'd', 3, b'A', b'E', b'D', 0xd9, 0x1c, 0xc1,
            0x06, 1, 0xa4, 0xb0, 0xa5, 0xd8, 0x06, 7,
        ];
        assert_eq!(
            bytes, golden,
            "a change here needs a SCHEMA_VERSION bump and a migration"
        );
        assert_eq!(
            postcard::from_bytes::<TxRecord>(golden).expect("decodes"),
            record
        );

        let connection = ConnectionRecord {
            destination_user_id: "EK1".into(),
            created_at: 1,
            updated_at: 2,
        };
        let bytes = postcard::to_allocvec(&connection).expect("encodes");
        assert_eq!(bytes, [3, b'E', b'K', b'1', 1, 2]);
    }

    #[test]
    fn a_file_from_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.redb");
        {
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("write");
            txn.open_table(META)
                .expect("meta")
                .insert("schema_version", 99u64.to_le_bytes().as_slice())
                .expect("insert");
            txn.commit().expect("commit");
        }
        match Store::open(&path, Clock::system(), Limits::new(8, 8)) {
            Err(OpenError::NewerSchema(99)) => {}
            Err(other) => panic!("unexpected {other}"),
            Ok(_) => panic!("a newer schema was opened"),
        }
        assert!(matches!(check_file(&path), Err(OpenError::NewerSchema(99))));
    }

    #[test]
    fn a_batch_applies_duplicates_and_conflicts_per_request() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(
            &dir.path().join("db.redb"),
            Clock::manual(100),
            Limits::new(1000, 1000),
        )
        .expect("open");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let outcomes = rt.block_on(async {
            // All submitted before the writer runs a batch: they share one commit.
            let futures = vec![
                store.issue(issue("a", 100)),
                store.issue(issue("a", 100)),
                store.issue(issue("a", 200)),
                store.issue(issue("b", 100)),
            ];
            let mut outcomes = Vec::new();
            for f in futures {
                outcomes.push(f.await.expect("stored"));
            }
            outcomes
        });
        let Issued::Created(a) = &outcomes[0] else {
            panic!("{:?}", outcomes[0])
        };
        assert_eq!(outcomes[1], Issued::Replayed(a.clone()));
        assert_eq!(outcomes[2], Issued::Conflict("value"));
        assert!(matches!(outcomes[3], Issued::Created(_)));
        let report = store.check().expect("check");
        assert_eq!(
            (report.transactions, report.references, report.date_entries),
            (2, 2, 2)
        );
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }

    #[test]
    fn check_finds_an_index_entry_without_its_record() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.redb");
        {
            let store = Store::open(&path, Clock::manual(100), Limits::new(8, 8)).expect("open");
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("rt");
            rt.block_on(async {
                store.issue(issue("a", 100)).await.expect("a");
                store.issue(issue("b", 100)).await.expect("b");
                store.shutdown().await;
            });
            let txn = store
                .handle
                .db()
                .expect("open")
                .begin_write()
                .expect("write");
            txn.open_table(BY_DATE)
                .expect("t")
                .insert(("acme", 5u64, 999u64), 42u64)
                .expect("insert");
            txn.open_table(BY_REFERENCE)
                .expect("t")
                .remove(("acme", "b"))
                .expect("remove");
            txn.commit().expect("commit");
        }
        let report = check_file(&path).expect("readable");
        assert_eq!(report.transactions, 2);
        assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
        assert!(report.problems[0].contains("reference index entry missing"));
        assert!(report.problems[1].contains("date index (acme, 5, 999)"));
    }
}
