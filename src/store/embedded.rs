//! The redb implementation of the store: one embedded file, a group-commit writer
//! thread, reads on the caller's thread. Moved here as it was when the store became a
//! choice of backends (see [`super::Store`]).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{Database, ReadableTable, ReadableTableMetadata};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::backup::{self, BackupReport};
use super::check::{self, CheckReport};
use super::handle::{open_error, prepare, Handle, Snapshot};
use super::read::{
    self, connection, decode, read_delivery, read_event, read_record, read_reversal, read_tx,
    transaction, with_reversals, Reader,
};
use super::schema::{
    ConnectionRecord, CONNECTIONS, DELIVERIES, EVENTS, JOB_CREDIT, JOB_DEBIT, JOB_EVENT, META,
    OUTBOX, REVERSALS, REVERSALS_BY_TX, REVERSAL_BY_REFERENCE, TRANSACTIONS,
};
use super::writer::{Answer, Job, Tables, Writer, Wrote};
use super::{
    unavailable, Connect, Connected, Due, Issue, Issued, JobOutcome, Limits, Listing, OpenError,
    Redelivery, Reverse, Reversed, StoreError, TxQuery, MAX_LISTINGS, SCHEMA_VERSION,
};

use crate::clock::Clock;
use crate::delivery::{Delivery, DeliveryStatus, NewEvent};
use crate::domain::{BusinessId, EndUserId, ProgramId, ReferenceNumber};
use crate::ledger::{Connection, IdCipher, Reversal, ReversalId, Transaction, TransactionId};

/// The database and its writer. Reads run on the caller's thread (redb reads never wait
/// for the writer; they take microseconds, so the `async` read methods do not yield);
/// writes queue for the one writer thread; listings run on a blocking thread each.
pub struct Embedded {
    pub(super) handle: Arc<Handle>,
    jobs: mpsc::Sender<Job>,
    writer: Mutex<Option<JoinHandle<()>>>,
    listings: Arc<Semaphore>,
    migrated_from: Option<u64>,
    /// The page cache the file was opened with (configured, or sized from the file).
    page_cache: usize,
    /// Woken when a delivery becomes due at once (a new issue, a redelivery).
    outbox_changed: Arc<tokio::sync::Notify>,
}

