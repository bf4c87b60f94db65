//! `cosmopoints check`: verifies that every record decodes and has exactly its index
//! entries, on the live database or on a file opened read-only.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable};

use super::handle::{open_error, stored_version};
use super::schema::{
    decode_connection, decode_tx, DeliveryRecord, EventRecord, ReversalRecord, BY_PROGRAM_DATE,
    BY_REFERENCE, CONNECTIONS, DELIVERIES, EVENTS, JOB_CREDIT, JOB_DEBIT, JOB_EVENT, OUTBOX,
    REVERSALS, REVERSALS_BY_TX, REVERSAL_BY_REFERENCE, SCHEMA_VERSION, TRANSACTIONS,
};
use super::OpenError;

/// redb's page cache while checking a file.
const CHECK_CACHE_BYTES: usize = 64 << 20;

/// What `check` found: how many of each, and every inconsistency.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// The schema version of the file checked.
    pub schema: u64,
    pub transactions: u64,
    pub references: u64,
    pub program_date_entries: u64,
    pub connections: u64,
    pub deliveries: u64,
    pub events: u64,
    pub outbox_entries: u64,
    pub reversals: u64,
    pub problems: Vec<String>,
}

/// Opens the file at `path` read-only (after redb's own recovery if the last process
/// using it crashed) and verifies it (see [`verify`]). A file of an older schema is read
/// as that schema wrote it; it is migrated only when a server opens it.
pub fn check_file(path: &Path) -> Result<CheckReport, OpenError> {
    if !path.exists() {
        return Err(OpenError::Unusable(format!(
            "{} does not exist",
            path.display()
        )));
    }
    // The check reads each page about once: a small cache does as well as redb's default
    // (1 GiB), which a large file would fill for nothing.
    let mut builder = Database::builder();
    builder.set_cache_size(CHECK_CACHE_BYTES);
    let db = match builder.open_read_only(path) {
        // Not shut down cleanly (a crash, kill -9): redb recovers such a file when it is
        // opened for writing, as a server start would. Do that, then check read-only.
        Err(DatabaseError::RepairAborted) => {
            drop(
                Database::builder()
                    .set_cache_size(CHECK_CACHE_BYTES)
                    .open(path)
                    .map_err(open_error)?,
            );
            builder.open_read_only(path).map_err(open_error)?
        }
        other => other.map_err(open_error)?,
    };
    let txn = db
        .begin_read()
        .map_err(|e| OpenError::Unusable(e.to_string()))?;
    let schema = match stored_version(&txn)? {
        Some(v) if v > SCHEMA_VERSION => return Err(OpenError::NewerSchema(v)),
        Some(v) => v,
        None => return Err(OpenError::Unusable("no schema version".into())),
    };
    verify(&txn, schema).map_err(|e| OpenError::Unusable(e.to_string()))
}

