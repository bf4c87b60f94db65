//! The on-disk layout: table definitions, the versioned records, and the migrations that
//! bring a file written by an earlier release up to this one.
//!
//! # Versioning
//!
//! postcard is not self-describing: it cannot skip or default a field that old bytes lack.
//! So every stored value is a versioned enum (`TxRecord::V1(TxV1)`, …), whose variant
//! index is the first byte(s) of the value. A new field means a new struct and a new
//! variant at the END of the enum (old variants never change), a `From` from the previous
//! version with the documented default, and the writer writing the newest variant. Old
//! bytes keep decoding; reads turn any variant into the newest one. No rewrite is needed.
//!
//! [`SCHEMA_VERSION`] counts layout changes that old code cannot read (a table's key type,
//! a table's meaning, a value that was not yet versioned). Opening an older file runs the
//! [`MIGRATIONS`] after its version in one write transaction; a newer file is refused.
//!
//! | schema | release | change |
//! |---|---|---|
//! | 1 | 0.1.0 | first layout; values are bare postcard structs |
//! | 2 | 0.2.0 | every value wrapped in its versioned enum (one byte in front); new tables `deliveries`, `outbox`, `events` |
//! | 3 | 0.3.0 | `TxRecord::V3` (reversal totals), which 0.2.0 cannot read; new tables `reversals`, `reversal_by_reference`, `reversals_by_tx` (nothing is rewritten) |
//! | 4 | 0.4.0 | table `tx_by_date` dropped: a listing of every program merges the business's ranges of `tx_by_program_date` (0.3.0 refuses such a file: its schema is newer) |
//!
//! Record versions: `TxRecord::V1` (0.1.0), `TxRecord::V2` (0.2.0: `end_user_id`),
//! `TxRecord::V3` (0.3.0: `reversed_value`, `reversed_points`, `reversals`);
//! `ConnectionRecord::V1`; `DeliveryRecord::V1`; `EventRecord::V1`; `ReversalRecord::V1`.

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

/// The on-disk layout this build reads and writes.
pub const SCHEMA_VERSION: u64 = 4;

pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(super) const TRANSACTIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("transactions");
pub(super) const BY_REFERENCE: TableDefinition<(&str, &str), u64> =
    TableDefinition::new("tx_by_reference");
/// Schema 3 and before: (business, createdAt, seq) → seq, every transaction a second time
/// beside `tx_by_program_date`. Dropped by schema 4.
const BY_DATE_UNTIL_4: TableDefinition<(&str, u64, u64), u64> = TableDefinition::new("tx_by_date");
pub(super) const BY_PROGRAM_DATE: TableDefinition<(&str, &str, u64, u64), u64> =
    TableDefinition::new("tx_by_program_date");
pub(super) const CONNECTIONS: TableDefinition<(&str, &str, &str), &[u8]> =
    TableDefinition::new("connections");
/// The delivery state of each outbound job, by (job kind, id): for credits the id is the
/// transaction's seq. A transaction without an entry was never to be delivered:
/// `completed`.
pub(super) const DELIVERIES: TableDefinition<(u8, u64), &[u8]> = TableDefinition::new("deliveries");
/// The outbox: one entry per pending delivery, keyed by (due time, job kind, id), so that
/// the due jobs are one range scan from the start.
pub(super) const OUTBOX: TableDefinition<(u64, u8, u64), ()> = TableDefinition::new("outbox");

/// Merchant webhook events, by event seq (the last key + 1 is the next one: events are
/// never deleted).
pub(super) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

/// Reversals, by reversal seq (the last key + 1 is the next one: reversals are never
/// deleted).
pub(super) const REVERSALS: TableDefinition<u64, &[u8]> = TableDefinition::new("reversals");
/// (business, the reversal's referenceNumber) → reversal seq.
pub(super) const REVERSAL_BY_REFERENCE: TableDefinition<(&str, &str), u64> =
    TableDefinition::new("reversal_by_reference");
/// (transaction seq, reversal seq) → (): a transaction's reversals in creation order.
pub(super) const REVERSALS_BY_TX: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("reversals_by_tx");

