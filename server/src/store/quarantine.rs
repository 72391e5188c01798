//! Quarantine: damaged objects moved out of the way, so nothing references them again.
//!
//! An object (a chunk, a map page or a point's root) that fails its checks on any read — a
//! restore, a hash query, a generation loading its base's page, verification or the scrub —
//! is moved from its place (its *home*) to `quarantine/<kind>/<name>`, and a record
//! `quarantine/<kind>/<name>.json` says why. A missing object gets an empty file there.
//!
//! **The state is where the file is**: an object is quarantined while its quarantine file
//! exists and its home does not. So everything that looks at the home sees it gone:
//! `has_chunk` answers no, `add_chunk` fails with `MissingChunk`, an upload of the same hash
//! is staged and promoted into `chunks/` like any new chunk, and a commit writing a page with
//! the same address writes it again. Once the home exists again the object is *healed*:
//! every point that names it (points name objects by hash) reads the new, verified copy. The
//! promotion then removes the quarantine files; if a crash prevents that, the home still wins
//! and the next sweep removes them.
//!
//! Crash safety: the move is one `rename` followed by `fsync` of both directories; a crash
//! before those leaves the object either at home (found damaged again later) or quarantined,
//! never both or neither. The record is written after the move (atomically): a crash between
//! the two leaves a quarantined object whose reason is unknown.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::durable::{self, sync_dir, write_atomic, TMP_PREFIX};
use super::error::StoreError;
use super::format::{hex, unhex32, MAX_METADATA_BYTES};
use super::info::now_unix_ms;
use super::layout::{parse_point_file, point_file, Layout};
use super::parts::Parts;

const RECORD_FORMAT: &str = "siterep.quarantine";

/// What kind of object of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    Chunk,
    Page,
    Root,
    /// A point's metadata (`points/<id>.json`); never quarantined: it is the point.
    Point,
}

/// One object that can be quarantined.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Object {
    Chunk([u8; 32]),
    Page([u8; 32]),
    Root(String, u64),
}

impl Object {
    pub(crate) fn kind(&self) -> ObjectKind {
        match self {
            Object::Chunk(_) => ObjectKind::Chunk,
            Object::Page(_) => ObjectKind::Page,
            Object::Root(..) => ObjectKind::Root,
        }
    }

    fn dir(kind: ObjectKind) -> &'static str {
        match kind {
            ObjectKind::Chunk => "chunks",
            ObjectKind::Page => "pages",
            ObjectKind::Root | ObjectKind::Point => "roots",
        }
    }

    /// The name in reports: the hash in hex, or `disk/id` for a root.
    pub(crate) fn name(&self) -> String {
        match self {
            Object::Chunk(h) | Object::Page(h) => hex(h),
            Object::Root(disk, id) => format!("{disk}/{id}"),
        }
    }

    /// The file name under `quarantine/<kind>/`.
    fn file_name(&self) -> String {
        match self {
            Object::Chunk(h) | Object::Page(h) => hex(h),
            Object::Root(disk, id) => format!("{disk}.{}", point_file(*id, "root")),
        }
    }

    fn parse(kind: ObjectKind, name: &str) -> Option<Object> {
        match kind {
            ObjectKind::Chunk => unhex32(name).map(Object::Chunk),
            ObjectKind::Page => unhex32(name).map(Object::Page),
            _ => {
                let (disk, stem) = name.strip_suffix(".root")?.rsplit_once('.')?;
                let id = parse_point_file(&format!("{stem}.root"), "root")?;
                Some(Object::Root(disk.to_string(), id))
            }
        }
    }

    /// Where the object lives when it is not quarantined.
    pub(crate) fn home(&self, layout: &Layout) -> PathBuf {
        match self {
            Object::Chunk(h) => layout.chunk_path(h),
            Object::Page(h) => layout.page_path(h),
            Object::Root(disk, id) => layout.points_dir(disk).join(point_file(*id, "root")),
        }
    }

    fn entry(&self, layout: &Layout) -> PathBuf {
        layout.quarantine_dir().join(Object::dir(self.kind())).join(self.file_name())
    }
}

#[derive(Serialize, Deserialize)]
struct Record {
    format: String,
    version: u32,
    kind: ObjectKind,
    object: String,
    reason: String,
    found_unix_ms: u64,
}

