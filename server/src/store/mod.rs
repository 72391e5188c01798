//! The [`Store`]: one directory holding chunks, map pages, disks and their recovery points.
//!
//! The modules, bottom up (each uses only those above it in this list):
//!
//! - values and formats: `info` (public value types), `map` (a region's extents), `format`
//!   (every on-disk format), `error`;
//! - the lower parts: `medium` (where the files are: the file system, or a crash simulator),
//!   `durable` (atomic writes and bounded reads over a medium), `layout` (the path of
//!   everything), `lock` (in-process locks and the writer's and readers' lock files), `live`
//!   (what this process is working on now), `fault` (failure injection for tests), and `parts`,
//!   which bundles them for everything above;
//! - `quarantine` (damaged objects moved aside), `chunk` (verification, staging, promotion),
//!   `objects` (records, roots, pages and chunks read and checked), `damage` (which points
//!   depend on a damaged object);
//! - the work: `pending` (a generation being received), `reader` (reading a point), `hashes`
//!   (block hashes of a point, for a resync), `gc` (retention), `scrub` (verification);
//! - the [`Store`] here on top, and `source` (its methods about a disk's source).

mod chunk;
mod damage;
mod durable;
pub(crate) mod error;
mod fault;
pub(crate) mod format;
mod gc;
pub(crate) mod hashes;
pub(crate) mod info;
mod layout;
mod live;
mod lock;
mod map;
pub mod medium;
mod objects;
mod parts;
pub(crate) mod pending;
pub(crate) mod quarantine;
pub(crate) mod reader;
pub(crate) mod scrub;
mod source;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod tests;

use std::collections::hash_map::Entry;
use std::fs;
use std::path::Path;
use std::sync::{Arc, PoisonError};

use self::damage::Damage;
use self::durable::{read_bounded, sync_dir, write_atomic};
use self::error::StoreError;
use self::format::{
    check_name, check_region_size, check_tag, decode_marker, encode_point_record, max_marker_bytes,
    DiskRecord, FormatError, Root, DISK_FORMAT, MAX_TAGS, VERSION,
};
use self::info::{
    now_unix_ms, DiskInfo, GcReport, GenerationKind, InitialProgress, PointInfo, PointSel, Retention,
    StoreOptions,
};
use self::layout::{point_file, Layout, CHUNKS, DISKS, DISK_FILE, INCOMING, MARKER, PAGES};
use self::live::{PendingState, Staged};
use self::lock::{Access, Locks};
use self::medium::{DiskMedium, Medium};
use self::objects::{check_geometry, check_not_stale};
use self::parts::Parts;
use self::pending::PendingPoint;
use self::reader::PointReader;
use self::scrub::{VerifyOptions, VerifyReport};

/// The recovery site's store: one directory, shared by every disk and agent.
///
/// Every method takes `&self`; the store is `Send + Sync` and cheap to clone (clones share
/// their state). Operations on different disks run in parallel; commits and tag edits of one
/// disk are serialized. One process opens a store directory at a time.
#[derive(Clone)]
pub struct Store {
    parts: Arc<Parts>,
    damage: Arc<Damage>,
}