/// Job kinds in [`OUTBOX`] and [`DELIVERIES`] keys: a credit; the id is the transaction seq.
pub(super) const JOB_CREDIT: u8 = 0;
/// A debit (a reversal at the partner); the id is the reversal seq.
pub(super) const JOB_DEBIT: u8 = 1;
/// A merchant webhook event; the id is the event seq.
pub(super) const JOB_EVENT: u8 = 2;

/// A transaction as release 0.1.0 stored it. Field order is the format: never change it.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub(super) struct TxV1 {
    pub business: String,
    pub reference_number: String,
    pub program_id: String,
    pub program_name: String,
    pub user_id: String,
    pub description: Option<String>,
    pub currency: String,
    pub value: u64,
    pub total_points: u64,
    pub bonus: bool,
    pub created_at: u64,
    pub seq: u64,
}

/// A transaction as release 0.2.0 stores it: V1 and the merchant's own user id, when the
/// points were issued by `endUserId` through a program connection.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub(super) struct TxV2 {
    pub business: String,
    pub reference_number: String,
    pub program_id: String,
    pub program_name: String,
    pub user_id: String,
    pub description: Option<String>,
    pub currency: String,
    pub value: u64,
    pub total_points: u64,
    pub bonus: bool,
    pub created_at: u64,
    pub seq: u64,
    /// `None` for every V1 record: they were issued to a member id.
    pub end_user_id: Option<String>,
}

impl From<TxV1> for TxV2 {
    fn from(r: TxV1) -> TxV2 {
        TxV2 {
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
            end_user_id: None,
        }
    }
}

/// A transaction as release 0.3.0 stores it: V2 and the totals of its reversals (kept on
/// the record so that reading a transaction without reversals costs no extra lookup,
/// and so that the writer decides a new reversal from one read).
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub(super) struct TxV3 {
    pub business: String,
    pub reference_number: String,
    pub program_id: String,
    pub program_name: String,
    pub user_id: String,
    pub description: Option<String>,
    pub currency: String,
    pub value: u64,
    pub total_points: u64,
    pub bonus: bool,
    pub created_at: u64,
    pub seq: u64,
    pub end_user_id: Option<String>,
    /// 0 for every V1 and V2 record: nothing could be reversed before 0.3.0.
    pub reversed_value: u64,
    pub reversed_points: u64,
    /// How many reversals it has (entries in `reversals_by_tx`).
    pub reversals: u32,
}

impl From<TxV2> for TxV3 {
    fn from(r: TxV2) -> TxV3 {
        TxV3 {
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
            end_user_id: r.end_user_id,
            reversed_value: 0,
            reversed_points: 0,
            reversals: 0,
        }
    }
}

/// Every stored transaction. Append variants only.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub(super) enum TxRecord {
    V1(TxV1),
    V2(TxV2),
    V3(TxV3),
}

/// The newest transaction record version: what reads work with and the writer writes.
pub(super) type Tx = TxV3;

impl TxRecord {
    pub fn latest(self) -> Tx {
        match self {
            TxRecord::V1(r) => TxV2::from(r).into(),
            TxRecord::V2(r) => r.into(),
            TxRecord::V3(r) => r,
        }
    }
}

impl From<Tx> for TxRecord {
    fn from(r: Tx) -> TxRecord {
        TxRecord::V3(r)
    }
}

/// A program connection as release 0.1.0 stored it (the key holds business, end user
/// and program).
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub(super) struct ConnectionV1 {
    pub destination_user_id: String,
    pub created_at: u64,
    pub updated_at: u64,
}

/// Every stored program connection. Append variants only.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub(super) enum ConnectionRecord {
    V1(ConnectionV1),
}

/// The newest connection record version.
pub(super) type Conn = ConnectionV1;

impl ConnectionRecord {
    pub fn latest(self) -> Conn {
        match self {
            ConnectionRecord::V1(r) => r,
        }
    }
}

impl From<Conn> for ConnectionRecord {
    fn from(r: Conn) -> ConnectionRecord {
        ConnectionRecord::V1(r)
    }
}

