//! Durable file operations: atomic replacement (temporary name, fsync, rename, directory fsync)
//! and bounded reads.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{FormatError, StoreError};

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

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(StoreError::io("fsync directory", dir))
}

/// Writes `parts` to `dir/name` atomically: a temporary file is written and fsynced, then
/// renamed over the name. With `sync` the directory is fsynced too, making the name durable;
/// without it the caller syncs the directory later, before anything depends on the name.
pub(crate) fn write_atomic(
    tmp: &TmpNames,
    dir: &Path,
    name: &str,
    parts: &[&[u8]],
    sync: bool,
) -> Result<(), StoreError> {
    let tmp_path = tmp.next(dir);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(StoreError::io("create", &tmp_path))?;
        for p in parts {
            f.write_all(p).map_err(StoreError::io("write", &tmp_path))?;
        }
        f.sync_all().map_err(StoreError::io("fsync", &tmp_path))?;
        let dest = dir.join(name);
        fs::rename(&tmp_path, &dest).map_err(StoreError::io("rename", &dest))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp_path);
    }
    result?;
    if sync {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Reads a whole file of at most `max` bytes; `None` if it does not exist.
pub(crate) fn read_bounded(path: &Path, max: u64, what: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("open", path)(e)),
    };
    let len = f.metadata().map_err(StoreError::io("stat", path))?.len();
    if len > max {
        return Err(StoreError::format(path)(FormatError::TooLong { what, len, max }));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut buf).map_err(StoreError::io("read", path))?;
    if buf.len() as u64 > max {
        return Err(StoreError::format(path)(FormatError::TooLong { what, len: buf.len() as u64, max }));
    }
    Ok(Some(buf))
}

/// Removes a file, returning its size; a file already gone counts as removed with size 0.
pub(crate) fn remove(path: &Path) -> Result<u64, StoreError> {
    let len = match fs::symlink_metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StoreError::io("stat", path)(e)),
    };
    match fs::remove_file(path) {
        Ok(()) => Ok(len),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
        Err(e) => Err(StoreError::io("remove", path)(e)),
    }
}

/// The names in a directory (not recursive).
pub(crate) fn list(dir: &Path) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(StoreError::io("list", dir))? {
        let entry = entry.map_err(StoreError::io("list", dir))?;
        match entry.file_name().into_string() {
            Ok(name) => out.push(name),
            // Nothing of ours has a non-UTF-8 name; leave it alone.
            Err(_) => continue,
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = TmpNames::default();
        write_atomic(&tmp, dir.path(), "f", &[b"one"], true).unwrap();
        write_atomic(&tmp, dir.path(), "f", &[b"tw", b"o"], false).unwrap();
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"two");
        assert_eq!(list(dir.path()).unwrap(), vec!["f".to_string()]);
    }

    #[test]
    fn bounded_read_refuses_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, [0u8; 100]).unwrap();
        assert_eq!(read_bounded(&p, 100, "x").unwrap().unwrap().len(), 100);
        assert!(matches!(
            read_bounded(&p, 99, "x"),
            Err(StoreError::Format { source: FormatError::TooLong { .. }, .. })
        ));
        assert!(read_bounded(&dir.path().join("missing"), 1, "x").unwrap().is_none());
        assert_eq!(remove(&p).unwrap(), 100);
        assert_eq!(remove(&p).unwrap(), 0);
    }
}