/// The objects quarantined now (quarantine file present, home absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Quarantined {
    pub(crate) chunks: BTreeSet<[u8; 32]>,
    pub(crate) pages: BTreeSet<[u8; 32]>,
    pub(crate) roots: BTreeSet<(String, u64)>,
}

impl Quarantined {
    pub(crate) fn contains(&self, o: &Object) -> bool {
        match o {
            Object::Chunk(h) => self.chunks.contains(h),
            Object::Page(h) => self.pages.contains(h),
            Object::Root(d, id) => self.roots.contains(&(d.clone(), *id)),
        }
    }

    pub(crate) fn has_objects(&self) -> bool {
        !(self.chunks.is_empty() && self.pages.is_empty())
    }
}

/// Every quarantine file (healed or not) with its object.
fn entries(parts: &Parts) -> Result<Vec<(Object, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for kind in [ObjectKind::Chunk, ObjectKind::Page, ObjectKind::Root] {
        let dir = parts.layout.quarantine_dir().join(Object::dir(kind));
        if !parts.m().is_dir(&dir) {
            continue;
        }
        for name in durable::list(parts.m(), &dir)? {
            if name.starts_with(TMP_PREFIX) || name.ends_with(".json") {
                continue;
            }
            if let Some(o) = Object::parse(kind, &name) {
                out.push((o, dir.join(name)));
            }
        }
    }
    Ok(out)
}

/// The objects quarantined now.
pub(crate) fn list(parts: &Parts) -> Result<Quarantined, StoreError> {
    let mut q = Quarantined::default();
    for (o, _) in entries(parts)? {
        if o.home(&parts.layout).exists() {
            continue; // healed
        }
        match o {
            Object::Chunk(h) => q.chunks.insert(h),
            Object::Page(h) => q.pages.insert(h),
            Object::Root(d, id) => q.roots.insert((d, id)),
        };
    }
    Ok(q)
}

/// Why `o` was quarantined, from its record.
pub(crate) fn reason(parts: &Parts, o: &Object) -> String {
    let path = json_path(&o.entry(&parts.layout));
    durable::read_bounded(parts.m(), &path, MAX_METADATA_BYTES, "quarantine record")
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
        .map_or_else(
            || "quarantined (no record of why)".to_string(),
            |r| format!("quarantined: {}", r.reason),
        )
}

