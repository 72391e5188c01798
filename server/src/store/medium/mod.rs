//! Where the store's files live, behind a trait: [`DiskMedium`] is the real file system;
//! [`SimMedium`] is an in-memory tree that simulates a crash, for tests. Each implementation
//! is a module of its own here, below everything else of the store.
//!
//! Media assumptions (see `docs/store.md`, "Medium"): a file's contents are durable only after
//! it is synced (`create` with `sync`, or `syncfs`); a name created, renamed or removed is
//! durable only after its directory is synced (`sync_dir`, or `syncfs`); a crash drops every
//! name change that was not durable and may tear a file whose contents were not durable at
//! 512-byte sector boundaries; nothing durable is lost or changed.
//!
//! Paths are absolute, under the store's directory. The store's lock files are not part of
//! the medium (they are real files beside it, see `Store::open_with_medium`).

mod disk;
mod sim;

use std::io;
use std::path::Path;

pub use disk::DiskMedium;
pub use sim::{SimMedium, SECTOR};

/// The file operations the store makes.
pub trait Medium: Send + Sync {
    /// Creates `dir` and its missing parents. The new names are durable after `sync_dir` of
    /// each parent.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates `path`, which must not exist, holding `parts` in order. With `sync` the
    /// contents are durable on return (not the name).
    fn create(&self, path: &Path, parts: &[&[u8]], sync: bool) -> io::Result<()>;
    /// The length of `path` and its first `limit` bytes, or `None` if it does not exist.
    fn read(&self, path: &Path, limit: u64) -> io::Result<Option<(u64, Vec<u8>)>>;
    /// The length of the file `path`, or `None` if it does not exist.
    fn len(&self, path: &Path) -> io::Result<Option<u64>>;
    /// Whether `path` names a file or a directory.
    fn exists(&self, path: &Path) -> bool;
    /// Whether `path` names a directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// Renames the file `from` to `to`, replacing `to`. Durable after `sync_dir` of both
    /// directories.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes the file `path` (`NotFound` if it does not exist). Durable after `sync_dir`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the names in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Makes everything written before the call durable, contents and names (`syncfs(2)`).
    fn syncfs(&self) -> io::Result<()>;
    /// The names in `dir`, sorted (not recursive; non-UTF-8 names are left out).
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
}
