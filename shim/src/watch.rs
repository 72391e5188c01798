//! What the shim knows about the image it serves: the file or block device may shrink under it,
//! or its path may come to name another file or device than the one open. Either loses data
//! the shim would otherwise serve as holes or zeroes (a read past the end of a file finds
//! nothing, SEEK_DATA calls it a hole) or write to the wrong place (a write past the end of a
//! file extends it; a replaced file's writes go to the old, unlinked inode).
//!
//! [`Watch`] holds where the range still served ends: every request touching
//! `valid_end..served` fails with EIO, checked with one atomic load. It only moves down, once
//! per change found; each change is logged at error level and handed to the listener (the
//! tracker, which requires a resync and reports it in `status`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracker::{ImageChange, ImageChangeKind};

use nbd_proto::Errno;

/// How often the shim looks at its image ([`crate::Backend::spawn_watcher`]).
pub const PERIOD: Duration = Duration::from_millis(100);

/// Called once per change found.
pub type ChangeListener = Box<dyn Fn(&ImageChange) + Send + Sync>;

/// The served range of an image and the changes that cut it short.
pub struct Watch {
    /// The path the image was opened by (absolute); `None` for a virtual image.
    path: Option<PathBuf>,
    served: u64,
    valid_end: AtomicU64,
    change: Mutex<Option<ImageChange>>,
    listener: OnceLock<ChangeListener>,
    /// A `stat` of the path failed other than by its absence (warned once).
    stat_warned: AtomicBool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("path", &self.path)
            .field("served", &self.served)
            .field("valid_end", &self.valid_end)
            .finish()
    }
}

impl Watch {
    pub fn new(path: Option<PathBuf>, served: u64) -> Self {
        Self {
            path,
            served,
            valid_end: AtomicU64::new(served),
            change: Mutex::new(None),
            listener: OnceLock::new(),
            stat_warned: AtomicBool::new(false),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// EIO if `[offset, offset+len)` reaches into a range the image lost.
    #[inline]
    pub fn check(&self, offset: u64, len: u64) -> Result<(), Errno> {
        if offset.saturating_add(len) > self.valid_end.load(Ordering::Relaxed) {
            Err(Errno::Io)
        } else {
            Ok(())
        }
    }

    /// Where the range still served ends.
    pub fn valid_end(&self) -> u64 {
        self.valid_end.load(Ordering::Relaxed)
    }

    /// The last change found, if any.
    pub fn change(&self) -> Option<ImageChange> {
        lock(&self.change).clone()
    }

    /// Sets who hears of changes (once); a change found before hears of it at once.
    pub fn set_listener(&self, listener: ChangeListener) {
        if self.listener.set(listener).is_err() {
            tracing::error!("the image watch already has a listener");
            return;
        }
        if let (Some(c), Some(l)) = (self.change(), self.listener.get()) {
            l(&c);
        }
    }

    /// Records that the image lost everything from `valid` on (`now`: the size of what the
    /// path names now), unless a change already cut the range at least that short.
    pub fn lose(&self, kind: ImageChangeKind, now: Option<u64>, valid: u64) {
        let change = {
            let mut slot = lock(&self.change);
            let valid = valid.min(self.served);
            if valid >= self.valid_end.load(Ordering::Relaxed) {
                return;
            }
            self.valid_end.store(valid, Ordering::Relaxed);
            let change = ImageChange {
                kind,
                path: self.path.as_deref().unwrap_or(Path::new("")).display().to_string(),
                served_bytes: self.served,
                now_bytes: now,
                valid_bytes: valid,
                detected_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            };
            *slot = Some(change.clone());
            change
        };
        tracing::error!(
            image = %change.path,
            old_size = change.served_bytes,
            new_size = ?change.now_bytes,
            kind = ?change.kind,
            "{change}: resync required"
        );
        if let Some(l) = self.listener.get() {
            l(&change);
        }
    }

    /// Warns once that the image's path cannot be looked at.
    pub fn stat_failed(&self, err: &std::io::Error) {
        if !self.stat_warned.swap(true, Ordering::Relaxed) {
            let path = self.path.as_deref().unwrap_or(Path::new("")).display().to_string();
            tracing::warn!(image = %path, "cannot stat the image's path ({err}): a replaced image goes unnoticed");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