fn json_path(entry: &Path) -> PathBuf {
    let mut s = entry.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

/// Quarantines `o`, found damaged for `reason`: moves its file to `quarantine/` (or records a
/// missing one), then writes the record. `intact` re-checks a file: if the file moved turns out
/// to pass (a new copy replaced the damaged one meanwhile), it is put back. Failures are
/// logged, not returned: the caller reports the damage either way.
pub(crate) fn quarantine(parts: &Parts, o: &Object, reason: &str, intact: impl Fn(&Path) -> bool) {
    if let Err(e) = try_quarantine(parts, o, reason, intact) {
        tracing::error!(object = %o.name(), kind = ?o.kind(), "cannot quarantine a damaged object: {e}");
    }
}

fn try_quarantine(
    parts: &Parts,
    o: &Object,
    reason: &str,
    intact: impl Fn(&Path) -> bool,
) -> Result<(), StoreError> {
    let home = o.home(&parts.layout);
    let entry = o.entry(&parts.layout);
    let dir = entry.parent().expect("an entry has a directory");
    if !parts.m().is_dir(dir) {
        parts.m().create_dir_all(dir).map_err(StoreError::io("create directory", dir))?;
        sync_dir(parts.m(), &parts.layout.quarantine_dir())?;
        sync_dir(parts.m(), &parts.layout.root)?;
    }
    match parts.m().rename(&home, &entry) {
        Ok(()) => {
            if intact(&entry) {
                // Replaced by a good copy after the damaged one was read: put it back.
                parts.m().rename(&entry, &home).map_err(StoreError::io("rename", &home))?;
                return Ok(());
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            match parts.m().create(&entry, &[], true) {
                Ok(()) => {}
                // Quarantined already (by another reader).
                Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(()),
                Err(e) => return Err(StoreError::io("create", &entry)(e)),
            }
        }
        Err(e) => return Err(StoreError::io("rename", &entry)(e)),
    }
    sync_dir(parts.m(), dir)?;
    if let Some(parent) = home.parent().filter(|p| parts.m().is_dir(p)) {
        sync_dir(parts.m(), parent)?;
    }
    let record = Record {
        format: RECORD_FORMAT.into(),
        version: 1,
        kind: o.kind(),
        object: o.name(),
        reason: reason.to_string(),
        found_unix_ms: now_unix_ms(),
    };
    let json = serde_json::to_vec_pretty(&record).expect("a quarantine record serializes");
    let name = json_path(&entry).file_name().expect("a file name").to_string_lossy().into_owned();
    write_atomic(parts.m(), &parts.tmp, dir, &name, &[&json], true)?;
    tracing::warn!(kind = ?o.kind(), object = %o.name(), %reason, "damaged object quarantined");
    Ok(())
}

/// Removes the quarantine files of `o` after its home was made durable again (healed). Not
/// synced: should the removal be lost, the home still says the object is healed.
pub(crate) fn clear(parts: &Parts, o: &Object) -> Result<(), StoreError> {
    let entry = o.entry(&parts.layout);
    let json = json_path(&entry);
    if parts.m().exists(&entry) || parts.m().exists(&json) {
        durable::remove(parts.m(), &entry)?;
        durable::remove(parts.m(), &json)?;
        tracing::info!(kind = ?o.kind(), object = %o.name(), "quarantined object healed by a new copy");
    }
    Ok(())
}

/// Sweep: removes the quarantine files of objects that are healed or that `keep` does not
/// name any more (no remaining point references them), and records without a file.
pub(crate) fn sweep(parts: &Parts, keep: impl Fn(&Object) -> bool) -> Result<u64, StoreError> {
    let mut bytes = 0;
    for (o, path) in entries(parts)? {
        if parts.m().exists(&o.home(&parts.layout)) || !keep(&o) {
            bytes += durable::remove(parts.m(), &path)?;
            bytes += durable::remove(parts.m(), &json_path(&path))?;
        }
    }
    for kind in [ObjectKind::Chunk, ObjectKind::Page, ObjectKind::Root] {
        let dir = parts.layout.quarantine_dir().join(Object::dir(kind));
        if !parts.m().is_dir(&dir) {
            continue;
        }
        for name in durable::list(parts.m(), &dir)? {
            let orphan = name.strip_suffix(".json").is_some_and(|stem| !parts.m().exists(&dir.join(stem)));
            if orphan || name.starts_with(TMP_PREFIX) {
                bytes += durable::remove(parts.m(), &dir.join(name))?;
            }
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn entry_names_round_trip() {
        for o in [Object::Chunk([7; 32]), Object::Page([0xab; 32]), Object::Root("vm.1-a".into(), 42)] {
            assert_eq!(Object::parse(o.kind(), &o.file_name()), Some(o.clone()), "{o:?}");
        }
        assert_eq!(Object::parse(ObjectKind::Root, "vm.42.root"), None);
        assert_eq!(Object::parse(ObjectKind::Chunk, "zz"), None);
    }

    #[test]
    fn a_home_that_exists_again_means_healed_and_the_sweep_removes_the_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(&dir.path().join("s")).unwrap();
        let parts = store.parts();
        let o = Object::Chunk([5; 32]);
        let home = o.home(&parts.layout);
        fs::write(&home, b"damaged").unwrap();
        quarantine(parts, &o, "test", |_| false);
        assert!(
            !home.exists() && o.entry(&parts.layout).exists() && json_path(&o.entry(&parts.layout)).exists()
        );
        assert!(list(parts).unwrap().contains(&o));
        assert!(reason(parts, &o).contains("test"));
        // A crash after a promotion made the home durable, before the files were removed.
        fs::write(&home, b"a good copy").unwrap();
        assert!(!list(parts).unwrap().contains(&o), "the home wins");
        sweep(parts, |_| true).unwrap();
        assert!(!o.entry(&parts.layout).exists() && !json_path(&o.entry(&parts.layout)).exists());
        // A copy that passes after the move (replaced meanwhile) is put back.
        quarantine(parts, &o, "test", |_| true);
        assert!(home.exists() && !o.entry(&parts.layout).exists());
    }
}
