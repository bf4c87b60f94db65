//! Reads: one read transaction per call (redb reads never wait for the writer; look-ups
//! by id and referenceNumber share the writer's published one, `handle::Snapshot`), stored
//! records turned into domain values, and the listing scan that feeds a [`Listing`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Bound::{Excluded, Included, Unbounded};
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::handle::Handle;
use super::schema::{
    Conn, DeliveryErrorV1, DeliveryRecord, DeliveryV1, EventRecord, ReversalRecord, ReversalV1, Tx,
    TxRecord, BY_PROGRAM_DATE, DELIVERIES, JOB_CREDIT, JOB_DEBIT, JOB_EVENT, REVERSALS,
    REVERSALS_BY_TX, TRANSACTIONS,
};
use super::{unavailable, Cursor, Listing, StoreError, TxQuery};
use crate::delivery::{Delivery, DeliveryError, DeliveryStatus, Event, FailureKind};
use crate::domain::{
    BusinessId, Description, DestinationUserId, EndUserId, ProgramId, ReferenceNumber, UserId,
};
use crate::ledger::{Connection, IdCipher, Reversal, ReversalId, Transaction};

/// Rows per batch a listing hands to its consumer: about 30 KiB of JSON, the chunk size
/// of release 0.1.0. Rows are held until their batch is mapped, so a larger batch keeps
/// thousands of small allocations alive at once (256 rows listed about 10% slower in a
/// same-run A/B, `benches/listing_ab.sh`); a smaller one pays more hand-offs between
/// threads.
const LISTING_BATCH: usize = 64;

/// A read transaction and what reads need beside it. The database handle is held for as
/// long as the transaction lives, so that a reopen after a storage failure waits for it.
pub(super) struct Reader<'h> {
    pub txn: redb::ReadTransaction,
    pub ids: &'h IdCipher,
    pub reversal_ids: &'h IdCipher,
    _db: Arc<redb::Database>,
}

impl<'h> Reader<'h> {
    pub fn begin(handle: &'h Handle) -> Result<Reader<'h>, StoreError> {
        let db = handle.db()?;
        let txn = db.begin_read().map_err(unavailable)?;
        Ok(Reader {
            txn,
            ids: &handle.ids,
            reversal_ids: &handle.reversal_ids,
            _db: db,
        })
    }

    pub fn table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        definition: redb::TableDefinition<K, V>,
    ) -> Result<redb::ReadOnlyTable<K, V>, StoreError> {
        open_table(&self.txn, definition)
    }
}

/// Opens a table of a read transaction (a store error if it cannot be).
pub(super) fn open_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    definition: redb::TableDefinition<K, V>,
) -> Result<redb::ReadOnlyTable<K, V>, StoreError> {
    txn.open_table(definition).map_err(unavailable)
}

pub(super) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| {
        tracing::error!(error = %e, "a stored record does not decode");
        StoreError::Corrupt
    })
}

/// The transaction `seq` with its delivery state.
pub(super) fn read_tx(
    ids: &IdCipher,
    records: &impl ReadableTable<u64, &'static [u8]>,
    deliveries: &impl ReadableTable<(u8, u64), &'static [u8]>,
    seq: u64,
) -> Result<Option<Transaction>, StoreError> {
    read_tx_within(ids, records, deliveries, Some((seq, seq)), seq)
}

/// [`read_tx`] where the snapshot's credit deliveries are known to lie in `delivered`
/// (first and last sequence number; `None`: there are none): a transaction outside it
/// has no delivery, and is read without a look-up in `deliveries`.
fn read_tx_within(
    ids: &IdCipher,
    records: &impl ReadableTable<u64, &'static [u8]>,
    deliveries: &impl ReadableTable<(u8, u64), &'static [u8]>,
    delivered: Option<(u64, u64)>,
    seq: u64,
) -> Result<Option<Transaction>, StoreError> {
    let Some(record) = read_record(records, seq)? else {
        return Ok(None);
    };
    let delivery = match delivered {
        Some((first, last)) if (first..=last).contains(&seq) => {
            read_delivery(deliveries, JOB_CREDIT, seq)?
        }
        _ => None,
    };
    Ok(Some(transaction(ids, record, delivery)))
}

/// The stored transaction `seq`, as the latest record version.
pub(super) fn read_record(
    records: &impl ReadableTable<u64, &'static [u8]>,
    seq: u64,
) -> Result<Option<Tx>, StoreError> {
    match records.get(seq).map_err(unavailable)? {
        Some(bytes) => Ok(Some(decode::<TxRecord>(bytes.value())?.latest())),
        None => Ok(None),
    }
}

