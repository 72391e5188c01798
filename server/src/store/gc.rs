//! Retention and garbage collection.
//!
//! Two steps, each safe to be cut short by a crash (`docs/store.md` has the argument):
//!
//! 1. **Prune**: delete the metadata of the points the policy drops, then fsync their
//!    directories. A point is gone once its metadata is; pages and chunks are untouched.
//! 2. **Sweep**: compute what is referenced from scratch (every remaining point's root, every
//!    initial-copy checkpoint, every pending point in this process, chunks uploaded since the
//!    oldest pending point began), following every referenced page to its chunks; only when
//!    that walk has fully succeeded, remove whatever is not referenced. Staged chunks (in
//!    `incoming/`, not yet durable) follow the same rule.
//!
//! The whole run holds the store's gate exclusively, so no upload, reference or commit
//! interleaves with it.

use std::collections::HashSet;
use std::path::Path;

use super::damage::Damage;
use super::durable::{self, sync_dir, TMP_PREFIX};
use super::error::StoreError;
use super::format::unhex32;
use super::info::{GcReport, Retention};
use super::layout::{parse_point_file, point_file, CHUNKS, PAGES};
use super::objects;
use super::parts::Parts;
use super::quarantine::{self, Object};

pub(crate) fn retain(
    parts: &Parts,
    damage: &Damage,
    policy: &Retention,
    now_unix_ms: u64,
) -> Result<GcReport, StoreError> {
    let _gate = parts.locks.exclusive();
    let mut report = GcReport::default();
    // Another process reading the store (an export, a restore) may use any point and chunk.
    let Some(_readers) = parts.locks.exclude_readers(&parts.layout)? else {
        tracing::info!("retention deferred: another process is reading the store");
        report.deferred = true;
        return Ok(report);
    };
    prune(parts, damage, policy, now_unix_ms, &mut report)?;
    parts.faults.step("gc.after_prune")?;
    sweep(parts, &mut report)?;
    tracing::info!(
        points = report.points_removed.len(),
        pages = report.pages_removed,
        chunks = report.chunks_removed,
        bytes = report.bytes_freed,
        "retention run"
    );
    Ok(report)
}

/// Step 1. The caller holds the gate exclusively.
pub(crate) fn prune(
    parts: &Parts,
    damage: &Damage,
    policy: &Retention,
    now_unix_ms: u64,
    report: &mut GcReport,
) -> Result<(), StoreError> {
    if policy.keep_last.is_none() && policy.max_age.is_none() {
        return Ok(());
    }
    let in_use: HashSet<(String, u64)> = parts.live().readers.keys().cloned().collect();
    for disk in objects::disk_names_strict(parts)? {
        let ids = objects::point_ids(parts, &disk)?;
        let Some(&latest) = ids.last() else { continue };
        let newest_kept = policy.keep_last.map_or(ids.len(), |n| ids.len().saturating_sub(n));
        let intact = newest_intact(parts, damage, &disk, &ids)?;
        let dir = parts.layout.points_dir(&disk);
        let mut removed = false;
        for (i, &id) in ids.iter().enumerate() {
            if id == latest || Some(id) == intact || i >= newest_kept || in_use.contains(&(disk.clone(), id))
            {
                continue;
            }
            let (info, _) = objects::point_record(parts, &disk, id)?;
            let young = policy
                .max_age
                .is_some_and(|age| now_unix_ms.saturating_sub(info.cut_unix_ms) <= age.as_millis() as u64);
            if young || !info.tags.is_empty() {
                continue;
            }
            parts.faults.step("gc.prune")?;
            report.bytes_freed += durable::remove(parts.m(), &dir.join(point_file(id, "json")))?;
            report.points_removed.push((disk.clone(), id));
            removed = true;
            tracing::info!(disk = %disk, id, generation = info.generation, "point pruned");
        }
        if removed {
            // The deletions must be durable before the sweep removes what only they referenced:
            // otherwise a crash could bring a point back without its pages and chunks.
            sync_dir(parts.m(), &dir)?;
        }
    }
    Ok(())
}

/// The newest point of `ids` (ascending) that depends on no damaged object: while newer points
/// are damaged, it is the newest one that restores whole, and is kept.
fn newest_intact(parts: &Parts, damage: &Damage, disk: &str, ids: &[u64]) -> Result<Option<u64>, StoreError> {
    let record = objects::disk_record(parts, disk)?;
    for &id in ids.iter().rev() {
        match damage.point(parts, &record, id)? {
            None => return Ok(Some(id)),
            Some(reason) => tracing::warn!(disk, id, %reason, "point depends on a damaged object"),
        }
    }
    Ok(None)
}