impl Store {
    /// Opens the store in `root`, creating it (with default [`StoreOptions`]) if the
    /// directory is missing or empty. A directory with other content and no store marker, or a
    /// marker of another format or version, is refused.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Store::open_with(root, &StoreOptions::default())
    }

    /// Like [`Store::open`]; `options` apply only when the store is created.
    ///
    /// One process at a time may open a store this way (the writer: `siterep server`); a
    /// second one gets [`StoreError::Locked`]. Processes that only read use
    /// [`Store::open_reader`], which works beside the writer.
    pub fn open_with(root: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        fs::create_dir_all(root).map_err(StoreError::io("create directory", root))?;
        let medium = DiskMedium::open(root).map_err(StoreError::io("open", root))?;
        Store::open_with_medium(root, options, Arc::new(medium))
    }

    /// Like [`Store::open_with`], with the store's files on `medium` (the real file system is
    /// [`DiskMedium`]; tests use [`crate::SimMedium`]). `root` must exist on the medium; the
    /// lock files are real files in `root`, which must be a real directory.
    pub fn open_with_medium(
        root: &Path,
        options: &StoreOptions,
        medium: Arc<dyn Medium>,
    ) -> Result<Store, StoreError> {
        let m = &*medium;
        let marker = root.join(MARKER);
        let existing = read_bounded(m, &marker, max_marker_bytes(), "store marker")?
            .map(|buf| decode_marker(&buf).map_err(StoreError::format(&marker)))
            .transpose()?;
        let access = Access::writer(root)?;
        let region_size = match existing {
            Some(region_size) => {
                for dir in [CHUNKS, PAGES, DISKS] {
                    if !m.is_dir(&root.join(dir)) {
                        return Err(StoreError::format(root.join(dir))(FormatError::Missing));
                    }
                }
                // Chunks staged by an earlier process were never synced: whatever they hold,
                // nothing may refer to them. (Stores made before staging existed lack the
                // directory.)
                let incoming = root.join(INCOMING);
                m.create_dir_all(&incoming).map_err(StoreError::io("create directory", &incoming))?;
                let mut discarded = 0u64;
                for name in durable::list(m, &incoming)? {
                    durable::remove(m, &incoming.join(name))?;
                    discarded += 1;
                }
                if discarded > 0 {
                    tracing::info!(root = %root.display(), discarded, "unsynced staged chunks discarded");
                }
                // A process that died between a rename and its directory fsync left names that
                // are visible but maybe not durable; make them durable before anything relies
                // on them. (Their contents were synced before the rename.)
                for kind in [CHUNKS, PAGES] {
                    for shard in 0..=255u8 {
                        sync_dir(m, &root.join(kind).join(format!("{shard:02x}")))?;
                    }
                }
                region_size
            }
            None => {
                check_region_size(options.region_size).map_err(StoreError::format(&marker))?;
                layout::create(m, root, options.region_size)?;
                options.region_size
            }
        };
        tracing::debug!(root = %root.display(), region_size, "store open for writing");
        Ok(Store::with_parts(root, region_size, access, medium))
    }

    /// Opens an existing store to read its points (and tag them) while its writer, a running
    /// `siterep server`, goes on: nothing of the writer's is touched, and the writer's retention
    /// waits until this store is dropped. Writing methods return [`StoreError::ReadOnly`].
    pub fn open_reader(root: &Path) -> Result<Store, StoreError> {
        let medium = match DiskMedium::open(root) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NoStore(root.to_path_buf()))
            }
            Err(e) => return Err(StoreError::io("open", root)(e)),
        };
        let marker = root.join(MARKER);
        let Some(buf) = read_bounded(&medium, &marker, max_marker_bytes(), "store marker")? else {
            // No marker: an empty directory holds no store; anything else is not one.
            return Err(match medium.list(root).map(|names| names.is_empty()) {
                Ok(true) => StoreError::NoStore(root.to_path_buf()),
                _ => StoreError::NotAStore(root.to_path_buf()),
            });
        };
        let region_size = decode_marker(&buf).map_err(StoreError::format(&marker))?;
        let access = Access::reader(root)?;
        Ok(Store::with_parts(root, region_size, access, Arc::new(medium)))
    }

    fn with_parts(root: &Path, region_size: u64, access: Access, medium: Arc<dyn Medium>) -> Store {
        let layout = Layout { root: root.to_path_buf(), region_size };
        Store { parts: Arc::new(Parts::new(layout, medium, Locks::new(access))), damage: Arc::default() }
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.parts.layout.root
    }

    /// Bytes of a disk's address space per map page.
    pub fn region_size(&self) -> u64 {
        self.parts.layout.region_size
    }

    /// Registers a disk, or returns it if it exists with the same geometry.
    pub fn register_disk(&self, disk: &str, size: u64, block_size: u32) -> Result<DiskInfo, StoreError> {
        check_name(disk).map_err(|reason| StoreError::InvalidName {
            what: "disk",
            name: disk.to_string(),
            reason,
        })?;
        check_geometry(size, block_size, self.parts.layout.region_size)?;
        self.parts.locks.writable("disk registration")?;
        let parts = &self.parts;
        {
            let _gate = parts.locks.shared();
            let lock = parts.locks.disk(disk);
            let _disk = lock.lock().unwrap_or_else(PoisonError::into_inner);
            match objects::disk_record(parts, disk) {
                Ok(r) if r.size == size && r.block_size == block_size => {}
                // The disk grew: points from now on have the new size, older ones keep theirs
                // (each root records its own).
                Ok(r) if r.block_size == block_size && size > r.size => {
                    let record = DiskRecord { size, ..r.clone() };
                    let json = serde_json::to_vec_pretty(&record).expect("a disk record serializes");
                    write_atomic(
                        parts.m(),
                        &parts.tmp,
                        &parts.layout.disk_dir(disk),
                        DISK_FILE,
                        &[&json],
                        true,
                    )?;
                    tracing::warn!(
                        disk,
                        from = r.size,
                        to = size,
                        "disk grew: the next points have the new size"
                    );
                }
                Ok(r) => {
                    return Err(StoreError::DiskMismatch {
                        disk: disk.to_string(),
                        existing_size: r.size,
                        existing_block_size: r.block_size,
                        size,
                        block_size,
                    })
                }
                Err(StoreError::UnknownDisk(_)) => {
                    let dir = parts.layout.disk_dir(disk);
                    let points = parts.layout.points_dir(disk);
                    parts.m().create_dir_all(&points).map_err(StoreError::io("create directory", &points))?;
                    sync_dir(parts.m(), &dir)?;
                    sync_dir(parts.m(), &parts.layout.disks_dir())?;
                    let record = DiskRecord {
                        format: DISK_FORMAT.into(),
                        version: VERSION,
                        name: disk.to_string(),
                        size,
                        block_size,
                        created_unix_ms: now_unix_ms(),
                    };
                    let json = serde_json::to_vec_pretty(&record).expect("a disk record serializes");
                    write_atomic(parts.m(), &parts.tmp, &dir, DISK_FILE, &[&json], true)?;
                    tracing::info!(disk, size, block_size, "disk registered");
                }
                Err(e) => return Err(e),
            }
        }
        self.disk(disk)
    }

    /// A disk, its latest point and the progress of an interrupted initial copy.
    pub fn disk(&self, disk: &str) -> Result<DiskInfo, StoreError> {
        let r = objects::disk_record(&self.parts, disk)?;
        let latest = objects::latest_point(&self.parts, disk)?;
        let initial = objects::read_initial(&self.parts, &r)?
            .map(|c| InitialProgress { generation: c.generation, next_offset: c.next_offset });
        Ok(DiskInfo { name: r.name, size: r.size, block_size: r.block_size, latest, initial })
    }

    /// Every registered disk, by name.
    pub fn disks(&self) -> Result<Vec<DiskInfo>, StoreError> {
        objects::disk_names(&self.parts)?.iter().map(|d| self.disk(d)).collect()
    }

    /// Why the disk's latest point cannot be restored whole — it depends on a damaged or
    /// quarantined object (its root, a map page or a chunk) — or `None` (also with no point).
    /// The agent should then resync: an incremental on that point fails with
    /// [`StoreError::DamagedBase`], a resync (an initial full copy on it) sends again what is
    /// damaged and makes a whole point. Cheap while nothing is quarantined; otherwise it reads
    /// the point's pages once per change of the quarantine.
    pub fn needs_resync(&self, disk: &str) -> Result<Option<String>, StoreError> {
        let record = objects::disk_record(&self.parts, disk)?;
        let Some(&id) = objects::point_ids(&self.parts, disk)?.last() else { return Ok(None) };
        Ok(self
            .damage
            .point(&self.parts, &record, id)?
            .map(|reason| format!("recovery point {id} is damaged: {reason}")))
    }

    /// Whether a chunk is stored, or staged by this process. A quarantined chunk is not stored:
    /// the answer is no until a new copy is uploaded. (It may still be collected by a
    /// concurrent retention run unless a pending point references it, and a failed sync
    /// discards staged chunks; [`PendingPoint::add_chunk`] or the commit then says so with
    /// [`StoreError::MissingChunk`].)
    pub fn has_chunk(&self, hash: &[u8; 32]) -> bool {
        self.parts.live().staged.contains_key(hash)
            || self.parts.m().exists(&self.parts.layout.chunk_path(hash))
    }

    /// Receives a chunk: `compressed` is zstd, decompressing to `raw_len` bytes whose blake3 is
    /// `hash`. Verified before anything is written (a mismatch is
    /// [`StoreError::CorruptChunk`]), then *staged*: written to `incoming/` without a sync.
    /// It becomes durable when the first [`PendingPoint::commit`] or
    /// [`PendingPoint::checkpoint`] that references it returns; until then only this process
    /// trusts it, and [`Store::open`] discards it. Nothing is written if the chunk is stored
    /// or staged already. Safe when many agents upload the same chunk at once.
    ///
    /// Upload a generation's chunks after [`Store::begin`]: chunks uploaded while a pending
    /// point is open are kept by retention until it ends.
    pub fn put_chunk(&self, hash: &[u8; 32], raw_len: u32, compressed: &[u8]) -> Result<(), StoreError> {
        self.parts.locks.writable("upload")?;
        chunk::verify_upload(hash, raw_len, compressed)?;
        let parts = &self.parts;
        let _gate = parts.locks.shared();
        // The file first, the staged set second (see `chunk::find`). A stored copy counts only
        // if it passes every check (the caller sent the chunk anyway, so reading the stored
        // copy is cheap next to that); a damaged one is quarantined, and this upload is staged
        // and heals it when promoted.
        let stored =
            parts.m().exists(&parts.layout.chunk_path(hash)) && objects::read_chunk(parts, hash).is_ok();
        let epoch = {
            let mut live = parts.live();
            if stored || live.staged.contains_key(hash) {
                live.record_put(*hash);
                return Ok(());
            }
            live.stage_epoch
        };
        let path = chunk::stage(parts, hash, raw_len, compressed)?;
        let mut live = parts.live();
        if live.stage_epoch != epoch {
            drop(live);
            let _ = durable::remove(parts.m(), &path);
            return Err(StoreError::Io {
                op: "stage chunk",
                path,
                source: std::io::Error::other("a failed sync discarded the staged chunks meanwhile"),
            });
        }
        live.record_put(*hash);
        match live.staged.entry(*hash) {
            Entry::Vacant(v) => {
                v.insert(Staged { path, raw_len });
            }
            Entry::Occupied(_) => {
                // A racing upload of the same chunk staged it first; keep one copy.
                drop(live);
                let _ = durable::remove(parts.m(), &path);
            }
        }
        Ok(())
    }

    /// Starts a pending point for `generation` of `disk`. `Incremental` and `Resync` apply on
    /// top of `base`, which must exist and be older; `InitialFull` starts from `base` or, with
    /// none, from an all-zero disk. A generation that already has a point may be begun again:
    /// its commit returns that point.
    pub fn begin(
        &self,
        disk: &str,
        generation: u64,
        kind: GenerationKind,
        base: Option<u64>,
    ) -> Result<PendingPoint, StoreError> {
        let parts = &self.parts;
        parts.locks.writable("generation")?;
        let record = objects::disk_record(parts, disk)?;
        if kind != GenerationKind::InitialFull && base.is_none() {
            return Err(StoreError::BaseRequired(kind));
        }
        let _gate = parts.locks.shared();
        let root = match base {
            Some(b) => {
                let (info, sum) = objects::point_record(parts, disk, b)?;
                if info.generation >= generation {
                    return Err(StoreError::InvalidBase {
                        base: b,
                        base_generation: info.generation,
                        generation,
                    });
                }
                base_root(parts, &self.damage, &record, b, &sum, kind)?
            }
            None => Root::new(),
        };
        check_not_stale(parts, disk, generation)?;
        let state = PendingState::new(root, 0);
        Ok(PendingPoint::start(parts.clone(), record, generation, kind, base, now_unix_ms(), 0, state))
    }

    /// The interrupted initial full copy of `disk`, as of its last checkpoint, or `None`.
    pub fn resume_initial(&self, disk: &str) -> Result<Option<PendingPoint>, StoreError> {
        self.parts.locks.writable("resume")?;
        let parts = &self.parts;
        let record = objects::disk_record(parts, disk)?;
        let _gate = parts.locks.shared();
        let lock = parts.locks.disk(disk);
        let _disk = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(cp) = objects::read_initial(parts, &record)? else { return Ok(None) };
        if objects::point_for_generation(parts, disk, cp.generation)?.is_some() {
            // Committed; the checkpoint outlived the commit by a crash.
            objects::remove_initial(parts, disk)?;
            return Ok(None);
        }
        check_not_stale(parts, disk, cp.generation)?;
        let state = PendingState::new(cp.root, cp.changed_bytes);
        Ok(Some(PendingPoint::start(
            parts.clone(),
            record,
            cp.generation,
            GenerationKind::InitialFull,
            cp.base,
            cp.started_unix_ms,
            cp.next_offset,
            state,
        )))
    }

    /// Every point of a disk, oldest first.
    pub fn points(&self, disk: &str) -> Result<Vec<PointInfo>, StoreError> {
        objects::disk_record(&self.parts, disk)?;
        let ids = objects::point_ids(&self.parts, disk)?;
        ids.iter().map(|&id| Ok(objects::point_record(&self.parts, disk, id)?.0)).collect()
    }

    /// The point committed for `generation`, if any (for an idempotent re-send).
    pub fn point_for_generation(&self, disk: &str, generation: u64) -> Result<Option<PointInfo>, StoreError> {
        objects::disk_record(&self.parts, disk)?;
        objects::point_for_generation(&self.parts, disk, generation)
    }

    /// Opens a point for reading. While the reader lives, retention keeps the point. A damaged
    /// root makes every read of the reader fail (and `block_hashes` answer it as damaged).
    pub fn open_point(&self, disk: &str, point: PointSel) -> Result<PointReader, StoreError> {
        let parts = &self.parts;
        let record = objects::disk_record(parts, disk)?;
        let _gate = parts.locks.shared();
        let id = match point {
            PointSel::Id(id) => id,
            PointSel::Latest => *objects::point_ids(parts, disk)?
                .last()
                .ok_or_else(|| StoreError::NoPoint(disk.to_string()))?,
        };
        let (info, sum) = objects::point_record(parts, disk, id)?;
        // A damaged root fails reads later, not the open: hash queries on the point (a resync)
        // must go on and answer the whole disk as damaged.
        let (root, size) = match objects::load_root_sized(parts, &record, id, &sum) {
            Ok((root, size)) => (Ok(root), size),
            Err(StoreError::Format { path, source }) => (Err((path, source)), record.size),
            Err(e) => return Err(e),
        };
        Ok(PointReader::new(parts.clone(), size, info, root))
    }

    /// Tags a point (idempotent). Tagged points are kept by retention.
    pub fn tag(&self, disk: &str, point: u64, tag: &str) -> Result<(), StoreError> {
        check_tag(tag).map_err(|reason| StoreError::InvalidName {
            what: "tag",
            name: tag.to_string(),
            reason,
        })?;
        self.edit_tags(disk, point, |tags| {
            if tags.iter().any(|(t, _)| t == tag) {
                return Ok(false);
            }
            if tags.len() >= MAX_TAGS {
                return Err(StoreError::TooLarge {
                    what: "tag list",
                    len: tags.len() as u64 + 1,
                    max: MAX_TAGS as u64,
                });
            }
            tags.push((tag.to_string(), now_unix_ms()));
            Ok(true)
        })
    }

    /// Removes a tag from a point (idempotent).
    pub fn untag(&self, disk: &str, point: u64, tag: &str) -> Result<(), StoreError> {
        self.edit_tags(disk, point, |tags| {
            let before = tags.len();
            tags.retain(|(t, _)| t != tag);
            Ok(tags.len() != before)
        })
    }

    fn edit_tags(
        &self,
        disk: &str,
        point: u64,
        edit: impl FnOnce(&mut Vec<(String, u64)>) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let parts = &self.parts;
        objects::disk_record(parts, disk)?;
        // Shared: retention (exclusive) must not delete the record while it is rewritten.
        let _gate = parts.locks.shared();
        let lock = parts.locks.disk(disk);
        let _disk = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut info, root_sum) = objects::point_record(parts, disk, point)?;
        if edit(&mut info.tags)? {
            let json = encode_point_record(&info, &root_sum);
            write_atomic(
                parts.m(),
                &parts.tmp,
                &parts.layout.points_dir(disk),
                &point_file(point, "json"),
                &[&json],
                true,
            )?;
        }
        Ok(())
    }

    /// Reads and checks every root, map page and chunk the selected points name (each once),
    /// quarantines what is damaged, and reports it with the points and disk ranges that depend
    /// on it. Runs beside uploads, commits and retention (see `docs/store.md`, "Verify and
    /// scrub"); in a reader process too.
    pub fn verify(&self, options: &VerifyOptions) -> Result<VerifyReport, StoreError> {
        if options.point.is_some() && options.disk.is_none() {
            return Err(StoreError::InvalidName {
                what: "selection",
                name: "--point".into(),
                reason: "a point is chosen within a disk: give the disk too",
            });
        }
        scrub::verify(&self.parts, options)
    }

    /// Prunes points the policy does not keep (never a disk's latest point, a tagged point or
    /// one being read), then removes every page and chunk no remaining point, checkpoint or
    /// pending point references. Writers wait while it runs.
    pub fn retain(&self, policy: &Retention) -> Result<GcReport, StoreError> {
        self.parts.locks.writable("retention")?;
        gc::retain(&self.parts, &self.damage, policy, now_unix_ms())
    }

    #[cfg(test)]
    pub(crate) fn parts(&self) -> &Arc<Parts> {
        &self.parts
    }

    /// Test-only: make step `at` fail after it has passed `after` times.
    #[cfg(test)]
    pub(crate) fn inject_fault(&self, at: &'static str, after: usize) {
        self.parts.faults.inject(at, after);
    }

    /// Test-only: every step succeeds again.
    #[cfg(test)]
    pub(crate) fn clear_faults(&self) {
        self.parts.faults.clear();
    }
}