impl Embedded {
    /// Opens (creating if missing, with its folder) the database at `path`, migrates an
    /// older schema, and starts the writer. `clock` dates new records.
    pub fn open(path: &Path, clock: Clock, limits: Limits) -> Result<Embedded, OpenError> {
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
        let page_cache = super::handle::page_cache_bytes(cache_bytes, path);
        let db = super::prefill::create(Database::builder().set_cache_size(page_cache), path)
            .map_err(open_error)?;
        let prepared = prepare(&db)?;
        let handle = Arc::new(Handle::new(
            path.to_path_buf(),
            &prepared.id_key,
            cache_bytes,
            db,
        ));
        let (jobs, rx) = mpsc::channel(queue.max(1));
        let writer = Writer {
            handle: handle.clone(),
            clock,
            max_batch: max_batch.max(1),
            next_seq: prepared.next_seq,
        };
        let thread = std::thread::Builder::new()
            .name("cosmopoints-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| OpenError::Unusable(format!("cannot start the writer thread: {e}")))?;
        Ok(Embedded {
            handle,
            jobs,
            writer: Mutex::new(Some(thread)),
            listings: Arc::new(Semaphore::new(MAX_LISTINGS)),
            migrated_from: prepared.migrated_from,
            page_cache,
            outbox_changed: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// The schema version the file had if this open migrated it (for the start-up log).
    pub fn migrated_from(&self) -> Option<u64> {
        self.migrated_from
    }

    /// The page cache the file was opened with.
    pub fn page_cache_bytes(&self) -> Option<usize> {
        Some(self.page_cache)
    }

    /// The token signing key kept in the database, made on first use.
    pub fn signing_key(&self, generate: impl FnOnce() -> Vec<u8>) -> Result<Vec<u8>, StoreError> {
        {
            let reader = Reader::begin(&self.handle)?;
            let meta = reader.table(META)?;
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
        let deliver = issue.deliver;
        let issued = self
            .write(move |tables| tables.issue(issue))
            .await?
            .issued(&self.handle.ids);
        if deliver && matches!(issued, Issued::Created(_)) {
            self.outbox_changed.notify_one();
        }
        Ok(issued)
    }

    /// Issues many at once, in ONE write of the writer (so one durable commit): each as
    /// [`Store::issue`] would, in order, so that a later one with the referenceNumber of an
    /// earlier one is its replay or a conflict.
    pub async fn issue_many(&self, issues: Vec<Issue>) -> Result<Vec<Issued>, StoreError> {
        let wrote: Vec<Wrote> = self
            .write(move |tables| {
                issues
                    .into_iter()
                    .map(|issue| tables.issue(issue))
                    .collect()
            })
            .await?;
        let ids = &self.handle.ids;
        let issued: Vec<Issued> = wrote.into_iter().map(|w| w.issued(ids)).collect();
        if issued
            .iter()
            .any(|i| matches!(i, Issued::Created(tx) if tx.delivery.is_some()))
        {
            self.outbox_changed.notify_one();
        }
        Ok(issued)
    }

    /// Moves a transaction's delivery on: `step` gets the current state and the commit's
    /// time and returns the next state, or `None` to leave it. Applied by the writer, so it
    /// never races another change of the same delivery. `None` if the transaction has no
    /// delivery; else the transaction as it now stands and whether it changed.
    ///
    /// When it changed, `events` gets the transaction as it now stands and its status
    /// before, and the merchant webhook events it returns are recorded in the same commit.
    pub async fn update_delivery(
        &self,
        seq: u64,
        step: impl FnOnce(&Delivery, u64) -> Option<Delivery> + Send + 'static,
        events: impl FnOnce(&Transaction, DeliveryStatus) -> Vec<NewEvent> + Send + 'static,
    ) -> Result<Option<(Transaction, bool)>, StoreError> {
        let updated = self
            .write(move |tables| tables.update_delivery(seq, step, events))
            .await?;
        if let Some((_, true)) = &updated {
            // A redelivery is due at once, and so are the events a change recorded.
            self.outbox_changed.notify_one();
        }
        Ok(updated)
    }

    /// Moves the delivery of merchant webhook event `seq` on (see
    /// [`Store::update_delivery`]); `None` if there is no such event, else whether it
    /// changed.
    pub async fn update_event(
        &self,
        seq: u64,
        step: impl FnOnce(&Delivery, u64) -> Option<Delivery> + Send + 'static,
    ) -> Result<Option<bool>, StoreError> {
        self.write(move |tables| tables.update_event(seq, step))
            .await
    }

    /// Sends a failed credit again, with a fresh schedule (see [`Redelivery`]).
    pub async fn redeliver_credit(&self, seq: u64) -> Result<Redelivery, StoreError> {
        let redelivery = self
            .write(move |tables| tables.redeliver_credit(seq))
            .await?;
        if matches!(redelivery, Redelivery::Redelivered(_)) {
            self.outbox_changed.notify_one();
        }
        Ok(redelivery)
    }

    /// Reverses (part of) a transaction: durable before this returns `Created`. The
    /// writer decides against what remains, so concurrent reversals never take more than
    /// the transaction has.
    pub async fn reverse(&self, reverse: Reverse) -> Result<Reversed, StoreError> {
        let reversed = self.write(move |tables| tables.reverse(&reverse)).await?;
        if let Reversed::Created(r) = &reversed {
            if r.delivery.is_some() {
                self.outbox_changed.notify_one();
            }
        }
        Ok(reversed)
    }

    /// Moves the debit of reversal `seq` on (see [`Store::update_delivery`]): `None` if it
    /// has no debit, else the reversal as it now stands and whether it changed.
    pub async fn update_debit(
        &self,
        seq: u64,
        step: impl FnOnce(&Delivery, u64) -> Option<Delivery> + Send + 'static,
        events: impl FnOnce(&Reversal, DeliveryStatus) -> Vec<NewEvent> + Send + 'static,
    ) -> Result<Option<(Reversal, bool)>, StoreError> {
        let updated = self
            .write(move |tables| tables.update_debit(seq, step, events))
            .await?;
        if let Some((_, true)) = &updated {
            self.outbox_changed.notify_one();
        }
        Ok(updated)
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
        events: impl FnOnce(&Reversal, DeliveryStatus) -> Vec<NewEvent> + Send + 'static,
    ) -> Result<bool, StoreError> {
        let moved = self
            .write(move |tables| tables.hold_debit(seq, patience, events))
            .await?;
        if moved {
            self.outbox_changed.notify_one();
        }
        Ok(moved)
    }

    /// The business's reversal whose id, else whose referenceNumber, is `key`.
    pub async fn reversal(
        &self,
        business: &BusinessId,
        key: &str,
    ) -> Result<Option<Reversal>, StoreError> {
        let reader = Reader::begin(&self.handle)?;
        let reversals = reader.table(REVERSALS)?;
        let deliveries = reader.table(DELIVERIES)?;
        let read = |seq| {
            read_reversal(
                reader.ids,
                reader.reversal_ids,
                &reversals,
                &deliveries,
                seq,
            )
        };
        let seq = ReversalId::parse(key).and_then(|id| reader.reversal_ids.decipher(id.0));
        if let Some(seq) = seq {
            if let Some(found) = read(seq)? {
                if found.business == *business {
                    return Ok(Some(found));
                }
            }
        }
        match reader
            .table(REVERSAL_BY_REFERENCE)?
            .get((business.as_str(), key))
            .map_err(unavailable)?
        {
            Some(seq) => read(seq.value()),
            None => Ok(None),
        }
    }

    /// Records the outcomes of many delivery attempts in one write, durable before this
    /// returns: each as [`Store::update_delivery`] or [`Store::update_event`] would, by its
    /// job's kind. The delivery worker gathers the outcomes that come in while the
    /// previous write is committing, so one write carries all of them.
    pub async fn record_outcomes(&self, outcomes: Vec<JobOutcome>) -> Result<(), StoreError> {
        let (due_now, events) = self
            .write(move |tables| {
                let (mut due_now, mut events) = (false, false);
                for outcome in outcomes {
                    let (d, e) = tables.record_outcome(outcome)?;
                    due_now |= d;
                    events |= e;
                }
                Ok((due_now, events))
            })
            .await?;
        if due_now || events {
            self.outbox_changed.notify_one();
        }
        Ok(())
    }

    /// Completes when a delivery may have become due at once since the last call.
    pub async fn outbox_changed(&self) {
        self.outbox_changed.notified().await
    }

    /// Up to `limit` jobs due at `now`, the longest due first, passing over those in
    /// `skip` (job kind, id) without reading them.
    pub async fn due(
        &self,
        now: u64,
        limit: usize,
        skip: &std::collections::HashSet<(u8, u64)>,
    ) -> Result<Vec<Due>, StoreError> {
        let reader = Reader::begin(&self.handle)?;
        let outbox = reader.table(OUTBOX)?;
        let records = reader.table(TRANSACTIONS)?;
        let deliveries = reader.table(DELIVERIES)?;
        // Opened only when an event job is due: the worker looks often.
        let mut events = None;
        let reversals = reader.table(REVERSALS)?;
        let mut due = Vec::new();
        for entry in outbox
            .range(..=(now, u8::MAX, u64::MAX))
            .map_err(unavailable)?
        {
            if due.len() == limit {
                break;
            }
            let (key, _) = entry.map_err(unavailable)?;
            let (_, kind, id) = key.value();
            if skip.contains(&(kind, id)) {
                continue;
            }
            let job = match kind {
                JOB_CREDIT => read_tx(reader.ids, &records, &deliveries, id)?.map(Due::Credit),
                JOB_EVENT => {
                    let events = match &mut events {
                        Some(events) => events,
                        None => events.insert(reader.table(EVENTS)?),
                    };
                    read_event(&self.handle.event_ids, events, &deliveries, id)?.map(Due::Event)
                }
                JOB_DEBIT => {
                    match read_reversal(
                        reader.ids,
                        reader.reversal_ids,
                        &reversals,
                        &deliveries,
                        id,
                    )? {
                        Some(reversal) => {
                            read_tx(reader.ids, &records, &deliveries, reversal.transaction_seq)?
                                .map(|tx| Due::Debit {
                                    reversal,
                                    transaction: Box::new(tx),
                                })
                        }
                        None => None,
                    }
                }
                _ => None,
            };
            match job {
                Some(job) => due.push(job),
                None => {
                    tracing::error!(kind, id, "an outbox entry names a missing job");
                    return Err(StoreError::Corrupt);
                }
            }
        }
        Ok(due)
    }

    /// Pending deliveries, and the due time of the longest waiting one.
    pub async fn outbox_depth(&self) -> Result<(u64, Option<u64>), StoreError> {
        let reader = Reader::begin(&self.handle)?;
        let outbox = reader.table(OUTBOX)?;
        let depth = outbox.len().map_err(unavailable)?;
        let oldest = outbox
            .first()
            .map_err(unavailable)?
            .map(|(key, _)| key.value().0);
        Ok((depth, oldest))
    }

    /// Creates or updates a program connection: durable before this returns.
    pub async fn connect(&self, connect: Connect) -> Result<Connected, StoreError> {
        self.write(move |tables| tables.connect(&connect)).await
    }

    /// Queues `apply` for the writer and waits until the batch holding it is durable.
    async fn write<T: Send + 'static>(
        &self,
        apply: impl for<'t> FnOnce(&mut Tables<'t>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Write(Box::new(move |tables| {
            let outcome = apply(tables)?;
            Ok(Box::new(move || {
                let _ = reply.send(outcome);
            }) as Answer)
        }));
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreError::Busy,
            mpsc::error::TrySendError::Closed(_) => StoreError::Unavailable,
        })?;
        answer.await.map_err(|_| StoreError::Unavailable)
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

    /// Releases the file (after [`Store::shutdown`]), waiting a few seconds for running
    /// reads to finish. Later reads get `Unavailable`.
    pub async fn close(&self) {
        let handle = self.handle.clone();
        let closed =
            tokio::task::spawn_blocking(move || handle.close(std::time::Duration::from_secs(5)))
                .await
                .unwrap_or(false);
        if !closed {
            tracing::warn!("a reader still held the database at shutdown");
        }
    }

    /// Durable commits the writer has made since start, and the writes they held: the
    /// ratio is the mean group-commit batch size.
    pub fn commit_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.handle.commits.load(Relaxed),
            self.handle.writes.load(Relaxed),
        )
    }

    /// Writes waiting for the writer now.
    pub fn write_queue_depth(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    /// Calls `hook` after every durable commit with its number of writes and the time the
    /// commit (fsync included) took, on the writer thread: keep it cheap. Only the first
    /// hook set is kept.
    pub fn on_commit(&self, hook: impl Fn(usize, std::time::Duration) + Send + Sync + 'static) {
        let _ = self.handle.on_commit.set(Box::new(hook));
    }

    /// Writes a consistent snapshot of the whole database, from one read transaction, as
    /// a new database file at `path` (created owner-only; nothing may exist there yet).
    /// Writes go on meanwhile; the snapshot holds what was committed when it began.
    pub async fn backup_to(&self, path: &Path) -> Result<BackupReport, StoreError> {
        let handle = self.handle.clone();
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let reader = Reader::begin(&handle)?;
            backup::backup(&reader.txn, &path)
                .map_err(|e| unavailable(format!("backup failed: {e}")))
        })
        .await
        .map_err(unavailable)?
    }