/// Step 2. The caller holds the gate exclusively.
pub(crate) fn sweep(parts: &Parts, report: &mut GcReport) -> Result<(), StoreError> {
    let mut pages: HashSet<[u8; 32]> = HashSet::new();
    let mut chunks: HashSet<[u8; 32]> = HashSet::new();

    // Mark: roots of every remaining point and checkpoint. A damaged root is quarantined and
    // marks nothing (nothing can read what it named).
    let q = quarantine::list(parts)?;
    for disk in objects::disk_names_strict(parts)? {
        let record = objects::disk_record(parts, &disk)?;
        for id in objects::point_ids(parts, &disk)? {
            let (_, sum) = objects::point_record(parts, &disk, id)?;
            if q.contains(&Object::Root(disk.clone(), id)) {
                continue;
            }
            match objects::load_root(parts, &record, id, &sum) {
                Ok(root) => pages.extend(root.values()),
                Err(e) if e.is_damage() => continue,
                Err(e) => return Err(e),
            }
        }
        if let Some(cp) = objects::read_initial(parts, &record)? {
            pages.extend(cp.root.values());
        }
    }
    // Mark: pending points of this process (also staged chunks they referenced and then
    // overwrote: their commit still promotes them), and chunks uploaded for them.
    {
        let mut live = parts.live();
        for slot in live.pending.values() {
            let st = slot.state.lock().map_err(|_| StoreError::Poisoned)?;
            pages.extend(st.root.values());
            for map in st.dirty.values() {
                chunks.extend(map.chunks());
            }
            chunks.extend(&st.staged);
        }
        chunks.extend(live.protected_uploads());
    }
    // Mark: the chunks of every referenced page. A page that cannot be read stops the run
    // before anything is removed, unless it is damaged: then it is quarantined, and the chunks
    // only it named go (no point can read them without it).
    for page in &pages {
        if q.pages.contains(page) {
            continue;
        }
        match objects::read_page(parts, page) {
            Ok(map) => chunks.extend(map.chunks()),
            Err(e) if e.is_damage() => continue,
            Err(e) => return Err(e),
        }
    }

    // Sweep.
    for shard in 0..=255u8 {
        let dir = parts.layout.shard_dir(PAGES, shard);
        let (removed, bytes, kept) = sweep_dir(parts, &dir, &pages)?;
        report.pages_removed += removed;
        report.bytes_freed += bytes;
        report.pages_kept += kept;
    }
    for shard in 0..=255u8 {
        let dir = parts.layout.shard_dir(CHUNKS, shard);
        let (removed, bytes, kept) = sweep_dir(parts, &dir, &chunks)?;
        report.chunks_removed += removed;
        report.bytes_freed += bytes;
        report.chunks_kept += kept;
    }
    for disk in objects::disk_names_strict(parts)? {
        report.bytes_freed += sweep_disk(parts, &disk)?;
    }
    let (removed, bytes) = sweep_staged(parts, &chunks)?;
    report.staged_removed += removed;
    report.bytes_freed += bytes;
    // Quarantined objects that are healed, or that no remaining point names.
    report.bytes_freed += quarantine::sweep(parts, |o| match o {
        Object::Chunk(h) => chunks.contains(h),
        Object::Page(h) => pages.contains(h),
        Object::Root(disk, id) => {
            parts.m().exists(&parts.layout.points_dir(disk).join(point_file(*id, "json")))
        }
    })?;
    Ok(())
}

/// Drops the staged chunks not in `keep` (uploaded while no generation was open or before the
/// oldest one began, and referenced by none) and removes their files, and any file in
/// `incoming/` no staged chunk names (left by a failed upload: none is in progress now).
fn sweep_staged(parts: &Parts, keep: &HashSet<[u8; 32]>) -> Result<(u64, u64), StoreError> {
    let (mut removed, mut bytes) = (0, 0);
    let dir = parts.layout.incoming_dir();
    let mut live = parts.live();
    let dropped: Vec<[u8; 32]> = live.staged.keys().filter(|h| !keep.contains(*h)).copied().collect();
    for hash in dropped {
        let staged = live.staged.remove(&hash).expect("listed above");
        // Gone already if a promotion moved it to `chunks/`; the chunk sweep removed it there.
        bytes += durable::remove(parts.m(), &staged.path)?;
        removed += 1;
    }
    let named: HashSet<&std::ffi::OsStr> = live.staged.values().filter_map(|s| s.path.file_name()).collect();
    for name in durable::list(parts.m(), &dir)? {
        if !named.contains(std::ffi::OsStr::new(&name)) {
            bytes += durable::remove(parts.m(), &dir.join(&name))?;
        }
    }
    Ok((removed, bytes))
}

/// Removes the objects of a shard directory that are not in `keep`, and temporary files.
fn sweep_dir(parts: &Parts, dir: &Path, keep: &HashSet<[u8; 32]>) -> Result<(u64, u64, u64), StoreError> {
    let (mut removed, mut bytes, mut kept) = (0, 0, 0);
    for name in durable::list(parts.m(), dir)? {
        if name.starts_with(TMP_PREFIX) {
            bytes += durable::remove(parts.m(), &dir.join(&name))?;
            continue;
        }
        let Some(hash) = unhex32(&name) else {
            tracing::warn!(path = %dir.join(&name).display(), "unknown file left alone");
            continue;
        };
        if keep.contains(&hash) {
            kept += 1;
            continue;
        }
        parts.faults.step("gc.delete")?;
        bytes += durable::remove(parts.m(), &dir.join(&name))?;
        removed += 1;
    }
    Ok((removed, bytes, kept))
}

/// Removes roots without metadata (pruned points, interrupted commits) and temporary files.
fn sweep_disk(parts: &Parts, disk: &str) -> Result<u64, StoreError> {
    let mut bytes = 0;
    let dir = parts.layout.points_dir(disk);
    let names = durable::list(parts.m(), &dir)?;
    let with_metadata: HashSet<u64> = names.iter().filter_map(|n| parse_point_file(n, "json")).collect();
    for name in &names {
        let orphan = parse_point_file(name, "root").is_some_and(|id| !with_metadata.contains(&id));
        if orphan || name.starts_with(TMP_PREFIX) {
            parts.faults.step("gc.delete")?;
            bytes += durable::remove(parts.m(), &dir.join(name))?;
        }
    }
    let disk_dir = parts.layout.disk_dir(disk);
    for name in durable::list(parts.m(), &disk_dir)? {
        if name.starts_with(TMP_PREFIX) {
            bytes += durable::remove(parts.m(), &disk_dir.join(name))?;
        }
    }
    Ok(bytes)
}
