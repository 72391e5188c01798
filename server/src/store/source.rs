//! One source per disk (invariant 6): the identity a disk is bound to, and what the store
//! knows about the disk being current.
//!
//! A disk's first session binds it to the source identity its shim drew when protection
//! started (`disks/<name>/source.json`). A session from another identity is refused
//! ([`StoreError::OtherSource`]) unless it asks to re-enroll, which rebinds the disk and makes a
//! resync the next generation: the re-enrolled source's tracking says nothing about the points
//! already here. `disks/<name>/current.json` records that the latest point still equals the
//! disk as of a later time (an interval in which nothing was written makes no point).

use std::sync::PoisonError;

use serde::{Deserialize, Serialize};

use super::durable::{read_bounded, write_atomic};
use super::error::StoreError;
use super::format::{hex, FormatError, MAX_METADATA_BYTES};
use super::info::now_unix_ms;
use super::layout::{CURRENT_FILE, SOURCE_FILE};
use super::objects;
use super::Store;

const SOURCE_FORMAT: &str = "siterep.source";
const CURRENT_FORMAT: &str = "siterep.current";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SourceRecord {
    format: String,
    version: u32,
    disk: String,
    /// 32 hex digits.
    source: String,
    bound_unix_ms: u64,
    /// Set by a re-enrollment: the latest point then (`None`: there was none). Until a newer
    /// point exists, only a resync may build on it.
    #[serde(default)]
    reenrolled_at_point: Option<u64>,
    #[serde(default)]
    reenrolled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct CurrentRecord {
    point: u64,
    as_of_unix_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct CurrentFile {
    format: String,
    version: u32,
    #[serde(flatten)]
    current: CurrentRecord,
}

impl Store {
    /// Binds `disk` (registered) to `source`, or checks that it is bound to it. A disk bound
    /// to another source is refused with [`StoreError::OtherSource`], unless `reenroll`: then
    /// it is rebound (durably) and [`Store::resync_required`] says so until a newer point
    /// exists. A disk with no binding yet (created before bindings existed, or never) is bound
    /// now.
    pub fn bind_source(&self, disk: &str, source: &[u8; 16], reenroll: bool) -> Result<(), StoreError> {
        self.parts.locks.writable("binding a disk's source")?;
        let parts = &*self.parts;
        let _gate = parts.locks.shared();
        let lock = parts.locks.disk(disk);
        let _disk = lock.lock().unwrap_or_else(PoisonError::into_inner);
        objects::disk_record(parts, disk)?;
        let offered = hex(source);
        let existing = read_source(self, disk)?;
        match &existing {
            Some(r) if r.source == offered => return Ok(()),
            Some(r) if !reenroll => {
                return Err(StoreError::OtherSource {
                    disk: disk.to_string(),
                    bound: r.source.clone(),
                    offered,
                })
            }
            Some(r) => {
                tracing::warn!(disk, from = %r.source, to = %offered, "source re-enrolled: the next generation is a resync")
            }
            None => tracing::info!(disk, source = %offered, "disk bound to its source"),
        }
        let latest = objects::latest_point(parts, disk)?.map(|p| p.id);
        let record = SourceRecord {
            format: SOURCE_FORMAT.into(),
            version: 1,
            disk: disk.to_string(),
            source: offered,
            bound_unix_ms: now_unix_ms(),
            reenrolled_at_point: if existing.is_some() { latest } else { None },
            reenrolled: existing.is_some(),
        };
        let json = serde_json::to_vec_pretty(&record).expect("a source record serializes");
        write_atomic(parts.m(), &parts.tmp, &parts.layout.disk_dir(disk), SOURCE_FILE, &[&json], true)
    }

    /// The source a disk is bound to (32 hex digits), if any.
    pub fn source(&self, disk: &str) -> Result<Option<String>, StoreError> {
        Ok(read_source(self, disk)?.map(|r| r.source))
    }

    /// Why the next generation of `disk` must be a resync, if it must: its latest point
    /// depends on a damaged object ([`Store::needs_resync`]), or the source was re-enrolled and
    /// no point was made since.
    pub fn resync_required(&self, disk: &str) -> Result<Option<String>, StoreError> {
        if let Some(why) = self.needs_resync(disk)? {
            return Ok(Some(why));
        }
        let Some(r) = read_source(self, disk)? else { return Ok(None) };
        if !r.reenrolled {
            return Ok(None);
        }
        let latest = objects::latest_point(&self.parts, disk)?.map(|p| p.id);
        Ok((latest.is_some() && latest == r.reenrolled_at_point).then(|| {
            format!(
                "disk {disk} was re-enrolled to source {}: its tracking says nothing about the points here",
                r.source
            )
        }))
    }

    /// Records that `point`, the latest point of `disk`, still equals the disk as of
    /// `as_of_unix_ms`. Refused for any other point. Not synced: losing it on a crash only
    /// shows an older time.
    pub fn record_current(&self, disk: &str, point: u64, as_of_unix_ms: u64) -> Result<(), StoreError> {
        self.parts.locks.writable("recording a current point")?;
        let parts = &*self.parts;
        let _gate = parts.locks.shared();
        let lock = parts.locks.disk(disk);
        let _disk = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let latest = objects::latest_point(parts, disk)?;
        match &latest {
            Some(l) if l.id == point && as_of_unix_ms >= l.cut_unix_ms => {}
            _ => {
                return Err(StoreError::NotLatest {
                    disk: disk.to_string(),
                    point,
                    latest: latest.map(|l| l.id),
                })
            }
        }
        let file = CurrentFile {
            format: CURRENT_FORMAT.into(),
            version: 1,
            current: CurrentRecord { point, as_of_unix_ms },
        };
        let json = serde_json::to_vec_pretty(&file).expect("a current record serializes");
        write_atomic(parts.m(), &parts.tmp, &parts.layout.disk_dir(disk), CURRENT_FILE, &[&json], false)
    }

    /// When the disk was last known to equal its latest point: the latest `record_current`
    /// for that point, else the point's cut. `None` without a point.
    pub fn current_unix_ms(&self, disk: &str) -> Result<Option<u64>, StoreError> {
        let Some(latest) = objects::latest_point(&self.parts, disk)? else { return Ok(None) };
        let path = self.parts.layout.disk_dir(disk).join(CURRENT_FILE);
        let recorded = match read_bounded(self.parts.m(), &path, MAX_METADATA_BYTES, "current record")? {
            Some(buf) => match serde_json::from_slice::<CurrentFile>(&buf) {
                Ok(f) if f.format == CURRENT_FORMAT && f.version == 1 => Some(f.current),
                _ => {
                    tracing::warn!(path = %path.display(), "ignoring an unreadable current record");
                    None
                }
            },
            None => None,
        };
        Ok(Some(match recorded {
            Some(c) if c.point == latest.id => c.as_of_unix_ms.max(latest.cut_unix_ms),
            _ => latest.cut_unix_ms,
        }))
    }
}

fn read_source(store: &Store, disk: &str) -> Result<Option<SourceRecord>, StoreError> {
    let path = store.parts.layout.disk_dir(disk).join(SOURCE_FILE);
    let Some(buf) = read_bounded(store.parts.m(), &path, MAX_METADATA_BYTES, "source record")? else {
        return Ok(None);
    };
    let bad = |source: FormatError| StoreError::Format { path: path.clone(), source };
    let r: SourceRecord = serde_json::from_slice(&buf).map_err(|e| bad(FormatError::Json(e.to_string())))?;
    if r.format != SOURCE_FORMAT {
        return Err(bad(FormatError::BadMagic));
    }
    if r.version != 1 {
        return Err(bad(FormatError::Version(r.version)));
    }
    if r.disk != disk {
        return Err(bad(FormatError::Range("source record disk")));
    }
    if r.source.len() != 32 || !r.source.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad(FormatError::Range("source identity")));
    }
    Ok(Some(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        store.register_disk("d", 1 << 20, 4096).unwrap();
        (dir, store)
    }

    #[test]
    fn a_disk_is_bound_to_its_first_source_and_refuses_another() {
        let (_dir, store) = store();
        store.bind_source("d", &[1; 16], false).unwrap();
        store.bind_source("d", &[1; 16], false).unwrap();
        match store.bind_source("d", &[2; 16], false) {
            Err(StoreError::OtherSource { bound, offered, .. }) => {
                assert_eq!(bound, hex(&[1; 16]));
                assert_eq!(offered, hex(&[2; 16]));
            }
            other => panic!("expected OtherSource, got {other:?}"),
        }
        assert_eq!(store.source("d").unwrap(), Some(hex(&[1; 16])));
        assert_eq!(store.resync_required("d").unwrap(), None);
        // The binding survives a reopen.
        let root = store.root().to_path_buf();
        drop(store);
        let store = Store::open(&root).unwrap();
        assert!(matches!(store.bind_source("d", &[2; 16], false), Err(StoreError::OtherSource { .. })));
    }

    #[test]
    fn a_re_enrollment_rebinds_and_requires_a_resync_until_a_new_point() {
        let (_dir, store) = store();
        store.bind_source("d", &[1; 16], false).unwrap();
        // No point yet: nothing to resync against.
        store.bind_source("d", &[2; 16], true).unwrap();
        assert_eq!(store.resync_required("d").unwrap(), None);
        let mut p = store.begin("d", 1, crate::GenerationKind::InitialFull, None).unwrap();
        p.add_zero(0, 4096).unwrap();
        p.commit(1, crate::Consistency::Crash).unwrap();
        store.bind_source("d", &[3; 16], true).unwrap();
        assert!(store.resync_required("d").unwrap().unwrap().contains("re-enrolled"));
        assert!(matches!(store.bind_source("d", &[2; 16], false), Err(StoreError::OtherSource { .. })));
        let p = store.begin("d", 2, crate::GenerationKind::InitialFull, Some(1)).unwrap();
        p.commit(2, crate::Consistency::Inconsistent).unwrap();
        assert_eq!(store.resync_required("d").unwrap(), None);
    }

    #[test]
    fn current_is_recorded_for_the_latest_point_only() {
        let (_dir, store) = store();
        assert_eq!(store.current_unix_ms("d").unwrap(), None);
        assert!(matches!(store.record_current("d", 1, 5), Err(StoreError::NotLatest { .. })));
        let p = store.begin("d", 1, crate::GenerationKind::InitialFull, None).unwrap();
        p.commit(100, crate::Consistency::Crash).unwrap();
        assert_eq!(store.current_unix_ms("d").unwrap(), Some(100));
        store.record_current("d", 1, 500).unwrap();
        assert_eq!(store.current_unix_ms("d").unwrap(), Some(500));
        assert!(matches!(store.record_current("d", 2, 600), Err(StoreError::NotLatest { .. })));
        // A newer point makes the record stale.
        let p = store.begin("d", 2, crate::GenerationKind::Incremental, Some(1)).unwrap();
        p.commit(700, crate::Consistency::Crash).unwrap();
        assert_eq!(store.current_unix_ms("d").unwrap(), Some(700));
    }
}