/// `tx` with its reversals read in (a transaction without any has none to read).
pub(super) fn with_reversals(
    mut tx: Transaction,
    ids: &IdCipher,
    reversal_ids: &IdCipher,
    reversals: &impl ReadableTable<u64, &'static [u8]>,
    by_tx: &impl ReadableTable<(u64, u64), ()>,
    deliveries: &impl ReadableTable<(u8, u64), &'static [u8]>,
) -> Result<Transaction, StoreError> {
    if tx.reversed_value == 0 {
        return Ok(tx);
    }
    for entry in by_tx
        .range((tx.seq, 0)..=(tx.seq, u64::MAX))
        .map_err(unavailable)?
    {
        let (key, _) = entry.map_err(unavailable)?;
        let seq = key.value().1;
        let reversal =
            read_reversal(ids, reversal_ids, reversals, deliveries, seq)?.ok_or_else(|| {
                tracing::error!(seq, "the reversal index names a missing reversal");
                StoreError::Corrupt
            })?;
        tx.reversals.push(reversal);
    }
    Ok(tx)
}

/// The reversal `seq` with its debit's delivery state.
pub(super) fn read_reversal(
    ids: &IdCipher,
    reversal_ids: &IdCipher,
    reversals: &impl ReadableTable<u64, &'static [u8]>,
    deliveries: &impl ReadableTable<(u8, u64), &'static [u8]>,
    seq: u64,
) -> Result<Option<Reversal>, StoreError> {
    let Some(bytes) = reversals.get(seq).map_err(unavailable)? else {
        return Ok(None);
    };
    let record = decode::<ReversalRecord>(bytes.value())?.latest();
    let delivery = read_delivery(deliveries, JOB_DEBIT, seq)?;
    Ok(Some(reversal(ids, reversal_ids, seq, record, delivery)))
}

/// A stored reversal as the domain sees it.
pub(super) fn reversal(
    ids: &IdCipher,
    reversal_ids: &IdCipher,
    seq: u64,
    r: ReversalV1,
    delivery: Option<Delivery>,
) -> Reversal {
    Reversal {
        id: ReversalId(reversal_ids.encipher(seq)),
        seq,
        business: BusinessId::trusted(r.business),
        transaction_id: ids.encode(r.tx_seq),
        transaction_seq: r.tx_seq,
        reference_number: ReferenceNumber::trusted(r.reference_number),
        value: r.value,
        points: r.points,
        full: r.full,
        reason: r.reason.map(Description::trusted),
        created_at: r.created_at,
        delivery,
    }
}

/// The first and last sequence numbers that have a credit delivery in this snapshot;
/// `None` when none has (no program was ever delivered to a partner).
fn delivered_range(
    deliveries: &impl ReadableTable<(u8, u64), &'static [u8]>,
) -> Result<Option<(u64, u64)>, StoreError> {
    let mut credits = deliveries
        .range((JOB_CREDIT, 0)..=(JOB_CREDIT, u64::MAX))
        .map_err(unavailable)?;
    let first = match credits.next() {
        Some(entry) => entry.map_err(unavailable)?.0.value().1,
        None => return Ok(None),
    };
    let last = match credits.next_back() {
        Some(entry) => entry.map_err(unavailable)?.0.value().1,
        None => first,
    };
    Ok(Some((first, last)))
}

pub(super) fn read_delivery(
    deliveries: &impl ReadableTable<(u8, u64), &'static [u8]>,
    kind: u8,
    id: u64,
) -> Result<Option<Delivery>, StoreError> {
    match deliveries.get((kind, id)).map_err(unavailable)? {
        Some(bytes) => delivery(decode::<DeliveryRecord>(bytes.value())?.latest()).map(Some),
        None => Ok(None),
    }
}

/// The event `seq` with its delivery.
pub(super) fn read_event(
    ids: &IdCipher,
    events: &impl ReadableTable<u64, &'static [u8]>,
    deliveries: &impl ReadableTable<(u8, u64), &'static [u8]>,
    seq: u64,
) -> Result<Option<Event>, StoreError> {
    let Some(bytes) = events.get(seq).map_err(unavailable)? else {
        return Ok(None);
    };
    let r = decode::<EventRecord>(bytes.value())?.latest();
    let delivery = read_delivery(deliveries, JOB_EVENT, seq)?.ok_or_else(|| {
        tracing::error!(seq, "an event has no delivery state");
        StoreError::Corrupt
    })?;
    Ok(Some(Event {
        seq,
        id: format!("evt_{}", &ids.encode(seq).to_string()[3..]),
        business: BusinessId::trusted(r.business),
        target: r.target,
        kind: r.kind,
        created_at: r.created_at,
        payload: r.payload,
        delivery,
    }))
}

