//! The database file, as redb's own `FileBackend` keeps it, with one difference: the space
//! redb's writes reach past the file's written part is first written with zeros, a chunk
//! ([`CHUNK`]) at a time, so that a commit's `fdatasync` seldom allocates blocks.
//!
//! Why: redb grows its file with `set_len`, which leaves a hole, and the filesystem
//! allocates each page of the hole when it first writes it back, in the `fdatasync` of
//! the commit that wrote it. A commit that allocates also has to write the file's block
//! map and inode and wait for them (ext4 without a journal), or commit the journal (ext4,
//! XFS). On this project's machines that was about a third of each commit's wall time.
//! With a chunk written ahead, one commit in many pays for the allocation of a whole
//! chunk, in one extent, and the others only overwrite blocks the file already has. (On a
//! copy-on-write filesystem, btrfs or ZFS, every overwrite takes new blocks anyway: there
//! the zeros gain nothing.)
//!
//! The contents are the same: redb asks that new space read as zeros, and a hole does.
//! The length is redb's: nothing here extends the file, only fills holes below its end.
//!
//! Invariant: zeros are written only at or above `frontier`, and every byte redb has
//! written lies below it. `frontier` is measured at redb's first write, which comes after
//! redb has locked the file ([`written_end`]: where the file's data ends; past it, a hole,
//! which reads as zeros already). It moves up, under its lock, before any redb write that
//! reaches past it; a `set_len` that shrinks the file brings it down to the new end. This
//! holds because this process is the file's only writer: redb's `ExclusiveWriter` mode,
//! which [`create`] sets.
//!
//! Costs: the file takes up to a chunk more disk than its data, so on a nearly full disk
//! a commit can fail for want of space up to a chunk sooner; a fill fails alone (the write
//! goes ahead). A fill runs in whichever thread's write reaches past the frontier: almost
//! always the writer's commit, but redb also writes back evicted dirty pages from a
//! reader's thread now and then.

use std::fs::File;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// What redb's backend methods fail with (its own alias is not public).
type BackendIoError = std::io::Error;

/// How far past a write that reaches beyond the written part the zeros go: 1 MiB, about a
/// tenth of a second of the file's growth under 30,000 single issues a second (some 300
/// bytes each).
pub(super) const CHUNK: u64 = 1 << 20;

/// What zeros are written from: one page at a time, as redb writes. A bigger write makes
/// the kernel cache that part of the file in bigger folios (Linux 6), and a later page
/// written by redb then dirties its whole folio, which the commit's `fdatasync` writes
/// back whole: with 64 KiB pieces, four times the bytes per commit. (Readahead does the
/// same to pages read after a restart; turning it off with `POSIX_FADV_RANDOM` doubled a
/// cold 10,000-row listing's time at 10 million transactions: BENCHMARKS.md, round 14.)
static ZEROS: [u8; 4096] = [0; 4096];

#[derive(Debug)]
pub(super) struct Prefilled<B = FileBackend> {
    inner: B,
    /// The same open file as `inner`'s (a duplicate descriptor, kept as long as it), for
    /// [`written_end`].
    probe: File,
    /// Fast path: a write that ends at or below this needs nothing. Only moved under
    /// `extending`, after the zeros are written.
    frontier: AtomicU64,
    /// Whether `frontier` has been measured ([`written_end`]). Not at open: redb locks the
    /// file after the backend is made, and until then another process may still write it.
    /// The first write comes after redb's lock, and measures it.
    extending: Mutex<bool>,
}

impl Prefilled {
    /// redb's own backend over `file`, with the fill. Nothing is measured or written yet
    /// (see `extending`).
    pub fn new(file: File) -> Result<Prefilled, std::io::Error> {
        let probe = file.try_clone()?;
        let inner = FileBackend::new(file).map_err(std::io::Error::other)?;
        Ok(Prefilled::over(inner, probe))
    }
}

impl<B: StorageBackend> Prefilled<B> {
    fn over(inner: B, probe: File) -> Prefilled<B> {
        Prefilled {
            inner,
            probe,
            frontier: AtomicU64::new(0),
            extending: Mutex::new(false),
        }
    }

