//! Online backups and offline restores of the database file.
//!
//! A backup is a new redb file filled from ONE read transaction of the live database: a
//! consistent snapshot, however many writes commit meanwhile (redb readers never wait for
//! the writer, nor it for them). The live file is never copied byte for byte, which would
//! catch pages of half-done commits. The copy is made in chunks of rows, each its own
//! non-durable commit (bounded memory), and made durable by one last commit.
//!
//! A restore puts a checked backup in place of the database while no server runs: it
//! holds the database's lock (so that no server can start on it meanwhile), copies the
//! backup beside it, fsyncs, and renames it over the database in one step.

use std::io::Write;
use std::path::{Path, PathBuf};

use redb::{
    Database, DatabaseError, Durability, Key, ReadTransaction, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableHandle, Value,
};

use super::check::check_file;
use super::schema::{
    BY_PROGRAM_DATE, BY_REFERENCE, CONNECTIONS, DELIVERIES, EVENTS, META, OUTBOX, REVERSALS,
    REVERSALS_BY_TX, REVERSAL_BY_REFERENCE, TRANSACTIONS,
};
use super::{CheckReport, OpenError};

/// Rows copied per commit into the backup file.
const CHUNK: usize = 50_000;

/// What a backup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupReport {
    pub transactions: u64,
    /// Size of the backup file.
    pub bytes: u64,
}

/// Every table of the schema, each copied by [`copy_all`]. A table in the file that is not
/// named here fails the backup (it would be silently left out), and a test compares this
/// list with what the store creates: a new table must be added here.
const TABLES: &[&str] = &[
    "meta",
    "transactions",
    "tx_by_reference",
    "tx_by_program_date",
    "connections",
    "deliveries",
    "outbox",
    "events",
    "reversals",
    "reversal_by_reference",
    "reversals_by_tx",
];

/// Copies every table of `source` (one snapshot) into a new database file at `path`,
/// created owner-only; fails if anything exists at `path`. Blocking.
pub(super) fn backup(source: &ReadTransaction, path: &Path) -> Result<BackupReport, String> {
    let names: Vec<String> = source
        .list_tables()
        .map_err(|e| e.to_string())?
        .map(|t| t.name().to_owned())
        .collect();
    if let Some(unknown) = names.iter().find(|n| !TABLES.contains(&n.as_str())) {
        return Err(format!(
            "the database has a table `{unknown}` that the backup does not know how to copy"
        ));
    }
    if source
        .list_multimap_tables()
        .map_err(|e| e.to_string())?
        .next()
        .is_some()
    {
        return Err("the database has a multimap table the backup does not copy".into());
    }
    crate::files::create_private_file(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    // From here on the file is ours: a failed backup leaves nothing behind.
    if let Err(e) = fill(source, path) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    let transactions = source
        .open_table(TRANSACTIONS)
        .and_then(|t| Ok(t.len()?))
        .map_err(|e| e.to_string())?;
    let bytes = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    Ok(BackupReport {
        transactions,
        bytes,
    })
}

/// Fills the new, empty file at `path` and makes it durable.
fn fill(source: &ReadTransaction, path: &Path) -> Result<(), String> {
    let dest = Database::builder()
        .set_cache_size(super::handle::ONE_PASS_CACHE_BYTES)
        .create(path)
        .map_err(|e| e.to_string())?;
    copy_all(source, &dest)?;
    // The chunks were committed without fsync; this commit makes them all durable.
    let mut txn = dest.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| e.to_string())
}

fn copy_all(source: &ReadTransaction, dest: &Database) -> Result<(), String> {
    copy(source, dest, META)?;
    copy(source, dest, TRANSACTIONS)?;
    copy(source, dest, BY_REFERENCE)?;
    copy(source, dest, BY_PROGRAM_DATE)?;
    copy(source, dest, CONNECTIONS)?;
    copy(source, dest, DELIVERIES)?;
    copy(source, dest, OUTBOX)?;
    copy(source, dest, EVENTS)?;
    copy(source, dest, REVERSALS)?;
    copy(source, dest, REVERSAL_BY_REFERENCE)?;
    copy(source, dest, REVERSALS_BY_TX)?;
    Ok(())
}

/// Copies one table in key order, [`CHUNK`] rows per (non-durable) commit. A table the
/// source lacks is created empty, as the store would on open.
fn copy<K: Key + 'static, V: Value + 'static>(
    source: &ReadTransaction,
    dest: &Database,
    definition: TableDefinition<K, V>,
) -> Result<(), String> {
    let text = |e: &dyn std::fmt::Display| e.to_string();
    let table = match source.open_table(definition) {
        Ok(table) => Some(table),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(text(&e)),
    };
    let mut rows = match &table {
        Some(table) => Some(table.iter().map_err(|e| text(&e))?),
        None => None,
    };
    loop {
        let mut txn = dest.begin_write().map_err(|e| text(&e))?;
        txn.set_durability(Durability::None).map_err(|e| text(&e))?;
        let mut copied = 0;
        {
            let mut out = txn.open_table(definition).map_err(|e| text(&e))?;
            if let Some(rows) = rows.as_mut() {
                for row in rows.by_ref().take(CHUNK) {
                    let (key, value) = row.map_err(|e| text(&e))?;
                    out.insert(key.value(), value.value())
                        .map_err(|e| text(&e))?;
                    copied += 1;
                }
            }
        }
        txn.commit().map_err(|e| text(&e))?;
        if copied < CHUNK {
            return Ok(());
        }
    }
}