/// Verifies that every index entry points to a record with the same key fields, every
/// record has exactly its index entries (so no two records share a business and
/// referenceNumber), and every record decodes. (A file of schema 3 or before also has a
/// date index, not checked: opening the file drops it.)
pub(super) fn verify(txn: &redb::ReadTransaction, schema: u64) -> Result<CheckReport, redb::Error> {
    let mut report = CheckReport {
        schema,
        ..CheckReport::default()
    };
    let records = txn.open_table(TRANSACTIONS)?;
    let by_ref = txn.open_table(BY_REFERENCE)?;
    let by_program = txn.open_table(BY_PROGRAM_DATE)?;
    let problems = &mut report.problems;
    let mut decoded = HashMap::new();
    for entry in records.iter()? {
        let (id, bytes) = entry?;
        report.transactions += 1;
        let id = id.value();
        match decode_tx(schema, bytes.value()) {
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
    // Tables a file of an older schema does not have yet (they are made on first open).
    let missing = |e: &redb::TableError| matches!(e, redb::TableError::TableDoesNotExist(_));
    let reversal_seqs = verify_reversals(txn, &decoded, &mut report)?;
    let problems = &mut report.problems;
    let mut pending = std::collections::HashMap::new();
    let mut delivered = std::collections::HashSet::new();
    // Events first: deliveries name them.
    let mut event_seqs = std::collections::BTreeSet::new();
    match txn.open_table(EVENTS) {
        Err(e) if missing(&e) => {}
        Err(e) => return Err(e.into()),
        Ok(events) => {
            for entry in events.iter()? {
                let (seq, bytes) = entry?;
                report.events += 1;
                let seq = seq.value();
                if let Err(e) = postcard::from_bytes::<EventRecord>(bytes.value()) {
                    problems.push(format!("event {seq} does not decode: {e}"));
                }
                event_seqs.insert(seq);
            }
        }
    }
    match txn.open_table(DELIVERIES) {
        Err(e) if missing(&e) => {}
        Err(e) => return Err(e.into()),
        Ok(deliveries) => {
            for entry in deliveries.iter()? {
                let (key, bytes) = entry?;
                report.deliveries += 1;
                let (kind, seq) = key.value();
                match kind {
                    JOB_CREDIT if !decoded.contains_key(&seq) => {
                        problems.push(format!("delivery {seq} names a missing transaction"))
                    }
                    JOB_EVENT if !event_seqs.contains(&seq) => {
                        problems.push(format!("event delivery {seq} names a missing event"))
                    }
                    JOB_DEBIT if !reversal_seqs.contains(&seq) => {
                        problems.push(format!("debit {seq} names a missing reversal"))
                    }
                    JOB_CREDIT | JOB_DEBIT | JOB_EVENT => {}
                    _ => problems.push(format!("delivery ({kind}, {seq}) has an unknown job kind")),
                }
                delivered.insert((kind, seq));
                match postcard::from_bytes::<DeliveryRecord>(bytes.value()) {
                    Ok(d) => {
                        let d = d.latest();
                        match (d.status, d.next_attempt_at) {
                            (0, Some(due)) => {
                                pending.insert((kind, seq), due);
                            }
                            (0, None) => {
                                problems.push(format!("delivery {seq} is pending with no due time"))
                            }
                            (1 | 2, _) => {}
                            (other, _) => problems
                                .push(format!("delivery {seq} has an unknown status {other}")),
                        }
                    }
                    Err(e) => problems.push(format!("delivery {seq} does not decode: {e}")),
                }
            }
        }
    }
    match txn.open_table(OUTBOX) {
        Err(e) if missing(&e) => {}
        Err(e) => return Err(e.into()),
        Ok(outbox) => {
            for entry in outbox.iter()? {
                let (key, _) = entry?;
                report.outbox_entries += 1;
                let (due, kind, seq) = key.value();
                if pending.remove(&(kind, seq)) != Some(due) {
                    problems.push(format!(
                        "outbox entry ({due}, {kind}, {seq}) has no pending delivery due then"
                    ));
                }
            }
        }
    }
    for (kind, seq) in pending.keys() {
        problems.push(format!(
            "pending delivery ({kind}, {seq}) has no outbox entry"
        ));
    }
    for seq in &event_seqs {
        if !delivered.contains(&(JOB_EVENT, *seq)) {
            problems.push(format!("event {seq} has no delivery state"));
        }
    }
    for entry in txn.open_table(CONNECTIONS)?.iter()? {
        let (key, bytes) = entry?;
        report.connections += 1;
        if let Err(e) = decode_connection(schema, bytes.value()) {
            let (b, user, program) = key.value();
            problems.push(format!(
                "connection ({b}, {user}, {program}) does not decode: {e}"
            ));
        }
    }
    Ok(report)
}

/// Verifies the reversals: each decodes, names a transaction of its business and has
/// exactly its two index entries; the reversals of each transaction add up to the totals
/// its record keeps, which never exceed its value and points. Returns the reversal seqs.
fn verify_reversals(
    txn: &redb::ReadTransaction,
    transactions: &HashMap<u64, super::schema::Tx>,
    report: &mut CheckReport,
) -> Result<BTreeSet<u64>, redb::Error> {
    let missing = |e: &redb::TableError| matches!(e, redb::TableError::TableDoesNotExist(_));
    let mut seqs = BTreeSet::new();
    let problems = &mut report.problems;
    // (business, reference) and tx seq of each reversal that decodes.
    let mut found = HashMap::new();
    // Per transaction seq: (value, points, count).
    let mut sums: HashMap<u64, (u64, u64, u32)> = HashMap::new();
    match txn.open_table(REVERSALS) {
        Err(e) if missing(&e) => {}
        Err(e) => return Err(e.into()),
        Ok(reversals) => {
            for entry in reversals.iter()? {
                let (seq, bytes) = entry?;
                report.reversals += 1;
                let seq = seq.value();
                seqs.insert(seq);
                let r = match postcard::from_bytes::<ReversalRecord>(bytes.value()) {
                    Ok(r) => r.latest(),
                    Err(e) => {
                        problems.push(format!("reversal {seq} does not decode: {e}"));
                        continue;
                    }
                };
                match transactions.get(&r.tx_seq) {
                    Some(tx) if tx.business == r.business => {}
                    _ => problems.push(format!(
                        "reversal {seq} names a missing transaction or one of another business"
                    )),
                }
                let sum = sums.entry(r.tx_seq).or_default();
                sum.0 = sum.0.saturating_add(r.value);
                sum.1 = sum.1.saturating_add(r.points);
                sum.2 = sum.2.saturating_add(1);
                found.insert(seq, ((r.business, r.reference_number), r.tx_seq));
            }
        }
    }
    match txn.open_table(REVERSAL_BY_REFERENCE) {
        Err(e) if missing(&e) => {}
        Err(e) => return Err(e.into()),
        Ok(by_ref) => {
            let mut indexed = BTreeSet::new();
            for entry in by_ref.iter()? {
                let (key, seq) = entry?;
                let (b, reference) = key.value();
                let seq = seq.value();
                match found.get(&seq) {
                    Some(((rb, rr), _)) if rb == b && rr == reference => {
                        indexed.insert(seq);
                    }
                    _ => problems.push(format!(
                        "reversal reference index ({b}, {reference}) names a missing or different reversal"
                    )),
                }
            }
            for seq in found.keys().filter(|s| !indexed.contains(s)) {
                problems.push(format!("reversal {seq}: reference index entry missing"));
            }
        }
    }
    match txn.open_table(REVERSALS_BY_TX) {
        Err(e) if missing(&e) => {}
        Err(e) => return Err(e.into()),
        Ok(by_tx) => {
            let mut indexed = BTreeSet::new();
            for entry in by_tx.iter()? {
                let (key, _) = entry?;
                let (tx_seq, seq) = key.value();
                match found.get(&seq) {
                    Some((_, t)) if *t == tx_seq => {
                        indexed.insert(seq);
                    }
                    _ => problems.push(format!(
                        "reversal index ({tx_seq}, {seq}) names a missing or different reversal"
                    )),
                }
            }
            for seq in found.keys().filter(|s| !indexed.contains(s)) {
                problems.push(format!("reversal {seq}: transaction index entry missing"));
            }
        }
    }
    for (seq, tx) in transactions {
        let (value, points, count) = sums.get(seq).copied().unwrap_or_default();
        if (value, points, count) != (tx.reversed_value, tx.reversed_points, tx.reversals) {
            problems.push(format!(
                "transaction seq {seq}: its reversals add up to value {value}, points {points} \
                 in {count}, but the record says {}, {} in {}",
                tx.reversed_value, tx.reversed_points, tx.reversals
            ));
        }
        if tx.reversed_value > tx.value || tx.reversed_points > tx.total_points {
            problems.push(format!(
                "transaction seq {seq}: reversed {} of value {} and {} of {} points",
                tx.reversed_value, tx.value, tx.reversed_points, tx.total_points
            ));
        }
    }
    Ok(seqs)
}
