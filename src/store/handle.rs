//! The open database file: opening it (schema check, migrations, tables), sharing it
//! between readers and the writer, and reopening it after an I/O failure.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableError};

use super::read::open_table;
use super::schema::{
    BY_PROGRAM_DATE, BY_REFERENCE, CONNECTIONS, DELIVERIES, EVENTS, META, MIGRATIONS, OUTBOX,
    REVERSALS, REVERSALS_BY_TX, REVERSAL_BY_REFERENCE, SCHEMA_VERSION, TRANSACTIONS,
};
use super::{OpenError, StoreError};
use crate::ledger::IdCipher;

/// The open database, shared by readers and the writer, and replaced by the writer after
/// an I/O failure.
///
/// redb latches an I/O error (a full disk, say): every later operation on that `Database`
/// fails until it is reopened. So after a failed commit the writer takes the database out
/// (requests meanwhile get 503 at once), waits for readers to let go of it, and opens the
/// file again, which makes redb recover it to the last durable commit. Until that works
/// (for instance while the disk is still full) it retries on every write and at least
/// every [`RECOVERY_RETRY`].
pub(super) struct Handle {
    pub path: PathBuf,
    /// Turns sequence numbers into client-facing ids and back.
    pub ids: IdCipher,
    /// The same for merchant webhook events (another key: an event id never names a
    /// transaction).
    pub event_ids: IdCipher,
    /// The same for reversals.
    pub reversal_ids: IdCipher,
    /// The page cache the config sets; `None`: [`page_cache_bytes`] sizes it from the file
    /// at each open.
    pub cache_bytes: Option<usize>,
    db: RwLock<Option<Arc<Database>>>,
    /// The newest commit's snapshot, for look-ups (see [`Snapshot`]); `None` until the
    /// writer's first commit after the database was opened, and whenever a snapshot could
    /// not be taken (look-ups then take their own).
    latest: RwLock<Option<Arc<Snapshot>>>,
    /// Durable commits made by the writer, and the writes they held.
    pub commits: std::sync::atomic::AtomicU64,
    pub writes: std::sync::atomic::AtomicU64,
    /// Told of every durable commit: its writes and how long the commit (with its fsync)
    /// took. Set once, before serving (the metrics).
    pub on_commit: std::sync::OnceLock<CommitHook>,
}

/// A read transaction of one commit with the tables a look-up by id or referenceNumber
/// reads already open. Beginning a read transaction and opening three tables cost about
/// as much as the look-up itself, so the writer takes one snapshot after each commit and
/// every look-up until the next commit shares it ([`Handle::publish`]). It holds the
/// database, like any reader, so a reopen waits for it; [`Handle::close`] drops it first.
pub(super) struct Snapshot {
    pub records: redb::ReadOnlyTable<u64, &'static [u8]>,
    pub by_ref: redb::ReadOnlyTable<(&'static str, &'static str), u64>,
    pub deliveries: redb::ReadOnlyTable<(u8, u64), &'static [u8]>,
    /// For the tables a rarer look-up needs (reversals), from the same commit.
    pub txn: redb::ReadTransaction,
    _db: Arc<Database>,
}