    /// Listings running now (each holds a blocking thread and a snapshot).
    pub fn running_listings(&self) -> usize {
        MAX_LISTINGS - self.listings.available_permits()
    }

    /// Whether the database answers a read.
    pub async fn ping(&self) -> Result<(), StoreError> {
        Reader::begin(&self.handle)?.table(META).map(drop)
    }

    /// The business's transaction whose id, else whose referenceNumber, is `key`, with its
    /// reversals.
    pub async fn transaction(
        &self,
        business: &BusinessId,
        key: &str,
    ) -> Result<Option<Transaction>, StoreError> {
        let ids = &self.handle.ids;
        let (snapshot, found) = self.find_tx(business, key)?;
        match found {
            // The reversal tables are opened only for a transaction that has reversals.
            Some(tx) if tx.reversed_value > 0 => Ok(Some(with_reversals(
                tx,
                ids,
                &self.handle.reversal_ids,
                &snapshot.table(REVERSALS)?,
                &snapshot.table(REVERSALS_BY_TX)?,
                &snapshot.deliveries,
            )?)),
            found => Ok(found),
        }
    }

    /// As [`Store::transaction`], without reading its reversals (their totals are on the
    /// record): for a write that only needs to know the transaction.
    pub async fn transaction_head(
        &self,
        business: &BusinessId,
        key: &str,
    ) -> Result<Option<Transaction>, StoreError> {
        Ok(self.find_tx(business, key)?.1)
    }

