//! Reading a whole redb file out, record by record, for `cosmopoints migrate` (which
//! writes the records into PostgreSQL).
//!
//! The file is never changed: it is copied to a private temp file, the copy is opened
//! and migrated to this build's schema exactly as [`super::Store::open`] would (so ids
//! read the same as the server shows them), and then read in one read transaction. The
//! records go to the caller in batches, in key order, table by table.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::handle::{open_error, prepare};
use super::read::{decode, delivery};
use super::schema::{
    Conn, ConnectionRecord, DeliveryRecord, EventRecord, EventV1, ReversalRecord, ReversalV1, Tx,
    TxRecord, CONNECTIONS, DELIVERIES, EVENTS, META, REVERSALS, TRANSACTIONS,
};
use super::{OpenError, StoreError};
use crate::delivery::Delivery;

/// Records of one table, in key order.
pub(super) enum Rows {
    /// The keys every process shares: the token signing key (absent if no server ever
    /// started on the file) and the id key.
    Keys {
        signing_key: Option<Vec<u8>>,
        id_key: Vec<u8>,
    },
    Transactions(Vec<Tx>),
    /// (business, end user, program, the connection).
    Connections(Vec<(String, String, String, Conn)>),
    /// (job kind, id, its delivery state): kinds as in the redb schema (credit 0, debit
    /// 1, event 2).
    Deliveries(Vec<(u8, u64, Delivery)>),
    /// (event seq, the event).
    Events(Vec<(u64, EventV1)>),
    /// (reversal seq, the reversal).
    Reversals(Vec<(u64, ReversalV1)>),
}

/// How many records of each kind were read out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub transactions: u64,
    pub connections: u64,
    pub deliveries: u64,
    pub events: u64,
    pub reversals: u64,
    /// The schema the file had, if it was older than this build's.
    pub migrated_from: Option<u64>,
}

/// Why an export stopped.
#[derive(Debug)]
pub(super) enum ExportError {
    /// The source cannot be opened (in use, newer, damaged, missing).
    Open(OpenError),
    /// Reading or decoding failed.
    Read(StoreError),
    /// The sink refused a batch; its message.
    Sink(String),
}

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportError::Open(e) => write!(f, "{e}"),
            ExportError::Read(e) => write!(f, "reading the source failed: {e:?}"),
            ExportError::Sink(e) => write!(f, "{e}"),
        }
    }
}

