//! The store's lower parts, which every module above them works with: where its files are
//! ([`Layout`]), what holds them ([`Medium`]), its locks, its live registry, temporary names
//! and failure injection.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::durable::TmpNames;
use super::error::StoreError;
use super::fault::Faults;
use super::layout::Layout;
use super::live::Live;
use super::lock::Locks;
use super::medium::Medium;

pub(crate) struct Parts {
    pub(crate) layout: Layout,
    /// Where the store's files are: every file operation but the lock files goes through it.
    pub(crate) medium: Arc<dyn Medium>,
    pub(crate) locks: Locks,
    live: Mutex<Live>,
    pub(crate) tmp: TmpNames,
    pub(crate) faults: Faults,
}

impl Parts {
    pub(crate) fn new(layout: Layout, medium: Arc<dyn Medium>, locks: Locks) -> Parts {
        Parts {
            layout,
            medium,
            locks,
            live: Mutex::default(),
            tmp: TmpNames::default(),
            faults: Faults::default(),
        }
    }

    /// The medium holding the store's files.
    pub(crate) fn m(&self) -> &dyn Medium {
        &*self.medium
    }

    /// The live registry.
    pub(crate) fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `syncfs(2)` of the store's file system: every write made before the call, data and
    /// metadata, is durable on success.
    pub(crate) fn syncfs(&self) -> Result<(), StoreError> {
        self.medium.syncfs().map_err(StoreError::io("syncfs", &self.layout.root))
    }
}
