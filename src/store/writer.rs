//! The one thread that writes. It takes every write waiting in the queue (up to
//! `max_batch`), applies them in one write transaction, commits once with
//! `Durability::Immediate`, and only then answers each of them: group commit.
//!
//! A write is a closure over [`Tables`] (one request type for every kind of write): a new
//! kind of write is a new method on `Tables` and a new `Store` method that submits it;
//! nothing here changes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use redb::{Durability, ReadableTable};
use tokio::sync::mpsc;

use super::handle::{Handle, RECOVERY_RETRY};
use super::read::{
    connection, decode, delivery_record, read_delivery, read_reversal, read_tx, reversal,
    transaction, with_reversals,
};
use super::schema::{
    Conn, ConnectionRecord, EventRecord, EventV1, ReversalRecord, ReversalV1, Tx, TxRecord,
    BY_PROGRAM_DATE, BY_REFERENCE, CONNECTIONS, DELIVERIES, EVENTS, JOB_CREDIT, JOB_DEBIT,
    JOB_EVENT, META, OUTBOX, REVERSALS, REVERSALS_BY_TX, REVERSAL_BY_REFERENCE, TRANSACTIONS,
};
use super::{
    fill_batch, unavailable, Connect, Connected, Issue, Issued, JobOutcome, OutcomeEvents,
    Redelivery, Reverse, Reversed, StoreError,
};
use crate::clock::Clock;
use crate::delivery::{Delivery, DeliveryStatus, NewEvent};
use crate::domain::Description;
use crate::ledger::{plan_reversal, IdCipher, Rejection, Reversal, MAX_REVERSALS};
use crate::ledger::{Recipient, Transaction};

/// Sends a write's outcome to its caller; run only after the batch's commit returned.
pub(super) type Answer = Box<dyn FnOnce() + Send>;

/// Applies one write inside the batch's write transaction. On `Err` the whole batch is
/// abandoned (nothing commits) and every caller in it sees `Unavailable`.
pub(super) type Apply =
    Box<dyn for<'t> FnOnce(&mut Tables<'t>) -> Result<Answer, StoreError> + Send>;

pub(super) enum Job {
    Write(Apply),
    /// Finish what is queued before this, then stop.
    Stop,
}

pub(super) struct Writer {
    pub handle: Arc<Handle>,
    pub clock: Clock,
    pub max_batch: usize,
    pub next_seq: u64,
}