    /// Before a write that ends at `end`: writes zeros from the frontier to `end`, and on
    /// to a chunk past the frontier, never past the file's end; moves the frontier there.
    /// The caller's write then overwrites its own part of the zeros. Fails only if the
    /// file's length or data cannot be read.
    fn fill_to(&self, end: u64) -> Result<(), BackendIoError> {
        let mut measured = self
            .extending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !*measured {
            self.frontier
                .store(written_end(&self.probe)?, Ordering::Release);
            *measured = true;
        }
        let from = self.frontier.load(Ordering::Acquire);
        if end <= from {
            return Ok(()); // written already, or another write filled it first
        }
        let to = from.saturating_add(CHUNK).max(end).min(self.inner.len()?);
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            if self.inner.write(at, &ZEROS[..n]).is_err() {
                // The fill is only for speed (a full disk, say): redb's write goes ahead
                // and meets the error itself if there is one. What is left of the hole
                // below `end` reads as zeros, as it should.
                break;
            }
            at += n as u64;
        }
        self.frontier.store(at.max(end), Ordering::Release);
        Ok(())
    }
}

/// Where the file's data ends: past it, the file is one hole up to its end (and reads as
/// zeros). The file's length if the filesystem cannot tell holes (then it has none), or if
/// the file is in more than [`MAX_EXTENTS`] pieces.
///
/// Not just the length: redb doubles its file as it grows (up to 4 GiB, then a region of
/// 4 GiB at a time), so a file that is reopened can end in a hole as big as half of it,
/// which the fill would otherwise leave alone until the file next grows.
fn written_end(file: &File) -> Result<u64, std::io::Error> {
    use rustix::fs::{seek, SeekFrom};
    let len = file.metadata()?.len();
    let mut end = 0;
    for _ in 0..MAX_EXTENTS {
        // Data at or after `end`? (ENXIO: none.) Then the hole after that data.
        let data = match seek(file, SeekFrom::Data(end)) {
            Ok(data) => data,
            Err(rustix::io::Errno::NXIO) => return Ok(end),
            Err(_) => return Ok(len),
        };
        end = match seek(file, SeekFrom::Hole(data)) {
            Ok(hole) if hole > data => hole,
            _ => return Ok(len),
        };
        if end >= len {
            return Ok(len);
        }
    }
    Ok(len)
}

/// How many pieces of data [`written_end`] looks through before it takes the whole file as
/// written: a file written by redb on a filesystem has a few hundred at most.
const MAX_EXTENTS: usize = 100_000;

impl<B: StorageBackend> StorageBackend for Prefilled<B> {
    fn len(&self) -> Result<u64, BackendIoError> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        let _measured = self
            .extending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.inner.set_len(len)?;
        self.frontier.fetch_min(len, Ordering::AcqRel);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), BackendIoError> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        let end = offset.saturating_add(data.len() as u64);
        if end > self.frontier.load(Ordering::Acquire) {
            self.fill_to(end)?;
        }
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), BackendIoError> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