/// A delivery's state (see `crate::delivery`), first stored by schema 2.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub(super) struct DeliveryV1 {
    /// 0 pending, 1 completed, 2 failed.
    pub status: u8,
    pub attempts: u32,
    pub step: u32,
    pub last_attempt_at: Option<u64>,
    pub next_attempt_at: Option<u64>,
    pub partner_transaction_id: Option<String>,
    pub error: Option<DeliveryErrorV1>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub(super) struct DeliveryErrorV1 {
    /// `FailureKind::code`.
    pub kind: u8,
    pub http_status: Option<u16>,
    pub detail: String,
}

/// Every stored delivery. Append variants only.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub(super) enum DeliveryRecord {
    V1(DeliveryV1),
}

impl DeliveryRecord {
    pub fn latest(self) -> DeliveryV1 {
        match self {
            DeliveryRecord::V1(r) => r,
        }
    }
}

/// A merchant webhook event as stored: where it goes and what it says, rendered when it
/// was made (so a later change of the transaction does not change what the event said).
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub(super) struct EventV1 {
    pub business: String,
    /// The webhook's URL: the business's configured webhook it goes to.
    pub target: String,
    /// `transaction.completed`, `transaction.failed`, …
    pub kind: String,
    pub created_at: u64,
    /// The JSON body sent.
    pub payload: Vec<u8>,
}

/// Every stored event. Append variants only.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub(super) enum EventRecord {
    V1(EventV1),
}

impl EventRecord {
    pub fn latest(self) -> EventV1 {
        match self {
            EventRecord::V1(r) => r,
        }
    }
}

/// A reversal, first stored by schema 3.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub(super) struct ReversalV1 {
    pub business: String,
    pub reference_number: String,
    /// The seq of the transaction it reverses.
    pub tx_seq: u64,
    pub value: u64,
    pub points: u64,
    /// The request named no value: "all that remains".
    pub full: bool,
    pub reason: Option<String>,
    pub created_at: u64,
}

/// Every stored reversal. Append variants only.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub(super) enum ReversalRecord {
    V1(ReversalV1),
}

impl ReversalRecord {
    pub fn latest(self) -> ReversalV1 {
        match self {
            ReversalRecord::V1(r) => r,
        }
    }
}

/// Decodes a transaction value written under `schema` (older files are read as they are,
/// by `check`, before they are migrated).
pub(super) fn decode_tx(schema: u64, bytes: &[u8]) -> postcard::Result<Tx> {
    if schema < 2 {
        postcard::from_bytes::<TxV1>(bytes).map(|r| TxV2::from(r).into())
    } else {
        postcard::from_bytes::<TxRecord>(bytes).map(TxRecord::latest)
    }
}

/// Decodes a connection value written under `schema`.
pub(super) fn decode_connection(schema: u64, bytes: &[u8]) -> postcard::Result<Conn> {
    if schema < 2 {
        postcard::from_bytes::<ConnectionV1>(bytes)
    } else {
        postcard::from_bytes::<ConnectionRecord>(bytes).map(ConnectionRecord::latest)
    }
}

/// One step of the layout: run inside the write transaction that also records the new
/// version, so that a file is either wholly migrated or not at all.
pub(super) type Migration = fn(&WriteTransaction) -> Result<(), redb::Error>;

/// `(version it produces, step)`, in order.
pub(super) const MIGRATIONS: &[(u64, Migration)] = &[
    (2, wrap_values_in_versioned_enums),
    (3, add_reversal_tables),
    (4, drop_date_index),
];

/// Schema 3 → 4: the date index goes (every entry of it is also in the program-date
/// index, which listings of every program now merge per program). Nothing else changes.
fn drop_date_index(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.delete_table(BY_DATE_UNTIL_4)?;
    Ok(())
}

/// Schema 2 → 3: the reversal tables (made empty, as on every open). Existing records stay
/// as they are: V1 and V2 transactions read with no reversals.
fn add_reversal_tables(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(REVERSALS)?;
    txn.open_table(REVERSAL_BY_REFERENCE)?;
    txn.open_table(REVERSALS_BY_TX)?;
    Ok(())
}

/// Rows rewritten per range read while migrating (bounds the memory a migration takes).
const MIGRATION_CHUNK: usize = 4096;

