//! Files that only the server's own user may read: the database (it holds the token
//! signing key and the id key), backups of it, and exports.
//!
//! Modes are given at creation, never fixed up after it, so that there is no moment in
//! which another user could open the file. The process umask can only take bits away.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of a file created here: read and write for the owner only.
pub const FILE_MODE: u32 = 0o600;
/// Mode of a folder created here: the owner only.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and any missing parents with mode 0700. Folders that already exist keep
/// their mode: they were made by someone else, for their own reasons.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Creates `path` as a new, empty file with mode 0600, failing with
/// [`io::ErrorKind::AlreadyExists`] if anything is already there.
pub fn create_private_file(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Makes sure the file at `path` exists, creating it empty and owner-only if it does not.
/// An existing file is left as it is.
pub fn ensure_private_file(path: &Path) -> io::Result<()> {
    match create_private_file(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// The permission bits of an existing file that let users other than its owner in, if
/// any: `Some(0o644)` for a world-readable file, `None` for an owner-only one.
pub fn open_to_others(path: &Path) -> io::Result<Option<u32>> {
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    Ok((mode & 0o077 != 0).then_some(mode))
}

/// Writes the file at `path` all at once or not at all: `write` fills a new owner-only
/// file beside it, which is fsynced, then `verify` is given its path, and only if both
/// succeed is it renamed over `path` (and the folder fsynced, so that the rename is
/// durable). On any failure the temporary file is removed and `path` is left as it was.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<(), String>,
    verify: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    let folder = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(folder) => folder,
        None => Path::new("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} is not a file name", path.display()))?;
    let temp = folder.join(format!(".{name}.tmp-{}", crate::store::random_suffix()));
    let mut file =
        create_private_file(&temp).map_err(|e| format!("cannot create {}: {e}", temp.display()))?;
    let done = write(&mut file)
        .and_then(|()| {
            file.sync_all()
                .map_err(|e| format!("cannot write {}: {e}", temp.display()))
        })
        .and_then(|()| verify(&temp))
        .and_then(|()| {
            std::fs::rename(&temp, path)
                .map_err(|e| format!("cannot rename into {}: {e}", path.display()))
        });
    if done.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    done?;
    if let Ok(dir) = std::fs::File::open(folder) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_folders_are_created_owner_only() {
        let dir = tempfile::tempdir().expect("dir");
        let nested = dir.path().join("a/b");
        create_private_dir_all(&nested).expect("dirs");
        for d in [dir.path().join("a"), nested.clone()] {
            let mode = std::fs::metadata(&d).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{}: {mode:o}", d.display());
        }
        let file = nested.join("f");
        ensure_private_file(&file).expect("file");
        assert_eq!(open_to_others(&file).expect("meta"), None);
        ensure_private_file(&file).expect("an existing file is fine");
        assert_eq!(
            create_private_file(&file).map(|_| ()).map_err(|e| e.kind()),
            Err(io::ErrorKind::AlreadyExists)
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(open_to_others(&file).expect("meta"), Some(0o644));
    }
}
