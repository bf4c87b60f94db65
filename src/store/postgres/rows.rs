//! Rows ↔ domain values: the column lists every read selects, and the checked
//! conversions between `u64` and PostgreSQL's `bigint` (an error, never a wrap).

use tokio_postgres::Row;

use super::super::StoreError;
use crate::delivery::{Delivery, DeliveryError, DeliveryStatus, Event, FailureKind};
use crate::domain::{BusinessId, Description, EndUserId, ProgramId, ReferenceNumber, UserId};
use crate::ledger::{IdCipher, Reversal, ReversalId, Transaction};

/// Job kinds in `deliveries.kind`: the same numbers as the redb file's.
pub(crate) const JOB_CREDIT: i16 = 0;
pub(crate) const JOB_DEBIT: i16 = 1;
pub(crate) const JOB_EVENT: i16 = 2;

/// `deliveries.status`.
pub(crate) const PENDING: i16 = 0;
const COMPLETED: i16 = 1;
const FAILED: i16 = 2;

/// The delivery columns of a row, from `d`.
const DELIVERY_COLUMNS: &str = "d.status, d.attempts, d.step, d.last_attempt_at, \
     d.next_attempt_at, d.partner_transaction_id, d.error_kind, d.error_http_status, \
     d.error_detail";

/// A transaction and its credit's delivery: `SELECT {TX_COLUMNS} FROM {TX_FROM} …`.
pub(crate) fn tx_columns() -> String {
    format!(
        "t.seq, t.business, t.reference_number, t.program_id, t.program_name, t.user_id, \
         t.description, t.currency, t.value, t.total_points, t.bonus, t.created_at, \
         t.end_user_id, t.reversed_value, t.reversed_points, t.reversals, {DELIVERY_COLUMNS}"
    )
}
pub(crate) const TX_FROM: &str =
    "transactions t LEFT JOIN deliveries d ON d.kind = 0 AND d.id = t.seq";

/// A reversal and its debit's delivery.
pub(crate) fn reversal_columns() -> String {
    format!(
        "r.seq, r.business, r.reference_number, r.tx_seq, r.value, r.points, r.is_full, \
         r.reason, r.created_at, {DELIVERY_COLUMNS}"
    )
}
pub(crate) const REVERSAL_FROM: &str =
    "reversals r LEFT JOIN deliveries d ON d.kind = 1 AND d.id = r.seq";

/// An event and its delivery.
pub(crate) fn event_columns() -> String {
    format!("e.seq, e.business, e.target, e.kind, e.created_at, e.payload, {DELIVERY_COLUMNS}")
}
pub(crate) const EVENT_FROM: &str = "events e JOIN deliveries d ON d.kind = 2 AND d.id = e.seq";

/// A delivery alone.
/// How many columns [`delivery_columns`] names.
pub(crate) const DELIVERY_COLUMN_COUNT: usize = 9;

pub(crate) fn delivery_columns() -> &'static str {
    DELIVERY_COLUMNS
}

/// The keys that turn sequence numbers into client-facing ids (the same scheme and the
/// same derivations as the redb file's).
pub(crate) struct Ciphers {
    pub ids: IdCipher,
    pub event_ids: IdCipher,
    pub reversal_ids: IdCipher,
}

impl Ciphers {
    pub fn new(id_key: &[u8]) -> Ciphers {
        Ciphers {
            ids: IdCipher::new(id_key),
            event_ids: IdCipher::new(&[id_key, b"/events"].concat()),
            reversal_ids: IdCipher::new(&[id_key, b"/reversals"].concat()),
        }
    }
}

fn corrupt(what: &str) -> StoreError {
    tracing::error!("a stored row does not read: {what}");
    StoreError::Corrupt
}

/// `v` as a `bigint`; a value beyond it is refused (it cannot be stored), never wrapped.
pub(crate) fn big(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| {
        tracing::error!(value = v, "a number beyond PostgreSQL's bigint");
        StoreError::Corrupt
    })
}