/// Schema 1 → 2: every transaction and connection value gains its enum tag. postcard
/// writes variant 0 as one zero byte followed by the variant's fields, which are exactly
/// the schema-1 bytes; so each value is its old bytes with a 0 in front.
fn wrap_values_in_versioned_enums(txn: &WriteTransaction) -> Result<(), redb::Error> {
    let tagged = |old: &[u8]| {
        let mut bytes = Vec::with_capacity(old.len() + 1);
        bytes.push(0u8);
        bytes.extend_from_slice(old);
        bytes
    };
    let mut records = txn.open_table(TRANSACTIONS)?;
    let mut from = Some(0u64);
    while let Some(start) = from {
        let chunk = records
            .range(start..)?
            .take(MIGRATION_CHUNK)
            .map(|e| e.map(|(k, v)| (k.value(), tagged(v.value()))))
            .collect::<Result<Vec<_>, _>>()?;
        from = match chunk.last() {
            Some((last, _)) if chunk.len() == MIGRATION_CHUNK => last.checked_add(1),
            _ => None,
        };
        for (seq, bytes) in chunk {
            records.insert(seq, bytes.as_slice())?;
        }
    }
    let mut connections = txn.open_table(CONNECTIONS)?;
    let mut after: Option<(String, String, String)> = None;
    loop {
        let range = match &after {
            None => connections.range::<(&str, &str, &str)>(..)?,
            Some((b, u, p)) => {
                use std::ops::Bound::{Excluded, Unbounded};
                connections.range::<(&str, &str, &str)>((
                    Excluded((b.as_str(), u.as_str(), p.as_str())),
                    Unbounded,
                ))?
            }
        };
        let chunk = range
            .take(MIGRATION_CHUNK)
            .map(|e| {
                e.map(|(k, v)| {
                    let (b, u, p) = k.value();
                    (
                        (b.to_owned(), u.to_owned(), p.to_owned()),
                        tagged(v.value()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let full = chunk.len() == MIGRATION_CHUNK;
        for ((b, u, p), bytes) in &chunk {
            connections.insert((b.as_str(), u.as_str(), p.as_str()), bytes.as_slice())?;
        }
        match chunk.into_iter().last() {
            Some((key, _)) if full => after = Some(key),
            _ => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx_v1() -> TxV1 {
        TxV1 {
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
        }
    }

    /// The schema-1 bytes of [`tx_v1`]: what release 0.1.0 wrote.
    const TX_V1_BYTES: &[u8] = &[
        4, b'a', b'c', b'm', b'e', 5, b'i', b'n', b'v', b'-', b'1', 3, b's', b'k', b'y', 3, b'S',
        b'k', b'y', 2, b'u', b'1', 1, 1, b'd', 3, b'A', b'E', b'D', 0xd9, 0x1c, 0xc1, 0x06, 1,
        0xa4, 0xb0, 0xa5, 0xd8, 0x06, 7,
    ];

    #[test]
    fn the_stored_record_formats_are_pinned() {
        // Schema 1's bare struct, still readable.
        assert_eq!(
            postcard::to_allocvec(&tx_v1()).expect("encodes"),
            TX_V1_BYTES
        );
        assert_eq!(decode_tx(1, TX_V1_BYTES).expect("decodes"), today(tx_v1()));
        // Schema 2: the same bytes behind the variant tag.
        let bytes = postcard::to_allocvec(&TxRecord::V1(tx_v1())).expect("encodes");
        assert_eq!(
            bytes[0], 0,
            "a change here needs a new variant, not an edit"
        );
        assert_eq!(&bytes[1..], TX_V1_BYTES);
        assert_eq!(decode_tx(2, &bytes).expect("decodes"), today(tx_v1()));
        // V2: tag 1, V1's fields, then the end user id.
        let mut v2 = TxV2::from(tx_v1());
        v2.end_user_id = Some("eu".into());
        let bytes = postcard::to_allocvec(&TxRecord::V2(v2.clone())).expect("encodes");
        assert_eq!(
            bytes[0], 1,
            "a change here needs a new variant, not an edit"
        );
        assert_eq!(&bytes[1..bytes.len() - 4], TX_V1_BYTES);
        assert_eq!(&bytes[bytes.len() - 4..], [1, 2, b'e', b'u']);
        assert_eq!(decode_tx(2, &bytes).expect("decodes"), v2.clone().into());
        // V3: tag 2, V2's fields, then the reversal totals.
        let mut v3 = TxV3::from(v2);
        (v3.reversed_value, v3.reversed_points, v3.reversals) = (1000, 226, 2);
        let bytes = postcard::to_allocvec(&TxRecord::from(v3.clone())).expect("encodes");
        assert_eq!(
            bytes[0], 2,
            "a change here needs a new variant, not an edit"
        );
        assert_eq!(&bytes[1..bytes.len() - 9], TX_V1_BYTES);
        assert_eq!(
            &bytes[bytes.len() - 9..],
            [1, 2, b'e', b'u', 0xe8, 0x07, 0xe2, 0x01, 2]
        );
        assert_eq!(decode_tx(3, &bytes).expect("decodes"), v3);
        let reversal = ReversalV1 {
            business: "acme".into(),
            reference_number: "ref-1".into(),
            tx_seq: 7,
            value: 500,
            points: 113,
            full: false,
            reason: None,
            created_at: 9,
        };
        let bytes = postcard::to_allocvec(&ReversalRecord::V1(reversal)).expect("encodes");
        assert_eq!(
            bytes,
            [
                0, 4, b'a', b'c', b'm', b'e', 5, b'r', b'e', b'f', b'-', b'1', 7, 0xf4, 0x03, 113,
                0, 0, 9
            ]
        );

        let connection = ConnectionV1 {
            destination_user_id: "EK1".into(),
            created_at: 1,
            updated_at: 2,
        };
        let bytes =
            postcard::to_allocvec(&ConnectionRecord::from(connection.clone())).expect("encodes");
        assert_eq!(bytes, [0, 3, b'E', b'K', b'1', 1, 2]);
        assert_eq!(decode_connection(2, &bytes).expect("decodes"), connection);
        assert_eq!(
            decode_connection(1, &bytes[1..]).expect("decodes"),
            connection
        );
    }

    /// What a later release will do to add a field: a new struct, a new variant at the end,
    /// a default for records written before it (as V2 did for `end_user_id` and V3 for
    /// the reversal totals).
    #[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
    struct TxNext {
        v3: TxV3,
        status: Option<String>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
    enum TxRecordNext {
        V1(TxV1),
        V2(TxV2),
        V3(TxV3),
        V4(TxNext),
    }

    impl TxRecordNext {
        fn latest(self) -> TxNext {
            let v3 = match self {
                TxRecordNext::V1(v1) => TxV2::from(v1).into(),
                TxRecordNext::V2(v2) => v2.into(),
                TxRecordNext::V3(v3) => v3,
                TxRecordNext::V4(r) => return r,
            };
            TxNext { v3, status: None }
        }
    }

    fn today(r: TxV1) -> TxV3 {
        TxV2::from(r).into()
    }

    #[test]
    fn a_record_written_before_a_field_was_added_decodes_with_its_default() {
        // A V1 record (as a 0.1.0 file holds after its migration) reads as today's V3,
        // and so does a V2 record of 0.2.0.
        let v1 = postcard::to_allocvec(&TxRecord::V1(tx_v1())).expect("encodes");
        let v2 = postcard::to_allocvec(&TxRecord::V2(tx_v1().into())).expect("encodes");
        for bytes in [&v1, &v2] {
            assert_eq!(
                decode_tx(SCHEMA_VERSION, bytes).expect("decodes"),
                today(tx_v1())
            );
        }
        // Today's records read in a later release that added a field.
        let written_today =
            postcard::to_allocvec(&TxRecord::from(today(tx_v1()))).expect("encodes");
        for bytes in [&v1, &v2, &written_today] {
            let read_later: TxRecordNext = postcard::from_bytes(bytes).expect("decodes");
            assert_eq!(
                read_later.latest(),
                TxNext {
                    v3: today(tx_v1()),
                    status: None
                }
            );
        }
        // A record of the later version is refused by today's code, not misread (the
        // schema version keeps such a file from being opened at all).
        let written_later = postcard::to_allocvec(&TxRecordNext::V4(TxNext {
            v3: today(tx_v1()),
            status: Some("completed".into()),
        }))
        .expect("encodes");
        assert!(decode_tx(SCHEMA_VERSION, &written_later).is_err());
    }
}
