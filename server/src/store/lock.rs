//! Who may do what at once: within the process the gate (shared by everything that creates
//! files or references, exclusive for retention), the promotion lock and one lock per disk;
//! across processes the store's lock files (one writer, any number of readers, see
//! `docs/store.md`, "Processes").

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::error::StoreError;
use super::layout::{Layout, READERS_LOCK, WRITER_LOCK};

/// How this process holds the store (see [`Store::open`](crate::Store::open) and
/// [`Store::open_reader`](crate::Store::open_reader)).
pub(crate) enum Access {
    /// The writer: holds [`WRITER_LOCK`]; `readers` is [`READERS_LOCK`], locked exclusively
    /// only while retention runs.
    Writer { _lock: Flock<File>, readers: File },
    /// A reader: holds [`READERS_LOCK`] shared.
    Reader { _lock: Flock<File> },
}

impl Access {
    /// Takes the writer's lock of the store in `root`; [`StoreError::Locked`] while another
    /// process writes it.
    pub(crate) fn writer(root: &Path) -> Result<Access, StoreError> {
        let lock_path = root.join(WRITER_LOCK);
        let lock = match Flock::lock(lock_file(&lock_path)?, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, Errno::EWOULDBLOCK)) => return Err(StoreError::Locked(root.to_path_buf())),
            Err((_, e)) => return Err(StoreError::io("lock", &lock_path)(e.into())),
        };
        let readers = lock_file(&root.join(READERS_LOCK))?;
        Ok(Access::Writer { _lock: lock, readers })
    }

    /// Takes a reader's lock of the store in `root`. Blocks while a retention run is pruning
    /// or sweeping (seconds at most).
    pub(crate) fn reader(root: &Path) -> Result<Access, StoreError> {
        let path = root.join(READERS_LOCK);
        let lock = Flock::lock(lock_file(&path)?, FlockArg::LockShared)
            .map_err(|(_, e)| StoreError::io("lock", &path)(e.into()))?;
        Ok(Access::Reader { _lock: lock })
    }
}

/// Opens (creating) one of the store's lock files.
fn lock_file(path: &Path) -> Result<File, StoreError> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(StoreError::io("open", path))
}

/// The store's locks.
pub(crate) struct Locks {
    /// Shared by every operation that creates files or references; exclusive for retention.
    gate: RwLock<()>,
    /// Serializes promotions of staged chunks into `chunks/`.
    promotion: Mutex<()>,
    disks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    access: Access,
}

impl Locks {
    pub(crate) fn new(access: Access) -> Locks {
        Locks { gate: RwLock::new(()), promotion: Mutex::new(()), disks: Mutex::default(), access }
    }

    /// Refuses `op` in a process that opened the store for reading.
    pub(crate) fn writable(&self, op: &'static str) -> Result<(), StoreError> {
        match self.access {
            Access::Writer { .. } => Ok(()),
            Access::Reader { .. } => Err(StoreError::ReadOnly(op)),
        }
    }

    /// Retention's cross-process exclusion: `None` while another process reads the store.
    pub(crate) fn exclude_readers(&self, layout: &Layout) -> Result<Option<Flock<File>>, StoreError> {
        let Access::Writer { readers, .. } = &self.access else {
            return Err(StoreError::ReadOnly("retention"));
        };
        let path = layout.root.join(READERS_LOCK);
        let file = readers.try_clone().map_err(StoreError::io("dup", &path))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(StoreError::io("lock", &path)(e.into())),
        }
    }

    pub(crate) fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Held while staged chunks are synced and moved into `chunks/`. Taken after the gate, a
    /// disk lock and a pending point's state; the live registry may be taken inside it.
    pub(crate) fn promotion(&self) -> MutexGuard<'_, ()> {
        self.promotion.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lock serializing commits, checkpoints and tag edits of one disk. Take it after
    /// [`Locks::shared`], never the other way round.
    pub(crate) fn disk(&self, disk: &str) -> Arc<Mutex<()>> {
        let mut locks = self.disks.lock().unwrap_or_else(PoisonError::into_inner);
        locks.entry(disk.to_string()).or_default().clone()
    }
}