/// Reads every record of the redb file at `source` and hands them to `sink`, `batch` at a
/// time (the keys first), without changing the file.
pub(super) fn export_file(
    source: &Path,
    batch: usize,
    mut sink: impl FnMut(Rows) -> Result<(), String>,
) -> Result<Counts, ExportError> {
    let batch = batch.max(1);
    if !source.is_file() {
        return Err(ExportError::Open(OpenError::Unusable(format!(
            "{} is not a file",
            source.display()
        ))));
    }
    let temp = tempfile_dir(source)?;
    let copy = temp.join("source.redb");
    std::fs::copy(source, &copy).map_err(|e| {
        ExportError::Open(OpenError::Unusable(format!("cannot copy the source: {e}")))
    })?;
    let result = (|| {
        let db = Database::builder()
            .set_cache_size(super::handle::ONE_PASS_CACHE_BYTES)
            .create(&copy)
            .map_err(|e| ExportError::Open(open_error(e)))?;
        let prepared = prepare(&db).map_err(ExportError::Open)?;
        let txn = db.begin_read().map_err(|e| read_error(&e))?;
        let mut counts = Counts {
            migrated_from: prepared.migrated_from,
            ..Counts::default()
        };
        let meta = txn.open_table(META).map_err(|e| read_error(&e))?;
        let signing_key = meta
            .get("signing_key")
            .map_err(|e| read_error(&e))?
            .map(|k| k.value().to_vec());
        sink(Rows::Keys {
            signing_key,
            id_key: prepared.id_key.clone(),
        })
        .map_err(ExportError::Sink)?;

        let table = txn.open_table(TRANSACTIONS).map_err(|e| read_error(&e))?;
        let mut rows = Vec::with_capacity(batch.min(table.len().unwrap_or(0) as usize + 1));
        for entry in table.iter().map_err(|e| read_error(&e))? {
            let (_, value) = entry.map_err(|e| read_error(&e))?;
            rows.push(
                decode::<TxRecord>(value.value())
                    .map_err(ExportError::Read)?
                    .latest(),
            );
            if rows.len() == batch {
                counts.transactions += rows.len() as u64;
                sink(Rows::Transactions(std::mem::take(&mut rows))).map_err(ExportError::Sink)?;
            }
        }
        counts.transactions += rows.len() as u64;
        if !rows.is_empty() {
            sink(Rows::Transactions(rows)).map_err(ExportError::Sink)?;
        }

        let table = txn.open_table(CONNECTIONS).map_err(|e| read_error(&e))?;
        let mut rows = Vec::new();
        for entry in table.iter().map_err(|e| read_error(&e))? {
            let (key, value) = entry.map_err(|e| read_error(&e))?;
            let (business, end_user, program) = key.value();
            let record = decode::<ConnectionRecord>(value.value())
                .map_err(ExportError::Read)?
                .latest();
            rows.push((business.into(), end_user.into(), program.into(), record));
            if rows.len() == batch {
                counts.connections += rows.len() as u64;
                sink(Rows::Connections(std::mem::take(&mut rows))).map_err(ExportError::Sink)?;
            }
        }
        counts.connections += rows.len() as u64;
        if !rows.is_empty() {
            sink(Rows::Connections(rows)).map_err(ExportError::Sink)?;
        }

        let table = txn.open_table(REVERSALS).map_err(|e| read_error(&e))?;
        let mut rows = Vec::new();
        for entry in table.iter().map_err(|e| read_error(&e))? {
            let (key, value) = entry.map_err(|e| read_error(&e))?;
            let record = decode::<ReversalRecord>(value.value())
                .map_err(ExportError::Read)?
                .latest();
            rows.push((key.value(), record));
            if rows.len() == batch {
                counts.reversals += rows.len() as u64;
                sink(Rows::Reversals(std::mem::take(&mut rows))).map_err(ExportError::Sink)?;
            }
        }
        counts.reversals += rows.len() as u64;
        if !rows.is_empty() {
            sink(Rows::Reversals(rows)).map_err(ExportError::Sink)?;
        }

        let table = txn.open_table(EVENTS).map_err(|e| read_error(&e))?;
        let mut rows = Vec::new();
        for entry in table.iter().map_err(|e| read_error(&e))? {
            let (key, value) = entry.map_err(|e| read_error(&e))?;
            let record = decode::<EventRecord>(value.value())
                .map_err(ExportError::Read)?
                .latest();
            rows.push((key.value(), record));
            if rows.len() == batch {
                counts.events += rows.len() as u64;
                sink(Rows::Events(std::mem::take(&mut rows))).map_err(ExportError::Sink)?;
            }
        }
        counts.events += rows.len() as u64;
        if !rows.is_empty() {
            sink(Rows::Events(rows)).map_err(ExportError::Sink)?;
        }

        // Deliveries last: they name transactions, reversals and events.
        let table = txn.open_table(DELIVERIES).map_err(|e| read_error(&e))?;
        let mut rows = Vec::new();
        for entry in table.iter().map_err(|e| read_error(&e))? {
            let (key, value) = entry.map_err(|e| read_error(&e))?;
            let (kind, id) = key.value();
            let record = decode::<DeliveryRecord>(value.value())
                .map_err(ExportError::Read)?
                .latest();
            rows.push((kind, id, delivery(record).map_err(ExportError::Read)?));
            if rows.len() == batch {
                counts.deliveries += rows.len() as u64;
                sink(Rows::Deliveries(std::mem::take(&mut rows))).map_err(ExportError::Sink)?;
            }
        }
        counts.deliveries += rows.len() as u64;
        if !rows.is_empty() {
            sink(Rows::Deliveries(rows)).map_err(ExportError::Sink)?;
        }
        Ok(counts)
    })();
    let _ = std::fs::remove_dir_all(&temp);
    result
}

fn read_error(e: &dyn std::fmt::Display) -> ExportError {
    tracing::error!(error = %e, "reading the source database failed");
    ExportError::Read(StoreError::Unavailable)
}

/// A private temp folder beside nothing of the source's (the system's temp dir).
fn tempfile_dir(source: &Path) -> Result<std::path::PathBuf, ExportError> {
    let _ = source;
    let dir = std::env::temp_dir().join(format!(
        "cosmopoints-migrate-{}-{}",
        std::process::id(),
        super::random_suffix()
    ));
    crate::files::create_private_dir_all(&dir).map_err(|e| {
        ExportError::Open(OpenError::Unusable(format!(
            "cannot create a temp folder: {e}"
        )))
    })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pinned 0.2.0 file reads out whole (migrated in the copy), and stays as it was.
    #[test]
    fn the_pinned_schema_2_file_exports_whole_and_unchanged() {
        let source =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/schema2/cosmopoints.redb");
        let before = std::fs::read(&source).expect("pinned file");
        let mut seen = (0, 0, false);
        let counts = export_file(&source, 5, |rows| {
            match rows {
                Rows::Keys { id_key, .. } => {
                    assert!(!id_key.is_empty());
                    seen.2 = true;
                }
                Rows::Transactions(txs) => {
                    assert!(txs.len() <= 5);
                    seen.0 += txs.len();
                }
                Rows::Deliveries(d) => seen.1 += d.len(),
                _ => {}
            }
            Ok(())
        })
        .expect("export");
        assert_eq!(counts.transactions, 18);
        assert_eq!(seen.0, 18);
        assert_eq!(counts.deliveries as usize, seen.1);
        assert!(seen.2, "the keys come first");
        assert_eq!(counts.migrated_from, Some(2));
        assert_eq!(std::fs::read(&source).expect("source"), before);
    }

    #[test]
    fn a_missing_source_is_an_open_error() {
        let e =
            export_file(Path::new("/nonexistent/x.redb"), 10, |_| Ok(())).expect_err("an error");
        assert!(matches!(e, ExportError::Open(_)), "{e}");
    }
}