impl Snapshot {
    fn take(db: Arc<Database>) -> Result<Snapshot, StoreError> {
        let txn = db.begin_read().map_err(super::unavailable)?;
        Ok(Snapshot {
            records: open_table(&txn, TRANSACTIONS)?,
            by_ref: open_table(&txn, BY_REFERENCE)?,
            deliveries: open_table(&txn, DELIVERIES)?,
            txn,
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

/// See [`Handle::on_commit`].
pub(super) type CommitHook = Box<dyn Fn(usize, std::time::Duration) + Send + Sync>;

/// How often the writer retries opening a database it had to close.
pub(super) const RECOVERY_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// The page cache for opening the file at `path`: `configured` when the config sets one,
/// else [`auto_cache_bytes`] of the file's size now (0 for a file not yet written).
pub(super) fn page_cache_bytes(configured: Option<usize>, path: &Path) -> usize {
    configured.unwrap_or_else(|| auto_cache_bytes(std::fs::metadata(path).map_or(0, |m| m.len())))
}

/// The page cache for a pass that reads or writes each page of a file about once (a
/// backup's new file, `migrate`'s copy of its source): more would not be used again, and
/// redb's default (1 GiB) would fill with a large file for nothing.
pub(super) const ONE_PASS_CACHE_BYTES: usize = 16 << 20;

/// The part of the file a page cache sized from it gets: 1/32 (see [`auto_cache_bytes`]).
const AUTO_CACHE_DIVISOR: u64 = 32;
/// The smallest page cache sized from the file (and the whole cache of a small one).
pub(super) const AUTO_CACHE_MIN: usize = 16 << 20;
/// The largest (redb's own default): a file of 32 GiB, about 150 million transactions.
pub(super) const AUTO_CACHE_MAX: usize = 1 << 30;

/// The page cache for a file of `file_bytes` when the config sets none: 1/32 of the file,
/// within [`AUTO_CACHE_MIN`]..=[`AUTO_CACHE_MAX`].
///
/// Why 1/32: a look-up descends two trees, and each of their branch pages not in the cache
/// is read from the file again. The branch pages of the three transaction trees are about
/// 2% of the file (47 MiB of 2.3 GB at 10 million transactions), so 1/32 (3%) keeps them
/// all with room for recent leaves, and a look-up reads about one leaf per tree (BENCHMARKS.md,
/// "Round 12"). A file of up to 512 MiB (about 2 million transactions) gets the minimum:
/// the cache fills as pages are read and written, and memory stays what it was there.
/// Sized at open (a start, or a reopen after an I/O failure): a file that grows keeps its
/// cache until then. redb lets a write transaction's dirty pages take up to half of the
/// cache until it commits; every commit here is durable and empties them.
pub(super) fn auto_cache_bytes(file_bytes: u64) -> usize {
    usize::try_from(file_bytes / AUTO_CACHE_DIVISOR)
        .unwrap_or(AUTO_CACHE_MAX)
        .clamp(AUTO_CACHE_MIN, AUTO_CACHE_MAX)
}

/// [`auto_cache_bytes`] in words, for the start-up log.
pub(super) fn auto_cache_rule() -> String {
    format!(
        "1/{AUTO_CACHE_DIVISOR} of the file, {} to {} MiB",
        AUTO_CACHE_MIN >> 20,
        AUTO_CACHE_MAX >> 20
    )
}

/// What opening found in the file.
pub(super) struct Prepared {
    pub next_seq: u64,
    pub id_key: Vec<u8>,
    /// The schema version the file had, if it was migrated on this open.
    pub migrated_from: Option<u64>,
}

impl Handle {
    pub fn new(path: PathBuf, id_key: &[u8], cache_bytes: Option<usize>, db: Database) -> Handle {
        Handle {
            path,
            ids: IdCipher::new(id_key),
            event_ids: IdCipher::new(&[id_key, b"/events"].concat()),
            reversal_ids: IdCipher::new(&[id_key, b"/reversals"].concat()),
            cache_bytes,
            db: RwLock::new(Some(Arc::new(db))),
            latest: RwLock::new(None),
            commits: 0.into(),
            writes: 0.into(),
            on_commit: std::sync::OnceLock::new(),
        }
    }

    /// The database, while it is open. Holding the `Arc` keeps a reopen waiting: readers
    /// hold it for as long as their read transaction lives.
    pub fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(StoreError::Unavailable)
    }

    /// A snapshot of the newest commit for a look-up: the one the writer published, else
    /// a fresh one ([`Handle::fresh_snapshot`]).
    pub fn snapshot(&self) -> Result<Arc<Snapshot>, StoreError> {
        let latest = self
            .latest
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match latest {
            Some(snapshot) => Ok(snapshot),
            None => self.fresh_snapshot(),
        }
    }

    /// A snapshot taken now. A commit is visible to new read transactions a moment before
    /// the writer publishes it, so a look-up that finds nothing in the published snapshot
    /// asks again here: a transaction that a listing has shown is never then a 404.
    pub fn fresh_snapshot(&self) -> Result<Arc<Snapshot>, StoreError> {
        Snapshot::take(self.db()?).map(Arc::new)
    }

    /// Called by the writer after each commit, BEFORE it answers the writes in it: so a
    /// look-up that starts after an answer always sees that answer's write. If no
    /// snapshot can be taken, look-ups take their own. The database stays locked for
    /// reading meanwhile, so that a [`Handle::close`] never misses a snapshot published
    /// as it runs.
    pub fn publish(&self) {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let taken = db
            .clone()
            .map(|db| Snapshot::take(db).map(Arc::new))
            .and_then(Result::ok);
        *self.latest.write().unwrap_or_else(PoisonError::into_inner) = taken;
    }

    /// Puts `snapshot` back as the published one: for tests of a commit that is visible
    /// but not yet published.
    #[cfg(test)]
    pub fn set_published(&self, snapshot: Option<Arc<Snapshot>>) {
        *self.latest.write().unwrap_or_else(PoisonError::into_inner) = snapshot;
    }

    pub fn is_open(&self) -> bool {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Takes the database out, waiting up to `patience` for readers to let go of it, so
    /// that the file is released. `false` if a reader still held it (it is put back).
    pub fn close(&self, patience: std::time::Duration) -> bool {
        let old = self
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // The published snapshot holds the database too. Dropped after the database is
        // taken out: no snapshot can be published after this.
        self.latest
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut old) = old else {
            return true;
        };
        let deadline = std::time::Instant::now() + patience;
        loop {
            match Arc::try_unwrap(old) {
                Ok(db) => {
                    drop(db);
                    return true;
                }
                Err(shared) if std::time::Instant::now() < deadline => {
                    old = shared;
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(shared) => {
                    // A long listing still reads it: put it back.
                    *self.db.write().unwrap_or_else(PoisonError::into_inner) = Some(shared);
                    return false;
                }
            }
        }
    }

    /// Closes the database (waiting up to a few seconds for readers to let go of it) and
    /// opens it again; returns the sequence counter read back from the file.
    pub fn reopen(&self) -> Option<u64> {
        if !self.close(std::time::Duration::from_secs(5)) {
            return None;
        }
        let reopened = super::prefill::create(
            Database::builder().set_cache_size(page_cache_bytes(self.cache_bytes, &self.path)),
            &self.path,
        )
        .map_err(|e| e.to_string())
        .and_then(|db| {
            prepare(&db)
                .map(|p| (db, p.next_seq))
                .map_err(|e| e.to_string())
        });
        match reopened {
            Ok((db, next_seq)) => {
                *self.db.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(db));
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

pub(super) fn open_error(e: DatabaseError) -> OpenError {
    match e {
        DatabaseError::DatabaseAlreadyOpen => OpenError::Locked,
        other => OpenError::Unusable(other.to_string()),
    }
}

/// The schema version a file records, if it has one.
pub(super) fn stored_version(txn: &redb::ReadTransaction) -> Result<Option<u64>, OpenError> {
    let bad = |e: &dyn std::fmt::Display| OpenError::Unusable(e.to_string());
    match txn.open_table(META) {
        Ok(meta) => match meta.get("schema_version").map_err(|e| bad(&e))? {
            Some(v) => u64_value(v.value())
                .map(Some)
                .ok_or_else(|| OpenError::Unusable("the schema version is unreadable".into())),
            None => Ok(None),
        },
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(bad(&e)),
    }
}

/// Checks the schema version (writing it and a new id key into a new file, migrating an
/// older file in one write transaction), reads the next sequence number and the id key,
/// and creates every table so that readers never meet a missing one.
pub(super) fn prepare(db: &Database) -> Result<Prepared, OpenError> {
    let bad = |e: &dyn std::fmt::Display| OpenError::Unusable(e.to_string());
    let version = stored_version(&db.begin_read().map_err(|e| bad(&e))?)?;
    if let Some(v) = version.filter(|v| *v > SCHEMA_VERSION) {
        return Err(OpenError::NewerSchema(v));
    }
    let txn = db.begin_write().map_err(|e| bad(&e))?;
    let mut migrated_from = None;
    match version {
        None => {
            let data_tables = txn.list_tables().map_err(|e| bad(&e))?.count();
            if data_tables > 1 {
                return Err(OpenError::Unusable(
                    "it has tables but no schema version: not a Cosmopoints database".into(),
                ));
            }
        }
        Some(v) if v < SCHEMA_VERSION => {
            for (_, step) in MIGRATIONS.iter().filter(|(to, _)| *to > v) {
                step(&txn).map_err(|e| OpenError::Unusable(format!("migration failed: {e}")))?;
            }
            migrated_from = Some(v);
        }
        Some(_) => {}
    }
    let next_seq;
    let id_key;
    {
        let mut meta = txn.open_table(META).map_err(|e| bad(&e))?;
        if version != Some(SCHEMA_VERSION) {
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
        // The writer stores the counter in `meta` whenever a batch moves it; it must also
        // be past the last transaction, whatever wrote the file. The larger of the two.
        let stored = match meta.get("next_seq").map_err(|e| bad(&e))? {
            Some(v) => u64_value(v.value())
                .ok_or_else(|| OpenError::Unusable("the sequence counter is unreadable".into()))?,
            None => 0,
        };
        let records = txn.open_table(TRANSACTIONS).map_err(|e| bad(&e))?;
        let after_last = match records.last().map_err(|e| bad(&e))? {
            Some((seq, _)) => seq.value().saturating_add(1),
            None => 0,
        };
        next_seq = stored.max(after_last);
        txn.open_table(BY_REFERENCE).map_err(|e| bad(&e))?;
        txn.open_table(BY_PROGRAM_DATE).map_err(|e| bad(&e))?;
        txn.open_table(CONNECTIONS).map_err(|e| bad(&e))?;
        txn.open_table(DELIVERIES).map_err(|e| bad(&e))?;
        txn.open_table(OUTBOX).map_err(|e| bad(&e))?;
        txn.open_table(EVENTS).map_err(|e| bad(&e))?;
        txn.open_table(REVERSALS).map_err(|e| bad(&e))?;
        txn.open_table(REVERSAL_BY_REFERENCE).map_err(|e| bad(&e))?;
        txn.open_table(REVERSALS_BY_TX).map_err(|e| bad(&e))?;
    }
    txn.commit().map_err(|e| bad(&e))?;
    Ok(Prepared {
        next_seq,
        id_key,
        migrated_from,
    })
}

pub(super) fn u64_value(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_cache_is_a_32nd_of_the_file_within_its_bounds() {
        assert_eq!(auto_cache_bytes(0), AUTO_CACHE_MIN);
        assert_eq!(auto_cache_bytes(172 << 20), AUTO_CACHE_MIN);
        assert_eq!(auto_cache_bytes(512 << 20), AUTO_CACHE_MIN);
        // 10 million transactions: 2.3 GB, whose branch pages are 47 MiB.
        assert_eq!(auto_cache_bytes(2_302_152_704), 71_942_272);
        assert!(auto_cache_bytes(2_302_152_704) > 47 << 20);
        assert_eq!(auto_cache_bytes(32 << 30), AUTO_CACHE_MAX);
        assert_eq!(auto_cache_bytes(u64::MAX), AUTO_CACHE_MAX);
    }

    #[test]
    fn the_page_cache_comes_from_the_config_else_from_the_file_on_disk() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("big.redb");
        // A sparse file of 4 GiB: its size, not its contents, sizes the cache.
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(4 << 30))
            .expect("sparse file");
        assert_eq!(page_cache_bytes(None, &path), 128 << 20);
        assert_eq!(page_cache_bytes(Some(1 << 20), &path), 1 << 20);
        let missing = dir.path().join("missing.redb");
        assert_eq!(page_cache_bytes(None, &missing), AUTO_CACHE_MIN);
    }
}