/// A stored delivery as the domain sees it.
pub(super) fn delivery(r: DeliveryV1) -> Result<Delivery, StoreError> {
    let corrupt = || {
        tracing::error!("a stored delivery has an unknown status or error kind");
        StoreError::Corrupt
    };
    let status = match r.status {
        0 => DeliveryStatus::Pending,
        1 => DeliveryStatus::Completed,
        2 => DeliveryStatus::Failed,
        _ => return Err(corrupt()),
    };
    let error = match r.error {
        Some(e) => Some(DeliveryError {
            kind: FailureKind::from_code(e.kind).ok_or_else(corrupt)?,
            http_status: e.http_status,
            detail: e.detail,
        }),
        None => None,
    };
    Ok(Delivery {
        status,
        attempts: r.attempts,
        step: r.step,
        last_attempt_at: r.last_attempt_at,
        next_attempt_at: r.next_attempt_at,
        partner_transaction_id: r.partner_transaction_id,
        error,
    })
}

/// A delivery as it is stored.
pub(super) fn delivery_record(d: &Delivery) -> DeliveryRecord {
    DeliveryRecord::V1(DeliveryV1 {
        status: match d.status {
            DeliveryStatus::Pending => 0,
            DeliveryStatus::Completed => 1,
            DeliveryStatus::Failed => 2,
        },
        attempts: d.attempts,
        step: d.step,
        last_attempt_at: d.last_attempt_at,
        next_attempt_at: d.next_attempt_at,
        partner_transaction_id: d.partner_transaction_id.clone(),
        error: d.error.as_ref().map(|e| DeliveryErrorV1 {
            kind: e.kind.code(),
            http_status: e.http_status,
            detail: e.detail.clone(),
        }),
    })
}

/// A stored transaction as the domain sees it. Its text was checked before it was
/// written.
pub(super) fn transaction(ids: &IdCipher, r: Tx, delivery: Option<Delivery>) -> Transaction {
    Transaction {
        id: ids.encode(r.seq),
        business: BusinessId::trusted(r.business),
        reference_number: ReferenceNumber::trusted(r.reference_number),
        program_id: ProgramId::trusted(r.program_id),
        program_name: r.program_name,
        user_id: UserId::trusted(r.user_id),
        end_user_id: r.end_user_id.map(EndUserId::trusted),
        description: r.description.map(Description::trusted),
        currency: r.currency,
        value: r.value,
        total_points: r.total_points,
        bonus: r.bonus,
        created_at: r.created_at,
        seq: r.seq,
        delivery,
        reversed_value: r.reversed_value,
        reversed_points: r.reversed_points,
        reversals: Vec::new(),
    }
}