    /// [`find_tx`] in the published snapshot, and when it finds nothing, in a fresh one
    /// (see [`Handle::fresh_snapshot`]); with the snapshot it was found in.
    fn find_tx(
        &self,
        business: &BusinessId,
        key: &str,
    ) -> Result<(Arc<Snapshot>, Option<Transaction>), StoreError> {
        let snapshot = self.handle.snapshot()?;
        if let Some(tx) = find_tx(&snapshot, &self.handle.ids, business, key)? {
            return Ok((snapshot, Some(tx)));
        }
        let snapshot = self.handle.fresh_snapshot()?;
        let found = find_tx(&snapshot, &self.handle.ids, business, key)?;
        Ok((snapshot, found))
    }

    /// The business's transaction with this referenceNumber.
    pub async fn by_reference(
        &self,
        business: &BusinessId,
        reference: &ReferenceNumber,
    ) -> Result<Option<Transaction>, StoreError> {
        let snapshot = self.handle.snapshot()?;
        tx_by_reference(&snapshot, &self.handle.ids, business, reference.as_str())
    }

    /// [`Embedded::by_reference`] for each of `references`, from one snapshot.
    ///
    /// They are looked up in sorted order, and each look-up of the index finds the first
    /// stored reference at or after the one asked: every later reference of the request
    /// that sorts before that one is known to be absent without a look-up of its own. So
    /// a batch of new references that sort together (`order-1001`, `order-1002`, …) costs
    /// one descent of the index instead of one each; references scattered among stored
    /// ones cost one each, as single look-ups would.
    pub fn by_references(
        &self,
        business: &BusinessId,
        references: &[&ReferenceNumber],
    ) -> Result<Vec<Option<Transaction>>, StoreError> {
        let snapshot = self.handle.snapshot()?;
        let business = business.as_str();
        let read = |seq: u64| {
            read_tx(
                &self.handle.ids,
                &snapshot.records,
                &snapshot.deliveries,
                seq,
            )
        };
        let mut found: Vec<Option<Transaction>> = Vec::with_capacity(references.len());
        found.resize_with(references.len(), || None);
        let mut order: Vec<usize> = (0..references.len()).collect();
        order.sort_unstable_by(|&a, &b| references[a].as_str().cmp(references[b].as_str()));
        // After a look-up: the first reference of the business stored at or after it
        // (`None`: there is none), so no stored reference lies between the two.
        let mut next_stored: Option<Option<String>> = None;
        for i in order {
            let reference = references[i].as_str();
            match &next_stored {
                Some(None) => break,
                Some(Some(next)) if reference < next.as_str() => continue,
                _ => {}
            }
            let mut at_or_after = snapshot
                .by_ref
                .range((business, reference)..)
                .map_err(unavailable)?;
            next_stored = Some(match at_or_after.next().transpose().map_err(unavailable)? {
                Some((key, seq)) => {
                    let (stored_business, stored) = key.value();
                    if stored_business != business {
                        None
                    } else {
                        if stored == reference {
                            found[i] = read(seq.value())?;
                        }
                        Some(stored.to_owned())
                    }
                }
                None => None,
            });
        }
        Ok(found)
    }