/// Opens the database file at `path` (creating it if need be) on a [`Prefilled`] backend,
/// as `redb::Builder::create` would on its own, for this process alone to write
/// (`ConcurrencyMode::ExclusiveWriter`, redb's default, set here because the backend's
/// invariant needs it).
pub(super) fn create(
    builder: &mut redb::Builder,
    path: &std::path::Path,
) -> Result<redb::Database, redb::DatabaseError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    builder
        .set_concurrency_mode(redb::ConcurrencyMode::ExclusiveWriter)
        .create_with_backend(Prefilled::new(file)?)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use proptest::prelude::*;

    use super::*;

    fn backend(dir: &tempfile::TempDir, content: &[u8]) -> (Prefilled, std::path::PathBuf) {
        with_hole(dir, content, 0)
    }

    /// A backend on a file of `content` and then a hole of `hole` bytes.
    fn with_hole(
        dir: &tempfile::TempDir,
        content: &[u8],
        hole: u64,
    ) -> (Prefilled, std::path::PathBuf) {
        let path = dir.path().join("db");
        std::fs::write(&path, content).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.set_len(content.len() as u64 + hole).unwrap();
        (Prefilled::new(file).unwrap(), path)
    }

    fn contents<B: StorageBackend>(backend: &Prefilled<B>) -> Vec<u8> {
        let mut all = vec![0xEE; backend.len().unwrap() as usize];
        backend.read(0, &mut all).unwrap();
        all
    }

    /// Bytes of the file's blocks on disk.
    fn allocated(path: &std::path::Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn a_write_into_a_hole_fills_a_chunk_ahead_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, path) = backend(&dir, b"");
        backend.set_len(8 * CHUNK).unwrap();
        backend.sync_data().unwrap();
        assert!(allocated(&path) < CHUNK / 2, "set_len left a hole");

        backend.write(0, &[7; 4096]).unwrap();
        backend.sync_data().unwrap();
        assert!(
            allocated(&path) >= CHUNK,
            "{} bytes allocated",
            allocated(&path)
        );
        assert!(
            allocated(&path) < 2 * CHUNK,
            "{} bytes allocated",
            allocated(&path)
        );
        // Writes within the chunk allocate nothing more.
        backend.write(CHUNK - 4096, &[8; 4096]).unwrap();
        backend.sync_data().unwrap();
        assert!(allocated(&path) < 2 * CHUNK);

        let all = contents(&backend);
        assert_eq!(all.len() as u64, 8 * CHUNK, "the length is redb's");
        assert!(all[..4096].iter().all(|&b| b == 7));
        assert!(all[4096..(CHUNK - 4096) as usize].iter().all(|&b| b == 0));
        assert!(all[(CHUNK - 4096) as usize..CHUNK as usize]
            .iter()
            .all(|&b| b == 8));
        assert!(all[CHUNK as usize..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_file_opened_with_a_hole_at_its_end_is_filled_there() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, path) = with_hole(&dir, &[3; 8192], 8 * CHUNK);
        let before = allocated(&path);
        backend.write(8192, &[4; 4096]).unwrap();
        backend.sync_data().unwrap();
        assert_eq!(backend.frontier.load(Ordering::Acquire), 8192 + CHUNK);
        assert!(allocated(&path) >= before + CHUNK - 8192);
        let all = contents(&backend);
        assert!(all[..8192].iter().all(|&b| b == 3));
        assert!(all[8192..12288].iter().all(|&b| b == 4));
        assert!(all[12288..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_frontier_is_measured_at_the_first_write_not_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, path) = with_hole(&dir, &[3; 4096], 4 * CHUNK);
        // Another process still writing the file before redb has locked it.
        use std::os::unix::fs::FileExt;
        let other = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        other.write_all_at(&[6; 4096], CHUNK).unwrap();
        backend.write(4096, &[4; 4096]).unwrap();
        let all = contents(&backend);
        assert_eq!(&all[CHUNK as usize..(CHUNK + 4096) as usize], &[6; 4096]);
        assert_eq!(&all[4096..8192], &[4; 4096]);
    }

    #[test]
    fn the_written_end_is_after_the_last_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        assert_eq!(written_end(&file).unwrap(), 0);
        file.set_len(4 * CHUNK).unwrap();
        assert_eq!(written_end(&file).unwrap(), 0, "all hole");
        use std::os::unix::fs::FileExt;
        file.write_all_at(&[1; 4096], CHUNK).unwrap();
        file.write_all_at(&[1; 4096], 2 * CHUNK).unwrap();
        assert_eq!(written_end(&file).unwrap(), 2 * CHUNK + 4096);
        file.write_all_at(&[1; 4096], 4 * CHUNK - 4096).unwrap();
        assert_eq!(written_end(&file).unwrap(), 4 * CHUNK, "data to the end");
    }

    #[test]
    fn the_fill_stops_at_the_end_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, path) = backend(&dir, b"");
        backend.set_len(3 * 4096).unwrap();
        backend.write(4096, &[1; 4096]).unwrap();
        assert_eq!(backend.len().unwrap(), 3 * 4096);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * 4096);
        let all = contents(&backend);
        assert_eq!(&all[4096..8192], &[1; 4096]);
        assert!(all[..4096].iter().chain(&all[8192..]).all(|&b| b == 0));
    }

    #[test]
    fn a_fill_that_fails_leaves_the_write_to_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, [5; 4096]).unwrap();
        // Read-only: every write fails, the fill's first.
        let backend = Prefilled::new(std::fs::File::open(&path).unwrap()).unwrap();
        backend.set_len(4 * CHUNK).unwrap_err();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4 * CHUNK)
            .unwrap();
        assert!(backend.write(2 * CHUNK, &[9; 4096]).is_err());
        let all = contents(&backend);
        assert_eq!(all.len() as u64, 4 * CHUNK);
        assert!(all[..4096].iter().all(|&b| b == 5));
        assert!(all[4096..].iter().all(|&b| b == 0));
        // The frontier moved past the failed write: nothing retries the fill below it.
        assert_eq!(backend.frontier.load(Ordering::Acquire), 2 * CHUNK + 4096);
    }

    /// redb's file backend, except that it cannot write zeros (as a disk with no room for
    /// the fill might refuse them): the fill fails, redb's own writes do not.
    #[derive(Debug)]
    struct NoZeros(FileBackend);

    impl StorageBackend for NoZeros {
        fn len(&self) -> Result<u64, BackendIoError> {
            self.0.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
            self.0.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
            self.0.set_len(len)
        }
        fn sync_data(&self) -> Result<(), BackendIoError> {
            self.0.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
            if data.iter().all(|&b| b == 0) {
                return Err(std::io::Error::other("no room for zeros"));
            }
            self.0.write(offset, data)
        }
    }

    #[test]
    fn a_fill_that_fails_leaves_the_write_to_go_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, [3; 8192]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.set_len(4 * CHUNK).unwrap();
        let probe = file.try_clone().unwrap();
        let backend = Prefilled::over(NoZeros(FileBackend::new(file).unwrap()), probe);
        backend.write(2 * CHUNK, &[9; 4096]).unwrap();
        assert_eq!(backend.frontier.load(Ordering::Acquire), 2 * CHUNK + 4096);
        backend.write(3 * CHUNK, &[8; 4096]).unwrap();
        backend.write(CHUNK, &[7; 4096]).unwrap(); // below the frontier: no fill
        let all = contents(&backend);
        assert_eq!(all.len() as u64, 4 * CHUNK);
        let at = |o: u64| &all[o as usize..o as usize + 4096];
        assert_eq!(&all[..8192], &[3; 8192]);
        assert_eq!(at(CHUNK), &[7; 4096]);
        assert_eq!(at(2 * CHUNK), &[9; 4096]);
        assert_eq!(at(3 * CHUNK), &[8; 4096]);
        let zeros = all.iter().filter(|&&b| b == 0).count() as u64;
        assert_eq!(
            zeros,
            4 * CHUNK - 8192 - 3 * 4096,
            "everything else reads as zeros"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        SetLen(u64),
        /// At this fraction (of 1,000) of the current length, this many bytes of this value.
        Write(u64, usize, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4 * CHUNK).prop_map(Op::SetLen),
            (0..1000u64, 1..20_000usize, 1..=255u8).prop_map(|(at, n, b)| Op::Write(at, n, b)),
            (0..1000u64, 1..20_000usize, 1..=255u8).prop_map(|(at, n, b)| Op::Write(at, n, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever redb does (grow, shrink, write anywhere within the length), the file
        /// reads back exactly as a plain byte vector would, whose new space is zeros: the
        /// zeros never land on a byte written before, nor on the file's content at open
        /// (which may end in a hole).
        #[test]
        fn the_file_reads_as_a_plain_one(
            initial in proptest::collection::vec(1..=255u8, 0..3 * CHUNK as usize / 2),
            hole in prop_oneof![Just(0), 0..2 * CHUNK],
            ops in proptest::collection::vec(op(), 1..12),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (backend, _) = with_hole(&dir, &initial, hole);
            let mut model = initial;
            model.resize(model.len() + hole as usize, 0);
            for op in ops {
                match op {
                    Op::SetLen(len) => {
                        backend.set_len(len).unwrap();
                        model.resize(len as usize, 0);
                    }
                    Op::Write(at, n, b) => {
                        let len = model.len();
                        if len == 0 {
                            continue;
                        }
                        let at = (len as u64 * at / 1000) as usize;
                        let n = n.min(len - at);
                        backend.write(at as u64, &vec![b; n]).unwrap();
                        model[at..at + n].fill(b);
                    }
                }
                prop_assert_eq!(backend.len().unwrap(), model.len() as u64);
                prop_assert!(contents(&backend) == model, "after {:?}", op);
            }
        }
    }
}