pub(super) fn connection(end_user_id: &str, program_id: &str, r: Conn) -> Connection {
    Connection {
        end_user_id: EndUserId::trusted(end_user_id.to_owned()),
        program_id: ProgramId::trusted(program_id.to_owned()),
        destination_user_id: DestinationUserId::trusted(r.destination_user_id),
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// Runs the listing `q` in one read transaction (one snapshot), turning each batch of rows
/// into a `T` with `map` on this thread (so that rows are decoded, used and freed where
/// they were made) and sending it to `out`, until the range, the limit or the consumer
/// ends. Blocking: runs on its own thread. A consumer that drops its [`Listing`] stops the
/// scan at the next batch.
pub(super) fn scan<T>(
    handle: &Handle,
    q: &TxQuery,
    mut map: impl FnMut(&[Transaction]) -> T,
    out: &mpsc::Sender<Result<T, StoreError>>,
) -> Result<(), StoreError> {
    let reader = Reader::begin(handle)?;
    let records = reader.table(TRANSACTIONS)?;
    let deliveries = reader.table(DELIVERIES)?;
    let reversals = reader.table(REVERSALS)?;
    let by_tx = reader.table(REVERSALS_BY_TX)?;
    // Most rows of most listings have no delivery (their program has no partner, or had
    // none then): looked up only within the span of sequence numbers that have one.
    let delivered = delivered_range(&deliveries)?;
    let business = q.business.as_str();
    let limit = q.limit.unwrap_or(usize::MAX);
    let mut batch = Vec::with_capacity(LISTING_BATCH.min(limit));
    let mut sent = 0usize;
    // `false` once the consumer is gone or the limit is reached.
    let mut emit = |seq: u64, batch: &mut Vec<Transaction>| -> Result<bool, StoreError> {
        let tx = read_tx_within(reader.ids, &records, &deliveries, delivered, seq)?.ok_or_else(
            || {
                tracing::error!(seq, "an index entry names a missing transaction");
                StoreError::Corrupt
            },
        )?;
        if q.status.is_some_and(|status| tx.status() != status) {
            return Ok(true);
        }
        let tx = with_reversals(
            tx,
            reader.ids,
            reader.reversal_ids,
            &reversals,
            &by_tx,
            &deliveries,
        )?;
        batch.push(tx);
        sent += 1;
        if batch.len() == LISTING_BATCH || sent == limit {
            let mapped = map(batch);
            batch.clear();
            if out.blocking_send(Ok(mapped)).is_err() {
                return Ok(false);
            }
        }
        Ok(sent < limit)
    };
    let after = q.after.filter(|c: &Cursor| c.created_at >= q.start);
    let index = reader.table(BY_PROGRAM_DATE)?;
    let programs = match &q.program {
        Some(program) => vec![program.as_str().to_owned()],
        None => programs_of(&index, business)?,
    };
    // One range per program, each in (createdAt, seq) order; merged by that order, which
    // is the order of the whole listing. A heap entry is a range's next row.
    let mut ranges = Vec::with_capacity(programs.len());
    for program in &programs {
        let program = program.as_str();
        let lower = match after {
            Some(c) => Excluded((business, program, c.created_at, c.seq)),
            None => Included((business, program, q.start, 0)),
        };
        let upper = Included((business, program, q.end, u64::MAX));
        ranges.push(index.range((lower, upper)).map_err(unavailable)?);
    }
    let mut next = BinaryHeap::with_capacity(ranges.len());
    for (i, range) in ranges.iter_mut().enumerate() {
        if let Some(row) = next_row(range)? {
            next.push(Reverse((row, i)));
        }
    }
    while let Some(Reverse(((_, seq), i))) = next.pop() {
        if !emit(seq, &mut batch)? {
            return Ok(());
        }
        if let Some(row) = next_row(&mut ranges[i])? {
            next.push(Reverse((row, i)));
        }
    }
    if !batch.is_empty() {
        let _ = out.blocking_send(Ok(map(&batch)));
    }
    Ok(())
}

type ProgramDateIndex = redb::ReadOnlyTable<(&'static str, &'static str, u64, u64), u64>;
type ProgramDateRange = redb::Range<'static, (&'static str, &'static str, u64, u64), u64>;

/// The programs that `business` has transactions in, from the program-date index: the
/// first key of the business, then the first key after each program's last, one look-up
/// per program.
fn programs_of(index: &ProgramDateIndex, business: &str) -> Result<Vec<String>, StoreError> {
    let mut programs: Vec<String> = Vec::new();
    loop {
        let lower = match programs.last() {
            // After every key of the last program found (createdAt and seq at their
            // largest: no row has them).
            Some(last) => Excluded((business, last.as_str(), u64::MAX, u64::MAX)),
            None => Included((business, "", 0, 0)),
        };
        let first = index
            .range((lower, Unbounded))
            .map_err(unavailable)?
            .next()
            .transpose()
            .map_err(unavailable)?;
        match first {
            Some((key, _)) => {
                let (b, program, _, _) = key.value();
                if b != business {
                    return Ok(programs);
                }
                programs.push(program.to_owned());
            }
            None => return Ok(programs),
        }
    }
}

/// A range's next row: its (createdAt, seq), the order listings are in.
fn next_row(range: &mut ProgramDateRange) -> Result<Option<(u64, u64)>, StoreError> {
    match range.next() {
        Some(entry) => {
            let (key, _) = entry.map_err(unavailable)?;
            let (_, _, created_at, seq) = key.value();
            Ok(Some((created_at, seq)))
        }
        None => Ok(None),
    }
}

impl<T> Listing<T> {
    /// The next batch of rows (as the listing's `map` made it), oldest first; `None` at the
    /// end. An `Err` ends the listing: what came before it is not the whole range.
    pub async fn next(&mut self) -> Option<Result<T, StoreError>> {
        self.rx.recv().await
    }
}