    /// Starts the listing `query`; its rows arrive through the [`Listing`], each batch of
    /// at most a few hundred turned into a `T` by `map` where the rows are read (encode
    /// them there: rows then never cross a thread). `Busy` when [`MAX_LISTINGS`] are
    /// running.
    pub fn list<T: Send + 'static>(
        &self,
        query: TxQuery,
        map: impl FnMut(&[Transaction]) -> T + Send + 'static,
    ) -> Result<Listing<T>, StoreError> {
        let permit = self
            .listings
            .clone()
            .try_acquire_owned()
            .map_err(|_| StoreError::Busy)?;
        let (tx, rx) = mpsc::channel(2);
        let handle = self.handle.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            if let Err(e) = read::scan(&handle, &query, map, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(Listing { rx })
    }

    /// The end user's connections, optionally in one program, ordered by program id.
    pub async fn connections(
        &self,
        business: &BusinessId,
        end_user_id: &EndUserId,
        program: Option<&ProgramId>,
    ) -> Result<Vec<Connection>, StoreError> {
        let reader = Reader::begin(&self.handle)?;
        let table = reader.table(CONNECTIONS)?;
        let mut found = Vec::new();
        for entry in table
            .range((business.as_str(), end_user_id.as_str(), "")..)
            .map_err(unavailable)?
        {
            let (key, value) = entry.map_err(unavailable)?;
            let (b, user, program_id) = key.value();
            if b != business.as_str() || user != end_user_id.as_str() {
                break;
            }
            if program.is_some_and(|p| p != program_id) {
                continue;
            }
            let record = decode::<ConnectionRecord>(value.value())?.latest();
            found.push(connection(user, program_id, record));
        }
        Ok(found)
    }

    /// Verifies the live database (see [`check_file`]).
    pub fn check(&self) -> Result<CheckReport, StoreError> {
        let reader = Reader::begin(&self.handle)?;
        check::verify(&reader.txn, SCHEMA_VERSION).map_err(unavailable)
    }
}

/// The business's transaction whose id, else whose referenceNumber, is `key` (reversals
/// not read in).
fn find_tx(
    snapshot: &Snapshot,
    ids: &IdCipher,
    business: &BusinessId,
    key: &str,
) -> Result<Option<Transaction>, StoreError> {
    let by_id = match TransactionId::parse(key).and_then(|id| ids.decode(id)) {
        Some(seq) => {
            read_record(&snapshot.records, seq)?.filter(|r| r.business == business.as_str())
        }
        None => None,
    };
    match by_id {
        Some(record) => {
            let delivery = read_delivery(&snapshot.deliveries, JOB_CREDIT, record.seq)?;
            Ok(Some(transaction(ids, record, delivery)))
        }
        None => tx_by_reference(snapshot, ids, business, key),
    }
}