impl Writer {
    pub fn run(mut self, mut rx: mpsc::Receiver<Job>) {
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
            stopping = fill_batch(&mut rx, &mut batch, self.max_batch, |j| {
                matches!(j, Job::Stop)
            });
            self.apply(&mut batch);
        }
        rx.close();
    }

    /// Writes the batch and answers every job in it. A job whose answer is dropped unsent
    /// (the batch failed) makes its caller see `Unavailable`: nothing of it was committed.
    fn apply(&mut self, batch: &mut Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        let first_seq = self.next_seq;
        let mut answers = Vec::with_capacity(batch.len());
        match self.write(batch, &mut answers) {
            Ok(()) => answers.into_iter().for_each(|answer| answer()),
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

    /// Applies the batch in one write transaction and commits it durably, collecting each
    /// write's answer. On error nothing is committed.
    fn write(&mut self, batch: &mut Vec<Job>, answers: &mut Vec<Answer>) -> Result<(), StoreError> {
        let now = self.clock.now();
        let db = self.handle.db()?;
        let mut txn = db.begin_write().map_err(unavailable)?;
        txn.set_durability(Durability::Immediate)
            .map_err(unavailable)?;
        {
            let mut tables = Tables {
                ids: &self.handle.ids,
                reversal_ids: &self.handle.reversal_ids,
                now,
                next_seq: self.next_seq,
                records: Lazy::new(&txn, TRANSACTIONS),
                by_ref: Lazy::new(&txn, BY_REFERENCE),
                by_program: Lazy::new(&txn, BY_PROGRAM_DATE),
                connections: Lazy::new(&txn, CONNECTIONS),
                deliveries: Lazy::new(&txn, DELIVERIES),
                outbox: Lazy::new(&txn, OUTBOX),
                events: Lazy::new(&txn, EVENTS),
                reversals: Lazy::new(&txn, REVERSALS),
                reversal_by_ref: Lazy::new(&txn, REVERSAL_BY_REFERENCE),
                reversals_by_tx: Lazy::new(&txn, REVERSALS_BY_TX),
                scratch: Vec::with_capacity(1024),
            };
            for job in batch.drain(..) {
                if let Job::Write(apply) = job {
                    answers.push(apply(&mut tables)?);
                }
            }
            // Stored whenever it moved (a batch that made no transaction leaves `meta`
            // alone): builds of schema 4 before this one read the counter from here and
            // trust it, so it stays right. This build also checks it against the last
            // record when it opens the file (`handle::prepare`).
            if tables.next_seq != self.next_seq {
                let mut meta = txn.open_table(META).map_err(unavailable)?;
                meta.insert("next_seq", tables.next_seq.to_le_bytes().as_slice())
                    .map_err(unavailable)?;
            }
            self.next_seq = tables.next_seq;
        }
        let committing = std::time::Instant::now();
        txn.commit().map_err(unavailable)?;
        let took = committing.elapsed();
        // Before any answer: a look-up after an answer must see its write.
        self.handle.publish();
        if let Some(hook) = self.handle.on_commit.get() {
            hook(answers.len(), took);
        }
        self.handle.commits.fetch_add(1, Ordering::Relaxed);
        self.handle
            .writes
            .fetch_add(answers.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// A table of the batch's write transaction, opened when a write first uses it. Most
/// batches touch three or four of the ten tables, and each table opened costs a look-up in
/// redb's table of tables when it is opened and again when the transaction commits (a
/// tenth of the writer's time in a run of single issues, when all ten were opened for every
/// batch).
struct Lazy<'txn, K: redb::Key + 'static, V: redb::Value + 'static> {
    txn: &'txn redb::WriteTransaction,
    definition: redb::TableDefinition<'static, K, V>,
    table: Option<redb::Table<'txn, K, V>>,
}

impl<'txn, K: redb::Key + 'static, V: redb::Value + 'static> Lazy<'txn, K, V> {
    fn new(
        txn: &'txn redb::WriteTransaction,
        definition: redb::TableDefinition<'static, K, V>,
    ) -> Self {
        Lazy {
            txn,
            definition,
            table: None,
        }
    }

    /// The table, opened by the first call.
    fn open(&mut self) -> Result<&mut redb::Table<'txn, K, V>, StoreError> {
        let table = match self.table.take() {
            Some(table) => table,
            None => self.txn.open_table(self.definition).map_err(unavailable)?,
        };
        Ok(self.table.insert(table))
    }
}

/// What [`Tables::issue`] did. A new transaction comes back as its record: the caller
/// makes it the API's [`Transaction`] (enciphering its id) off the writer's thread, which
/// is the one thread every write waits for.
pub(super) enum Wrote {
    Created(Tx, Option<Delivery>),
    /// A replay or a conflict.
    Done(Issued),
}

impl Wrote {
    pub fn issued(self, ids: &IdCipher) -> Issued {
        match self {
            Wrote::Created(tx, delivery) => Issued::Created(transaction(ids, tx, delivery)),
            Wrote::Done(issued) => issued,
        }
    }
}

/// `value` encoded into `buf` (emptied first, its capacity kept).
fn encode<'b, T: serde::Serialize>(
    buf: &'b mut Vec<u8>,
    value: &T,
) -> Result<&'b [u8], StoreError> {
    buf.clear();
    *buf = postcard::to_extend(value, std::mem::take(buf)).map_err(unavailable)?;
    Ok(buf.as_slice())
}

