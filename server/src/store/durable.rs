//! Durable file operations: atomic replacement (temporary name, fsync, rename, directory fsync)
//! and bounded reads.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::StoreError;
use super::format::FormatError;
use super::medium::Medium;

/// Temporary files start with this; a sweep removes any it finds (none are in use then).
pub(crate) const TMP_PREFIX: &str = ".tmp.";

/// Hands out unique temporary names within the process.
#[derive(Debug, Default)]
pub(crate) struct TmpNames(AtomicU64);

impl TmpNames {
    fn next(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{TMP_PREFIX}{}.{}", std::process::id(), self.next_id()))
    }

    /// A number not handed out before in this process (also used for staged chunk names).
    pub(crate) fn next_id(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

pub(crate) fn sync_dir(m: &dyn Medium, dir: &Path) -> Result<(), StoreError> {
    m.sync_dir(dir).map_err(StoreError::io("fsync directory", dir))
}

/// Writes `parts` to `dir/name` atomically: a temporary file is written and fsynced, then
/// renamed over the name. With `sync` the directory is fsynced too, making the name durable;
/// without it the caller syncs the directory later, before anything depends on the name.
pub(crate) fn write_atomic(
    m: &dyn Medium,
    tmp: &TmpNames,
    dir: &Path,
    name: &str,
    parts: &[&[u8]],
    sync: bool,
) -> Result<(), StoreError> {
    let mut tmp_path = tmp.next(dir);
    let mut created = m.create(&tmp_path, parts, true);
    // A temporary name of this process that exists already is a leftover of an earlier process
    // that had the same id (before a reboot): it is left to the sweep and another name is used.
    for _ in 0..16 {
        match &created {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                tmp_path = tmp.next(dir);
                created = m.create(&tmp_path, parts, true);
            }
            _ => break,
        }
    }
    let result = created.map_err(StoreError::io("create", &tmp_path)).and_then(|()| {
        let dest = dir.join(name);
        m.rename(&tmp_path, &dest).map_err(StoreError::io("rename", &dest))
    });
    if result.is_err() {
        let _ = m.remove_file(&tmp_path);
    }
    result?;
    if sync {
        sync_dir(m, dir)?;
    }
    Ok(())
}

/// Reads a whole file of at most `max` bytes; `None` if it does not exist.
pub(crate) fn read_bounded(
    m: &dyn Medium,
    path: &Path,
    max: u64,
    what: &'static str,
) -> Result<Option<Vec<u8>>, StoreError> {
    let Some((len, buf)) = m.read(path, max.saturating_add(1)).map_err(StoreError::io("read", path))? else {
        return Ok(None);
    };
    if len > max || buf.len() as u64 > max {
        let len = len.max(buf.len() as u64);
        return Err(StoreError::format(path)(FormatError::TooLong { what, len, max }));
    }
    Ok(Some(buf))
}

/// Removes a file, returning its size; a file already gone counts as removed with size 0.
pub(crate) fn remove(m: &dyn Medium, path: &Path) -> Result<u64, StoreError> {
    let Some(len) = m.len(path).map_err(StoreError::io("stat", path))? else { return Ok(0) };
    match m.remove_file(path) {
        Ok(()) => Ok(len),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
        Err(e) => Err(StoreError::io("remove", path)(e)),
    }
}

/// The names in a directory (not recursive).
pub(crate) fn list(m: &dyn Medium, dir: &Path) -> Result<Vec<String>, StoreError> {
    m.list(dir).map_err(StoreError::io("list", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::medium::DiskMedium;
    use std::fs;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let m = DiskMedium::open(dir.path()).unwrap();
        let tmp = TmpNames::default();
        write_atomic(&m, &tmp, dir.path(), "f", &[b"one"], true).unwrap();
        write_atomic(&m, &tmp, dir.path(), "f", &[b"tw", b"o"], false).unwrap();
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"two");
        assert_eq!(list(&m, dir.path()).unwrap(), vec!["f".to_string()]);
    }

    #[test]
    fn bounded_read_refuses_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let m = DiskMedium::open(dir.path()).unwrap();
        let p = dir.path().join("f");
        fs::write(&p, [0u8; 100]).unwrap();
        assert_eq!(read_bounded(&m, &p, 100, "x").unwrap().unwrap().len(), 100);
        assert!(matches!(
            read_bounded(&m, &p, 99, "x"),
            Err(StoreError::Format { source: FormatError::TooLong { .. }, .. })
        ));
        assert!(read_bounded(&m, &dir.path().join("missing"), 1, "x").unwrap().is_none());
        assert_eq!(remove(&m, &p).unwrap(), 100);
        assert_eq!(remove(&m, &p).unwrap(), 0);
    }
}