/// The root a generation on `base` starts from. An initial full copy (the agent's resync)
/// starts without whatever of the base is damaged: everything if its root is, the region of
/// each quarantined page; the agent's hash queries answer those ranges as unknown, so it sends
/// them all again. Any other kind fails with [`StoreError::DamagedBase`] on a damaged base.
fn base_root(
    parts: &Parts,
    damage: &Damage,
    record: &DiskRecord,
    base: u64,
    sum: &[u8; 32],
    kind: GenerationKind,
) -> Result<Root, StoreError> {
    let full = kind == GenerationKind::InitialFull;
    let damaged = |reason: String| StoreError::DamagedBase { disk: record.name.clone(), point: base, reason };
    let q = quarantine::list(parts)?;
    let mut root = if q.roots.contains(&(record.name.clone(), base)) {
        if !full {
            return Err(damaged("its root is quarantined".into()));
        }
        Root::new()
    } else {
        match objects::load_root(parts, record, base, sum) {
            Ok(root) => root,
            Err(e) if e.is_damage() && full => Root::new(),
            Err(e) if e.is_damage() => return Err(damaged(format!("its root is damaged: {e}"))),
            Err(e) => return Err(e),
        }
    };
    if full {
        root.retain(|_, page| !q.pages.contains(page));
    } else if let Some(reason) = damage.root(parts, &root, q)? {
        return Err(damaged(reason));
    }
    Ok(root)
}