/// The business's transaction with referenceNumber `reference`, in `snapshot`.
fn tx_by_reference(
    snapshot: &Snapshot,
    ids: &IdCipher,
    business: &BusinessId,
    reference: &str,
) -> Result<Option<Transaction>, StoreError> {
    match snapshot
        .by_ref
        .get((business.as_str(), reference))
        .map_err(unavailable)?
    {
        Some(seq) => read_tx(ids, &snapshot.records, &snapshot.deliveries, seq.value()),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::super::schema::{BY_PROGRAM_DATE, BY_REFERENCE};
    use super::super::{check_file, Cursor};
    use super::*;
    use crate::domain::UserId;
    use crate::ledger::{NewTransaction, Recipient};

    fn issue(reference: &str, value: u64) -> Issue {
        Issue {
            business: BusinessId::trusted("acme".into()),
            program_name: "Skywards".into(),
            currency: "AED".into(),
            total_points: value / 10,
            request: NewTransaction {
                program_id: ProgramId::trusted("skywards".into()),
                value,
                recipient: Recipient::Member(UserId::trusted("u".into())),
                reference_number: ReferenceNumber::trusted(reference.into()),
                description: None,
                bonus: false,
            },
            user_id: UserId::trusted("u".into()),
            deliver: false,
        }
    }

    /// A store on a new file `db.redb` in `dir`.
    fn open_in(dir: &tempfile::TempDir, clock: Clock, limits: Limits) -> Embedded {
        Embedded::open(&dir.path().join("db.redb"), clock, limits).expect("open")
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt")
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
        match Embedded::open(&path, Clock::system(), Limits::new(8, 8)) {
            Err(OpenError::NewerSchema(99)) => {}
            Err(other) => panic!("unexpected {other}"),
            Ok(_) => panic!("a newer schema was opened"),
        }
        assert!(matches!(check_file(&path), Err(OpenError::NewerSchema(99))));
    }

    #[test]
    fn a_batch_applies_duplicates_and_conflicts_per_request() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open_in(&dir, Clock::manual(100), Limits::new(1000, 1000));
        let outcomes = runtime().block_on(async {
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
            (
                report.transactions,
                report.references,
                report.program_date_entries
            ),
            (2, 2, 2)
        );
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }

    #[test]
    fn look_ups_by_reference_one_or_many_find_what_is_stored() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open_in(&dir, Clock::manual(100), Limits::new(1000, 1000));
        let business = BusinessId::trusted("acme".into());
        let other = BusinessId::trusted("other".into());
        let reference = |r: &str| ReferenceNumber::trusted(r.into());
        runtime().block_on(async {
            for r in ["b", "d", "f"] {
                assert!(matches!(
                    store.issue(issue(r, 100)).await.expect("stored"),
                    Issued::Created(_)
                ));
            }
            for r in ["a", "b", "c", "d", "f", "g"] {
                let one = store
                    .by_reference(&business, &reference(r))
                    .await
                    .expect("read");
                assert_eq!(
                    one.as_ref().map(|tx| tx.reference_number.as_str()),
                    ["b", "d", "f"].contains(&r).then_some(r),
                    "{r}"
                );
                let many = store
                    .by_references(&business, &[&reference(r)])
                    .expect("read");
                assert_eq!(many, vec![one], "{r}");
                assert_eq!(
                    store
                        .by_reference(&other, &reference(r))
                        .await
                        .expect("read"),
                    None
                );
            }
            let asked: Vec<ReferenceNumber> =
                ["g", "b", "a", "f", "c", "d", "b"].map(reference).into();
            let found = store
                .by_references(&business, &asked.iter().collect::<Vec<_>>())
                .expect("read");
            let found: Vec<Option<&str>> = found
                .iter()
                .map(|tx| tx.as_ref().map(|tx| tx.reference_number.as_str()))
                .collect();
            assert_eq!(
                found,
                [None, Some("b"), None, Some("f"), None, Some("d"), Some("b")]
            );
        });
    }

    #[test]
    fn a_look_up_sees_a_commit_that_is_not_yet_published() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open_in(&dir, Clock::manual(100), Limits::new(8, 8));
        let acme = BusinessId::trusted("acme".into());
        runtime().block_on(async {
            let Issued::Created(a) = store.issue(issue("a", 100)).await.expect("a") else {
                panic!("a is new")
            };
            // The snapshot published by a's commit, and b's commit after it.
            let before_b = store.handle.snapshot().expect("snapshot");
            let Issued::Created(b) = store.issue(issue("b", 100)).await.expect("b") else {
                panic!("b is new")
            };
            // As in the moment between b's commit and its publication.
            store.handle.set_published(Some(before_b));
            for (tx, reference) in [(&a, "a"), (&b, "b")] {
                for key in [tx.id.to_string(), reference.to_owned()] {
                    let found = store.transaction(&acme, &key).await.expect("read");
                    assert_eq!(found.as_ref().map(|t| t.seq), Some(tx.seq), "{key}");
                    let head = store.transaction_head(&acme, &key).await.expect("read");
                    assert_eq!(head.map(|t| t.seq), Some(tx.seq), "{key}");
                }
            }
            assert!(store.transaction(&acme, "c").await.expect("read").is_none());
        });
    }

    #[test]
    fn a_listing_streams_in_batches_from_one_snapshot_and_honours_its_limit() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open_in(&dir, Clock::manual(100), Limits::new(1000, 1000));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("rt");
        rt.block_on(async {
            for i in 0..600 {
                store.issue(issue(&format!("r{i}"), 100)).await.expect("a");
            }
            let query = TxQuery {
                business: BusinessId::trusted("acme".into()),
                program: None,
                start: 0,
                end: 1000,
                after: None,
                limit: None,
                status: None,
            };
            let mut listing = store.list(query.clone(), <[_]>::to_vec).expect("list");
            // Written after the listing began: not in its snapshot.
            let first = listing.next().await.expect("batch").expect("ok");
            store.issue(issue("late", 100)).await.expect("late");
            let mut seen: Vec<_> = first;
            while let Some(batch) = listing.next().await {
                seen.extend(batch.expect("ok"));
            }
            assert_eq!(seen.len(), 600);
            assert!(seen.windows(2).all(|w| w[0].seq < w[1].seq));
            let mut page = store
                .list(
                    TxQuery {
                        limit: Some(10),
                        after: Some(Cursor::of(&seen[4])),
                        ..query
                    },
                    <[_]>::to_vec,
                )
                .expect("list");
            let rows = page.next().await.expect("batch").expect("ok");
            assert_eq!(rows.len(), 10);
            assert_eq!(rows[0].seq, seen[5].seq);
            assert!(page.next().await.is_none());
        });
    }

    #[test]
    fn a_listing_shows_each_row_with_its_delivery_as_a_single_read_does() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open_in(&dir, Clock::manual(100), Limits::new(1000, 1000));
        runtime().block_on(async {
            let query = TxQuery {
                business: BusinessId::trusted("acme".into()),
                program: None,
                start: 0,
                end: 1000,
                after: None,
                limit: None,
                status: None,
            };
            let listed = |store: &Embedded| {
                let mut listing = store.list(query.clone(), <[_]>::to_vec).expect("list");
                async move {
                    let mut rows: Vec<Transaction> = Vec::new();
                    while let Some(batch) = listing.next().await {
                        rows.extend(batch.expect("ok"));
                    }
                    rows
                }
            };
            // No delivery anywhere yet (the listing skips the look-ups).
            store.issue(issue("r0", 100)).await.expect("issued");
            assert!(listed(&store).await.iter().all(|t| t.delivery.is_none()));
            // Deliveries in the middle of the range, rows without on both sides and between.
            for i in 1..200usize {
                let mut request = issue(&format!("r{i}"), 100);
                request.deliver = (50..150).contains(&i) && !i.is_multiple_of(3);
                store.issue(request).await.expect("issued");
            }
            let rows = listed(&store).await;
            assert_eq!(rows.len(), 200);
            for row in &rows {
                let single = store
                    .transaction(&row.business, row.reference_number.as_str())
                    .await
                    .expect("read")
                    .expect("found");
                assert_eq!(row, &single);
                let r: usize = row.reference_number.as_str()[1..].parse().expect("r<n>");
                assert_eq!(
                    row.delivery.is_some(),
                    (50..150).contains(&r) && !r.is_multiple_of(3)
                );
            }
        });
    }

    #[test]
    fn a_delivery_moves_through_the_outbox_and_check_follows_it() {
        use crate::delivery::{Attempt, DeliveryStatus};
        let dir = tempfile::tempdir().expect("dir");
        let clock = Clock::manual(1_000);
        let store = open_in(&dir, clock.clone(), Limits::new(8, 8));
        runtime().block_on(async {
            let mut with_partner = issue("p", 100);
            with_partner.deliver = true;
            let Issued::Created(tx) = store.issue(with_partner).await.expect("issued") else {
                panic!("not created")
            };
            assert_eq!(tx.status(), DeliveryStatus::Pending);
            store.issue(issue("no-partner", 100)).await.expect("issued");
            // Only the one with a partner is due, at once.
            let due = store
                .due(1_000, 10, &Default::default())
                .await
                .expect("due");
            assert_eq!(due, [Due::Credit(tx.clone())]);
            assert_eq!(store.outbox_depth().await.expect("depth"), (1, Some(1_000)));

            // A transient failure: due again 5 s later, not before.
            let retry = Attempt::Retry {
                http_status: Some(503),
                detail: "busy".into(),
                retry_after: None,
            };
            let (after, changed) = store
                .update_delivery(
                    tx.seq,
                    move |d, now| Some(d.after(retry, now, &[5])),
                    |_, _| Vec::new(),
                )
                .await
                .expect("written")
                .expect("has a delivery");
            assert!(changed);
            assert_eq!(after.status(), DeliveryStatus::Pending);
            assert!(store
                .due(1_004, 10, &Default::default())
                .await
                .expect("due")
                .is_empty());
            assert_eq!(
                store
                    .due(1_005, 10, &Default::default())
                    .await
                    .expect("due")
                    .len(),
                1
            );
            let report = store.check().expect("check");
            assert_eq!((report.deliveries, report.outbox_entries), (1, 1));
            assert!(report.problems.is_empty(), "{:?}", report.problems);

            // The schedule runs out: failed, out of the outbox; then redelivered.
            clock.set(1_005);
            let retry = Attempt::Retry {
                http_status: None,
                detail: "refused".into(),
                retry_after: None,
            };
            let (failed, _) = store
                .update_delivery(
                    tx.seq,
                    move |d, now| Some(d.after(retry, now, &[5])),
                    |tx, before| {
                        assert_eq!(before, DeliveryStatus::Pending);
                        vec![crate::delivery::NewEvent {
                            target: "http://merchant.test/hook".into(),
                            kind: "transaction.failed",
                            payload: format!("{{\"seq\":{}}}", tx.seq).into_bytes(),
                        }]
                    },
                )
                .await
                .expect("written")
                .expect("has a delivery");
            assert_eq!(failed.status(), DeliveryStatus::Failed);
            // The credit left the outbox; the event it caused entered it, due at once.
            assert_eq!(store.outbox_depth().await.expect("depth"), (1, Some(1_005)));
            let due = store
                .due(1_005, 10, &Default::default())
                .await
                .expect("due");
            let [Due::Event(event)] = due.as_slice() else {
                panic!("{due:?}")
            };
            assert!(
                event.id.starts_with("evt_") && event.id.len() == 26,
                "{}",
                event.id
            );
            assert_eq!(event.kind, "transaction.failed");
            assert_eq!(
                event.payload,
                format!("{{\"seq\":{}}}", tx.seq).into_bytes()
            );
            let delivered = store
                .update_event(event.seq, |d, now| {
                    Some(d.after(
                        Attempt::Delivered {
                            partner_transaction_id: None,
                        },
                        now,
                        &[5],
                    ))
                })
                .await
                .expect("written");
            assert_eq!(delivered, Some(true));
            assert_eq!(store.outbox_depth().await.expect("depth"), (0, None));
            let report = store.check().expect("check");
            assert_eq!((report.events, report.deliveries), (1, 2));
            assert!(report.problems.is_empty(), "{:?}", report.problems);
            let (again, changed) = store
                .update_delivery(tx.seq, |d, now| d.redeliver(now), |_, _| Vec::new())
                .await
                .expect("written")
                .expect("has a delivery");
            assert!(changed);
            assert_eq!(again.status(), DeliveryStatus::Pending);
            assert_eq!(
                store
                    .due(1_005, 10, &Default::default())
                    .await
                    .expect("due")
                    .len(),
                1
            );
            // A transaction without a delivery has nothing to update.
            let none = store
                .by_reference(
                    &BusinessId::trusted("acme".into()),
                    &ReferenceNumber::trusted("no-partner".into()),
                )
                .await
                .expect("read")
                .expect("found");
            assert!(store
                .update_delivery(none.seq, |d, now| d.redeliver(now), |_, _| Vec::new())
                .await
                .expect("written")
                .is_none());
            let report = store.check().expect("check");
            assert!(report.problems.is_empty(), "{:?}", report.problems);
        });
    }

    #[test]
    fn check_finds_reversals_that_do_not_add_up_or_lack_their_indexes() {
        use super::super::schema::{TxRecord, REVERSALS_BY_TX};
        use crate::ledger::NewReversal;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.redb");
        {
            let store = Embedded::open(&path, Clock::manual(100), Limits::new(8, 8)).expect("open");
            runtime().block_on(async {
                let mut delivered = issue("a", 10_000);
                delivered.deliver = true;
                let Issued::Created(tx) = store.issue(delivered).await.expect("a") else {
                    panic!("not created")
                };
                for (reference, value) in [("r-1", Some(2_500)), ("r-2", None)] {
                    let reversed = store
                        .reverse(Reverse {
                            business: BusinessId::trusted("acme".into()),
                            transaction_seq: tx.seq,
                            request: NewReversal {
                                reference_number: ReferenceNumber::trusted(reference.into()),
                                value,
                                reason: None,
                            },
                        })
                        .await
                        .expect("stored");
                    assert!(matches!(reversed, Reversed::Created(_)), "{reversed:?}");
                }
                let report = store.check().expect("check");
                assert_eq!((report.reversals, report.deliveries), (2, 3));
                assert!(report.problems.is_empty(), "{:?}", report.problems);
                store.shutdown().await;
            });
            let txn = store
                .handle
                .db()
                .expect("open")
                .begin_write()
                .expect("write");
            {
                // The record claims one unit more than its reversals add up to.
                let mut records = txn.open_table(TRANSACTIONS).expect("t");
                let bytes = records
                    .get(0u64)
                    .expect("get")
                    .expect("record")
                    .value()
                    .to_vec();
                let mut record = decode::<TxRecord>(&bytes).expect("decodes").latest();
                record.reversed_value += 1;
                let bytes = postcard::to_allocvec(&TxRecord::from(record)).expect("encodes");
                records.insert(0u64, bytes.as_slice()).expect("insert");
                // A reversal loses its entry in the transaction's list.
                txn.open_table(REVERSALS_BY_TX)
                    .expect("t")
                    .remove((0u64, 1u64))
                    .expect("remove");
                // A debit of a reversal that does not exist.
                let debit = txn
                    .open_table(DELIVERIES)
                    .expect("t")
                    .get((JOB_DEBIT, 0u64))
                    .expect("get")
                    .expect("a debit")
                    .value()
                    .to_vec();
                txn.open_table(DELIVERIES)
                    .expect("t")
                    .insert((JOB_DEBIT, 99u64), debit.as_slice())
                    .expect("insert");
            }
            txn.commit().expect("commit");
        }
        let report = check_file(&path).expect("readable");
        let problems = report.problems.join("\n");
        assert!(
            problems.contains("reversals add up to value 10000"),
            "{problems}"
        );
        assert!(
            problems.contains("reversal 1: transaction index entry missing"),
            "{problems}"
        );
        assert!(
            problems.contains("debit 99 names a missing reversal"),
            "{problems}"
        );
    }

    #[test]
    fn check_finds_an_index_entry_without_its_record() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.redb");
        {
            let store = Embedded::open(&path, Clock::manual(100), Limits::new(8, 8)).expect("open");
            runtime().block_on(async {
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
            txn.open_table(BY_PROGRAM_DATE)
                .expect("t")
                .insert(("acme", "skywards", 5u64, 999u64), 42u64)
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
        assert!(report.problems[1].contains("program date index (acme, skywards, 5, 999)"));
    }
}