/// Why a restore did not happen; nothing was changed in any of these cases.
#[derive(Debug)]
pub enum RestoreError {
    /// The backup cannot be opened as a database of this or an older schema.
    Source(OpenError),
    /// The backup opens but `check` finds problems in it.
    Damaged(CheckReport),
    /// A running server holds the database.
    InUse,
    /// Reading, writing or renaming failed.
    Io(String),
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreError::Source(e) => write!(f, "the backup is not usable: {e}"),
            RestoreError::Damaged(report) => write!(
                f,
                "the backup fails the check with {} problem(s), the first: {}",
                report.problems.len(),
                report.problems.first().map_or("", String::as_str)
            ),
            RestoreError::InUse => write!(
                f,
                "the database is in use by a running server; stop it first"
            ),
            RestoreError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Replaces the database at `to` with the backup at `from` (see the module comment), after
/// checking the backup. Returns the backup's check report. Blocking.
pub fn restore_file(from: &Path, to: &Path) -> Result<CheckReport, RestoreError> {
    let report = check_file(from).map_err(RestoreError::Source)?;
    if !report.problems.is_empty() {
        return Err(RestoreError::Damaged(report));
    }
    // Held until the rename: a server cannot start on the old file meanwhile. A file that
    // does not open for other reasons (damaged: perhaps why it is being restored) is
    // replaced all the same.
    let _lock = if to.exists() {
        match Database::builder().set_cache_size(1 << 20).create(to) {
            Ok(db) => Some(db),
            Err(DatabaseError::DatabaseAlreadyOpen) => return Err(RestoreError::InUse),
            Err(_) => None,
        }
    } else {
        None
    };
    let folder = match to.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(folder) => folder.to_path_buf(),
        None => PathBuf::from("."),
    };
    crate::files::create_private_dir_all(&folder)
        .map_err(|e| RestoreError::Io(format!("cannot create {}: {e}", folder.display())))?;
    let temp = folder.join(format!(
        ".{}.restore-{}",
        to.file_name().and_then(|n| n.to_str()).unwrap_or("db"),
        random_suffix()
    ));
    let copied = copy_file(from, &temp).and_then(|()| {
        std::fs::rename(&temp, to)
            .map_err(|e| format!("cannot rename {} to {}: {e}", temp.display(), to.display()))
    });
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&temp);
        return Err(RestoreError::Io(e));
    }
    // The rename is durable once the folder's entry is.
    if let Ok(dir) = std::fs::File::open(&folder) {
        let _ = dir.sync_all();
    }
    Ok(report)
}

/// Copies `from` into a new owner-only file `to` and fsyncs it.
pub(crate) fn copy_file(from: &Path, to: &Path) -> Result<(), String> {
    let mut source =
        std::fs::File::open(from).map_err(|e| format!("cannot open {}: {e}", from.display()))?;
    let mut dest = crate::files::create_private_file(to)
        .map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    std::io::copy(&mut source, &mut dest)
        .and_then(|_| dest.flush())
        .and_then(|()| dest.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", to.display()))
}

/// 64 random bits in hex, for names of temporary files that must not collide.
pub(crate) fn random_suffix() -> String {
    crate::auth::random_secret()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use redb::ReadableDatabase;

    use super::*;
    use crate::clock::Clock;
    use crate::store::{Limits, Store};

    /// Every table a store creates is one the backup copies, and the copy has them all.
    #[test]
    fn a_backup_has_every_table_the_store_creates() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(
            &dir.path().join("db.redb"),
            Clock::manual(100),
            Limits::new(8, 8),
        )
        .expect("open");
        let copy = dir.path().join("copy.redb");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let report = rt.block_on(store.backup_to(&copy)).expect("backup");
        assert_eq!(report.transactions, 0);
        // Nothing may be overwritten.
        assert!(rt.block_on(store.backup_to(&copy)).is_err());
        assert!(
            copy.exists(),
            "a refused backup leaves the existing file alone"
        );
        let mut created = created_tables(&store);
        created.sort();
        let mut expected: Vec<String> = TABLES.iter().map(|t| (*t).to_owned()).collect();
        expected.sort();
        assert_eq!(created, expected);
        drop(store);
        let db = Database::open(&copy).expect("the copy opens");
        let txn = db.begin_read().expect("read");
        let mut copied: Vec<String> = txn
            .list_tables()
            .expect("tables")
            .map(|t| t.name().to_owned())
            .collect();
        copied.sort();
        assert_eq!(copied, expected);
        drop(txn);
        drop(db);
        let checked = check_file(&copy).expect("checks");
        assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    }

    fn created_tables(store: &Store) -> Vec<String> {
        let Store::Redb(store) = store else {
            panic!("a redb store")
        };
        let db = store.handle.db().expect("open");
        let txn = db.begin_read().expect("read");
        txn.list_tables()
            .expect("tables")
            .map(|t| t.name().to_owned())
            .collect()
    }
}