pub(crate) fn big_opt(v: Option<u64>) -> Result<Option<i64>, StoreError> {
    v.map(big).transpose()
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, StoreError> {
    row.try_get::<_, T>(i).map_err(|e| corrupt(&e.to_string()))
}

pub(crate) fn get_u64(row: &Row, i: usize) -> Result<u64, StoreError> {
    let v: i64 = get(row, i)?;
    u64::try_from(v).map_err(|_| corrupt("a negative number"))
}

fn get_opt_u64(row: &Row, i: usize) -> Result<Option<u64>, StoreError> {
    let v: Option<i64> = get(row, i)?;
    v.map(|v| u64::try_from(v).map_err(|_| corrupt("a negative number")))
        .transpose()
}

fn get_u32(row: &Row, i: usize) -> Result<u32, StoreError> {
    let v: i64 = get(row, i)?;
    u32::try_from(v).map_err(|_| corrupt("a count out of range"))
}

/// The delivery whose columns start at `at` (all NULL: none).
pub(crate) fn delivery_at(row: &Row, at: usize) -> Result<Option<Delivery>, StoreError> {
    let Some(status) = get::<Option<i16>>(row, at)? else {
        return Ok(None);
    };
    let status = match status {
        PENDING => DeliveryStatus::Pending,
        COMPLETED => DeliveryStatus::Completed,
        FAILED => DeliveryStatus::Failed,
        _ => return Err(corrupt("an unknown delivery status")),
    };
    let error = match get::<Option<i16>>(row, at + 6)? {
        None => None,
        Some(kind) => Some(DeliveryError {
            kind: u8::try_from(kind)
                .ok()
                .and_then(FailureKind::from_code)
                .ok_or_else(|| corrupt("an unknown failure kind"))?,
            http_status: get::<Option<i32>>(row, at + 7)?
                .map(|s| u16::try_from(s).map_err(|_| corrupt("an HTTP status out of range")))
                .transpose()?,
            detail: get::<Option<String>>(row, at + 8)?.unwrap_or_default(),
        }),
    };
    Ok(Some(Delivery {
        status,
        attempts: get_u32(row, at + 1)?,
        step: get_u32(row, at + 2)?,
        last_attempt_at: get_opt_u64(row, at + 3)?,
        next_attempt_at: get_opt_u64(row, at + 4)?,
        partner_transaction_id: get(row, at + 5)?,
        error,
    }))
}

pub(crate) fn status_code(status: DeliveryStatus) -> i16 {
    match status {
        DeliveryStatus::Pending => PENDING,
        DeliveryStatus::Completed => COMPLETED,
        DeliveryStatus::Failed => FAILED,
    }
}

/// A row of [`tx_columns`].
pub(crate) fn transaction(ids: &IdCipher, row: &Row) -> Result<Transaction, StoreError> {
    let seq = get_u64(row, 0)?;
    let reversals: i32 = get(row, 15)?;
    let _ = u32::try_from(reversals).map_err(|_| corrupt("a negative reversal count"))?;
    Ok(Transaction {
        id: ids.encode(seq),
        business: BusinessId::trusted(get(row, 1)?),
        reference_number: ReferenceNumber::trusted(get(row, 2)?),
        program_id: ProgramId::trusted(get(row, 3)?),
        program_name: get(row, 4)?,
        user_id: UserId::trusted(get(row, 5)?),
        description: get::<Option<String>>(row, 6)?.map(Description::trusted),
        currency: get(row, 7)?,
        value: get_u64(row, 8)?,
        total_points: get_u64(row, 9)?,
        bonus: get(row, 10)?,
        created_at: get_u64(row, 11)?,
        end_user_id: get::<Option<String>>(row, 12)?.map(EndUserId::trusted),
        seq,
        reversed_value: get_u64(row, 13)?,
        reversed_points: get_u64(row, 14)?,
        delivery: delivery_at(row, 16)?,
        reversals: Vec::new(),
    })
}

/// A row of [`reversal_columns`].
pub(crate) fn reversal(ciphers: &Ciphers, row: &Row) -> Result<Reversal, StoreError> {
    let seq = get_u64(row, 0)?;
    let tx_seq = get_u64(row, 3)?;
    Ok(Reversal {
        id: ReversalId(ciphers.reversal_ids.encipher(seq)),
        seq,
        business: BusinessId::trusted(get(row, 1)?),
        transaction_id: ciphers.ids.encode(tx_seq),
        transaction_seq: tx_seq,
        reference_number: ReferenceNumber::trusted(get(row, 2)?),
        value: get_u64(row, 4)?,
        points: get_u64(row, 5)?,
        full: get(row, 6)?,
        reason: get::<Option<String>>(row, 7)?.map(Description::trusted),
        created_at: get_u64(row, 8)?,
        delivery: delivery_at(row, 9)?,
    })
}

/// A row of [`event_columns`].
pub(crate) fn event(ids: &IdCipher, row: &Row) -> Result<Event, StoreError> {
    let seq = get_u64(row, 0)?;
    Ok(Event {
        seq,
        id: format!("evt_{}", &ids.encode(seq).to_string()[3..]),
        business: BusinessId::trusted(get(row, 1)?),
        target: get(row, 2)?,
        kind: get(row, 3)?,
        created_at: get_u64(row, 4)?,
        payload: get(row, 5)?,
        delivery: delivery_at(row, 6)?.ok_or_else(|| corrupt("an event without a delivery"))?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_delivery_column_count_is_the_columns_named() {
        assert_eq!(
            super::DELIVERY_COLUMNS.split(',').count(),
            super::DELIVERY_COLUMN_COUNT
        );
    }
}