/// The tables one write transaction changes, and what every write in it shares.
pub(super) struct Tables<'txn> {
    ids: &'txn IdCipher,
    reversal_ids: &'txn IdCipher,
    /// The batch's time: every record it writes is dated with it.
    now: u64,
    /// The next transaction sequence number.
    next_seq: u64,
    records: Lazy<'txn, u64, &'static [u8]>,
    by_ref: Lazy<'txn, (&'static str, &'static str), u64>,
    by_program: Lazy<'txn, (&'static str, &'static str, u64, u64), u64>,
    connections: Lazy<'txn, (&'static str, &'static str, &'static str), &'static [u8]>,
    deliveries: Lazy<'txn, (u8, u64), &'static [u8]>,
    outbox: Lazy<'txn, (u64, u8, u64), ()>,
    events: Lazy<'txn, u64, &'static [u8]>,
    reversals: Lazy<'txn, u64, &'static [u8]>,
    reversal_by_ref: Lazy<'txn, (&'static str, &'static str), u64>,
    reversals_by_tx: Lazy<'txn, (u64, u64), ()>,
    /// Where records are encoded before they are inserted: one buffer for the batch, so
    /// that encoding a record does not allocate (and grow, and free) a vector of its own.
    scratch: Vec<u8>,
}

impl Tables<'_> {
    /// A replay or a conflict if the referenceNumber exists (also when an earlier write of
    /// this same batch made it); else the record and its two index entries.
    pub fn issue(&mut self, issue: Issue) -> Result<Wrote, StoreError> {
        let (seq, now) = (self.next_seq, self.now);
        // The reference index is written first, claiming the reference for `seq`: one
        // descent of its tree for a new reference (the usual case) instead of a look-up
        // and then an insert. If the reference was taken, its entry is put back at once
        // (and if that fails the whole batch fails, so nothing of it is committed).
        let key = (
            issue.business.as_str(),
            issue.request.reference_number.as_str(),
        );
        let taken = self
            .by_ref
            .open()?
            .insert(key, seq)
            .map_err(unavailable)?
            .map(|old| old.value());
        if let Some(existing) = taken {
            self.by_ref
                .open()?
                .insert(key, existing)
                .map_err(unavailable)?;
            let tx = read_tx(
                self.ids,
                self.records.open()?,
                self.deliveries.open()?,
                existing,
            )?
            .ok_or_else(|| {
                tracing::error!(
                    seq = existing,
                    "the reference index names a missing transaction"
                );
                StoreError::Corrupt
            })?;
            return Ok(Wrote::Done(match tx.differing_field(&issue.request) {
                None => Issued::Replayed(tx),
                Some(field) => Issued::Conflict(field),
            }));
        }
        self.next_seq += 1;
        let Issue {
            business,
            program_name,
            currency,
            total_points,
            request: r,
            user_id,
            deliver,
        } = issue;
        let record = TxRecord::from(Tx {
            business: business.into_string(),
            reference_number: r.reference_number.into_string(),
            program_id: r.program_id.into_string(),
            program_name,
            user_id: user_id.into_string(),
            description: r.description.map(Description::into_string),
            currency,
            value: r.value,
            total_points,
            bonus: r.bonus,
            created_at: now,
            seq,
            end_user_id: match r.recipient {
                Recipient::EndUser(end_user) => Some(end_user.into_string()),
                Recipient::Member(_) => None,
            },
            reversed_value: 0,
            reversed_points: 0,
            reversals: 0,
        });
        self.records
            .open()?
            .insert(seq, encode(&mut self.scratch, &record)?)
            .map_err(unavailable)?;
        let tx = record.latest();
        self.by_program
            .open()?
            .insert(
                (tx.business.as_str(), tx.program_id.as_str(), now, seq),
                seq,
            )
            .map_err(unavailable)?;
        // The outbox row goes in the same write as the transaction: both or neither.
        let delivery = deliver.then(|| Delivery::new(now));
        if let Some(d) = &delivery {
            self.put_delivery(JOB_CREDIT, seq, None, d)?;
        }
        Ok(Wrote::Created(tx, delivery))
    }

    /// Moves the delivery of transaction `seq` on with `step` (given the current state,
    /// the next one, or `None` to leave it as it is). `None` if the transaction has no
    /// delivery; else the transaction as it now stands and whether `step` changed it.
    ///
    /// When it changed, `events` gets the transaction as it now stands and the status it
    /// had before, and the merchant webhook events it returns are recorded in this same
    /// write, each with its own delivery, due at once.
    pub fn update_delivery(
        &mut self,
        seq: u64,
        step: impl FnOnce(&Delivery, u64) -> Option<Delivery>,
        events: impl FnOnce(&Transaction, DeliveryStatus) -> Vec<NewEvent>,
    ) -> Result<Option<(Transaction, bool)>, StoreError> {
        let Some((before, next)) = self.step_delivery(JOB_CREDIT, seq, step)? else {
            return Ok(None);
        };
        let tx = self.transaction_of(seq)?;
        if let (Some(next), true) = (&next, tx.reversed_value > 0) {
            // Debits wait for their credit: they follow its every move.
            self.retime_debits(seq, next)?;
        }
        let tx = self.with_reversals(tx)?;
        if next.is_some() {
            for event in events(&tx, before) {
                self.record_event(tx.business.as_str(), event)?;
            }
        }
        Ok(Some((tx, next.is_some())))
    }

    /// Records one delivery attempt's outcome (see [`super::Store::record_outcomes`]):
    /// whether it left the job due at or before `now` (a change that needs the worker to
    /// look again at once), and whether it recorded merchant events.
    pub fn record_outcome(&mut self, outcome: JobOutcome) -> Result<(bool, bool), StoreError> {
        let JobOutcome {
            job: (kind, id),
            step,
            events,
        } = outcome;
        let now = self.now;
        let due_now = |next: &Delivery| next.next_attempt_at.is_some_and(|at| at <= now);
        match kind {
            JOB_EVENT => {
                let Some((_, Some(next))) = self.step_delivery(kind, id, step)? else {
                    return Ok((false, false));
                };
                Ok((due_now(&next), false))
            }
            // A credit: its delivery moves on, its waiting debits follow it, and a change of
            // status may cause merchant events. The transaction is read only when they are
            // wanted.
            JOB_CREDIT => {
                let Some((before, Some(next))) = self.step_delivery(kind, id, step)? else {
                    return Ok((false, false));
                };
                let debits_due = self.retime_debits(id, &next)?;
                let mut recorded = false;
                if let Some(OutcomeEvents::Transaction(events)) =
                    events.filter(|_| next.status != before)
                {
                    let tx = self.transaction_of(id)?;
                    let tx = self.with_reversals(tx)?;
                    for event in events(&tx, before) {
                        self.record_event(tx.business.as_str(), event)?;
                        recorded = true;
                    }
                }
                Ok((due_now(&next) || debits_due, recorded))
            }
            // A debit: as a credit, with the reversal's events.
            JOB_DEBIT => {
                let Some((before, Some(next))) = self.step_delivery(kind, id, step)? else {
                    return Ok((false, false));
                };
                let mut recorded = false;
                if let Some(OutcomeEvents::Reversal(events)) =
                    events.filter(|_| next.status != before)
                {
                    let found = self.reversal_of(id)?;
                    for event in events(&found, before) {
                        self.record_event(found.business.as_str(), event)?;
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

    /// Moves the delivery `(kind, id)` on with `step`: `None` if there is none, else its
    /// status before and the new state if `step` changed it.
    fn step_delivery(
        &mut self,
        kind: u8,
        id: u64,
        step: impl FnOnce(&Delivery, u64) -> Option<Delivery>,
    ) -> Result<Option<(DeliveryStatus, Option<Delivery>)>, StoreError> {
        let Some(current) = read_delivery(self.deliveries.open()?, kind, id)? else {
            return Ok(None);
        };
        let next = step(&current, self.now);
        if let Some(next) = &next {
            self.put_delivery(kind, id, Some(&current), next)?;
        }
        Ok(Some((current.status, next)))
    }

    fn transaction_of(&mut self, seq: u64) -> Result<Transaction, StoreError> {
        read_tx(self.ids, self.records.open()?, self.deliveries.open()?, seq)?.ok_or_else(|| {
            tracing::error!(seq, "a delivery names a missing transaction");
            StoreError::Corrupt
        })
    }

    fn with_reversals(&mut self, tx: Transaction) -> Result<Transaction, StoreError> {
        with_reversals(
            tx,
            self.ids,
            self.reversal_ids,
            self.reversals.open()?,
            self.reversals_by_tx.open()?,
            self.deliveries.open()?,
        )
    }

    /// Re-times the pending debits of transaction `tx_seq` after its credit changed to
    /// `credit`: due now once the credit is done (completed: send them; failed: settle
    /// them), else due with the credit's next attempt. Whether any became due now. A
    /// transaction without reversals costs one probe of `reversals_by_tx`.
    fn retime_debits(&mut self, tx_seq: u64, credit: &Delivery) -> Result<bool, StoreError> {
        let seqs = self
            .reversals_by_tx
            .open()?
            .range((tx_seq, 0)..=(tx_seq, u64::MAX))
            .map_err(unavailable)?
            .map(|entry| entry.map(|(key, _)| key.value().1))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(unavailable)?;
        let due = match (credit.status, credit.next_attempt_at) {
            (DeliveryStatus::Pending, Some(credit_due)) => credit_due.max(self.now),
            _ => self.now,
        };
        let mut due_now = false;
        for seq in seqs {
            let Some(debit) = read_delivery(self.deliveries.open()?, JOB_DEBIT, seq)? else {
                continue;
            };
            // Only debits still waiting for their credit: none has been attempted yet.
            if debit.status != DeliveryStatus::Pending || debit.attempts > 0 {
                continue;
            }
            due_now |= due <= self.now;
            if debit.next_attempt_at != Some(due) {
                let next = Delivery {
                    next_attempt_at: Some(due),
                    ..debit.clone()
                };
                self.put_delivery(JOB_DEBIT, seq, Some(&debit), &next)?;
            }
        }
        Ok(due_now)
    }

    /// Sends a `failed` credit again (see [`Delivery::redeliver`]), unless the transaction
    /// has reversals: they were settled against a credit that never arrived (see
    /// [`Tables::hold_debit`]), so sending it now would credit points already taken back.
    pub fn redeliver_credit(&mut self, seq: u64) -> Result<Redelivery, StoreError> {
        let Some(tx) = read_tx(self.ids, self.records.open()?, self.deliveries.open()?, seq)?
        else {
            return Ok(Redelivery::NotFailed(None));
        };
        if tx.reversed_value > 0 {
            return Ok(Redelivery::Reversed(Box::new(tx)));
        }
        match self.update_delivery(seq, |d, now| d.redeliver(now), |_, _| Vec::new())? {
            Some((tx, true)) => Ok(Redelivery::Redelivered(Box::new(tx))),
            Some((tx, false)) => Ok(Redelivery::NotFailed(Some(Box::new(tx)))),
            None => Ok(Redelivery::NotFailed(Some(Box::new(tx)))),
        }
    }

    /// Reverses (part of) transaction `r.transaction_seq`: a replay or a conflict if the
    /// reversal's referenceNumber exists (also when an earlier write of this batch made
    /// it); else the ledger's decision on what still remains, made here, where no other
    /// reversal can come between the read and the write.
    ///
    /// A debit for the partner is queued when there is one to send: the credit has a
    /// delivery that is not `failed`, and the reversal takes points. While the credit is
    /// pending the debit is due when the credit's next attempt is; it is sent only once
    /// the credit completed (see [`Tables::hold_debit`]).
    pub fn reverse(&mut self, r: &Reverse) -> Result<Reversed, StoreError> {
        let b = r.business.as_str();
        let request = &r.request;
        let existing = self
            .reversal_by_ref
            .open()?
            .get((b, request.reference_number.as_str()))
            .map_err(unavailable)?
            .map(|seq| seq.value());
        if let Some(seq) = existing {
            let found = read_reversal(
                self.ids,
                self.reversal_ids,
                self.reversals.open()?,
                self.deliveries.open()?,
                seq,
            )?
            .ok_or_else(|| {
                tracing::error!(seq, "the reversal reference index names a missing reversal");
                StoreError::Corrupt
            })?;
            return Ok(match found.differing_field(r.transaction_seq, request) {
                None => Reversed::Replayed(found),
                Some(field) => Reversed::Conflict(field),
            });
        }
        let Some(bytes) = self
            .records
            .open()?
            .get(r.transaction_seq)
            .map_err(unavailable)?
        else {
            tracing::error!(
                seq = r.transaction_seq,
                "a reversal names a missing transaction"
            );
            return Err(StoreError::Corrupt);
        };
        let mut record = decode::<TxRecord>(bytes.value())?.latest();
        drop(bytes);
        if record.business != b {
            tracing::error!(
                seq = r.transaction_seq,
                "a reversal names another business's transaction"
            );
            return Err(StoreError::Corrupt);
        }
        // The rest can always be reversed: that one is the last.
        if record.reversals >= MAX_REVERSALS && request.value.is_some() {
            return Ok(Reversed::Rejected(Rejection::TooManyReversals {
                max: MAX_REVERSALS,
            }));
        }
        let (value, points) = match plan_reversal(
            record.value,
            record.total_points,
            record.reversed_value,
            request.value,
        ) {
            Ok(plan) => plan,
            Err(rejection) => return Ok(Reversed::Rejected(rejection)),
        };
        let seq = match self.reversals.open()?.last().map_err(unavailable)? {
            Some((last, _)) => last.value() + 1,
            None => 0,
        };
        let now = self.now;
        let stored = ReversalV1 {
            business: b.to_owned(),
            reference_number: request.reference_number.to_string(),
            tx_seq: r.transaction_seq,
            value,
            points,
            full: request.value.is_none(),
            reason: request.reason.as_ref().map(|d| d.as_str().to_owned()),
            created_at: now,
        };
        self.reversals
            .open()?
            .insert(
                seq,
                encode(&mut self.scratch, &ReversalRecord::V1(stored.clone()))?,
            )
            .map_err(unavailable)?;
        self.reversal_by_ref
            .open()?
            .insert((b, request.reference_number.as_str()), seq)
            .map_err(unavailable)?;
        self.reversals_by_tx
            .open()?
            .insert((r.transaction_seq, seq), ())
            .map_err(unavailable)?;
        record.reversed_value += value;
        record.reversed_points += points;
        record.reversals += 1;
        self.records
            .open()?
            .insert(
                r.transaction_seq,
                encode(&mut self.scratch, &TxRecord::from(record))?,
            )
            .map_err(unavailable)?;
        let credit = read_delivery(self.deliveries.open()?, JOB_CREDIT, r.transaction_seq)?;
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
            self.put_delivery(JOB_DEBIT, seq, None, d)?;
        }
        Ok(Reversed::Created(reversal(
            self.ids,
            self.reversal_ids,
            seq,
            stored,
            debit,
        )))
    }

    /// Moves the debit of reversal `seq` on with `step`, as
    /// [`Tables::update_delivery`] does for a credit: `None` if the reversal has no debit,
    /// else the reversal as it now stands and whether it changed (and, if it did, the
    /// events `events` returns are recorded in this write).
    pub fn update_debit(
        &mut self,
        seq: u64,
        step: impl FnOnce(&Delivery, u64) -> Option<Delivery>,
        events: impl FnOnce(&Reversal, DeliveryStatus) -> Vec<NewEvent>,
    ) -> Result<Option<(Reversal, bool)>, StoreError> {
        let Some((before, next)) = self.step_delivery(JOB_DEBIT, seq, step)? else {
            return Ok(None);
        };
        let found = self.reversal_of(seq)?;
        if next.is_some() {
            for event in events(&found, before) {
                self.record_event(found.business.as_str(), event)?;
            }
        }
        Ok(Some((found, next.is_some())))
    }

    fn reversal_of(&mut self, seq: u64) -> Result<Reversal, StoreError> {
        read_reversal(
            self.ids,
            self.reversal_ids,
            self.reversals.open()?,
            self.deliveries.open()?,
            seq,
        )?
        .ok_or_else(|| {
            tracing::error!(seq, "a debit names a missing reversal");
            StoreError::Corrupt
        })
    }

    /// A due debit whose credit is not `completed`: while the credit is pending, the debit
    /// waits until the credit's next attempt (a completed or failed credit wakes it
    /// sooner); once the credit failed, the debit completes without a partner call, since
    /// the partner never had the points. Whether it moved the debit (a debit whose credit
    /// completed meanwhile stays due, to be read again and sent).
    ///
    /// A credit that is due already (in flight, or waiting for a free slot) will move
    /// soon, and its move re-times the debit ([`Tables::update_delivery`]): the debit waits
    /// `patience` seconds meanwhile, a fallback rather than a poll.
    pub fn hold_debit(
        &mut self,
        seq: u64,
        patience: u64,
        events: impl FnOnce(&Reversal, DeliveryStatus) -> Vec<NewEvent>,
    ) -> Result<bool, StoreError> {
        let Some(debit) = read_delivery(self.deliveries.open()?, JOB_DEBIT, seq)? else {
            return Ok(false);
        };
        if debit.status != DeliveryStatus::Pending {
            return Ok(false);
        }
        let tx_seq = self.reversal_of(seq)?.transaction_seq;
        let credit = read_delivery(self.deliveries.open()?, JOB_CREDIT, tx_seq)?;
        let Some(next) = debit.held_behind(credit.as_ref(), self.now, patience) else {
            return Ok(false);
        };
        Ok(self
            .update_debit(seq, move |_, _| Some(next), events)?
            .is_some_and(|(_, moved)| moved))
    }

    /// Moves the delivery of merchant webhook event `seq` on with `step`; `None` if there
    /// is no such event, else whether it changed.
    pub fn update_event(
        &mut self,
        seq: u64,
        step: impl FnOnce(&Delivery, u64) -> Option<Delivery>,
    ) -> Result<Option<bool>, StoreError> {
        Ok(self
            .step_delivery(JOB_EVENT, seq, step)?
            .map(|(_, next)| next.is_some()))
    }

    fn record_event(&mut self, business: &str, event: NewEvent) -> Result<(), StoreError> {
        let seq = match self.events.open()?.last().map_err(unavailable)? {
            Some((last, _)) => last.value() + 1,
            None => 0,
        };
        let record = EventRecord::V1(EventV1 {
            business: business.to_owned(),
            target: event.target,
            kind: event.kind.to_owned(),
            created_at: self.now,
            payload: event.payload,
        });
        self.events
            .open()?
            .insert(seq, encode(&mut self.scratch, &record)?)
            .map_err(unavailable)?;
        self.put_delivery(JOB_EVENT, seq, None, &Delivery::new(self.now))
    }

    /// Writes a delivery state and keeps the outbox in step: exactly one entry, at its due
    /// time, while it is pending.
    fn put_delivery(
        &mut self,
        kind: u8,
        id: u64,
        previous: Option<&Delivery>,
        next: &Delivery,
    ) -> Result<(), StoreError> {
        if let Some(due) = previous.and_then(|p| p.next_attempt_at) {
            self.outbox
                .open()?
                .remove((due, kind, id))
                .map_err(unavailable)?;
        }
        if let (DeliveryStatus::Pending, Some(due)) = (next.status, next.next_attempt_at) {
            self.outbox
                .open()?
                .insert((due, kind, id), ())
                .map_err(unavailable)?;
        }
        self.deliveries
            .open()?
            .insert(
                (kind, id),
                encode(&mut self.scratch, &delivery_record(next))?,
            )
            .map_err(unavailable)?;
        Ok(())
    }

    /// Creates the connection, or updates its destination and `updated_at`.
    pub fn connect(&mut self, c: &Connect) -> Result<Connected, StoreError> {
        let key = (
            c.business.as_str(),
            c.end_user_id.as_str(),
            c.program_id.as_str(),
        );
        let previous = match self.connections.open()?.get(key).map_err(unavailable)? {
            Some(bytes) => Some(decode::<ConnectionRecord>(bytes.value())?.latest()),
            None => None,
        };
        let record = ConnectionRecord::from(Conn {
            destination_user_id: c.destination_user_id.to_string(),
            created_at: previous.as_ref().map_or(self.now, |p| p.created_at),
            updated_at: self.now,
        });
        self.connections
            .open()?
            .insert(key, encode(&mut self.scratch, &record)?)
            .map_err(unavailable)?;
        Ok((
            connection(&c.end_user_id, &c.program_id, record.latest()),
            previous.is_none(),
        ))
    }
}
