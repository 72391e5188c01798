//! A generation being received: extents applied copy-on-write to the base point's map, then
//! committed as a new recovery point.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::chunk::{self, Found};
use super::durable::{sync_dir, write_atomic};
use super::error::StoreError;
use super::format::{encode_initial, encode_point_record, encode_root, hex, DiskRecord, InitialCheckpoint};
use super::info::now_unix_ms;
use super::info::{Consistency, GenerationKind, PointInfo};
use super::layout::{point_file, INITIAL_FILE, PAGES};
use super::live::PendingState;
use super::map::{DataRef, RegionMap};
use super::objects;
use super::parts::Parts;

/// Regions held in memory before their pages are written out early (bounds a pending point's
/// memory: a region's map is at most `region_size / 512` extents).
pub(crate) const MAX_DIRTY_REGIONS: usize = 32;

/// A generation being received. Dropping it without [`PendingPoint::commit`] abandons it
/// (an initial full copy can be resumed from its last [`PendingPoint::checkpoint`]).
pub struct PendingPoint {
    parts: Arc<Parts>,
    token: u64,
    disk: DiskRecord,
    generation: u64,
    kind: GenerationKind,
    base: Option<u64>,
    started_unix_ms: u64,
    next_offset: u64,
    state: Arc<Mutex<PendingState>>,
}

impl std::fmt::Debug for PendingPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingPoint")
            .field("disk", &self.disk.name)
            .field("generation", &self.generation)
            .field("kind", &self.kind)
            .field("base", &self.base)
            .field("next_offset", &self.next_offset)
            .finish_non_exhaustive()
    }
}

impl PendingPoint {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        parts: Arc<Parts>,
        disk: DiskRecord,
        generation: u64,
        kind: GenerationKind,
        base: Option<u64>,
        started_unix_ms: u64,
        next_offset: u64,
        state: PendingState,
    ) -> PendingPoint {
        let state = Arc::new(Mutex::new(state));
        let token = parts.live().add_pending(state.clone());
        tracing::debug!(disk = %disk.name, generation, ?kind, ?base, next_offset, "generation begun");
        PendingPoint { parts, token, disk, generation, kind, base, started_unix_ms, next_offset, state }
    }

    pub fn disk(&self) -> &str {
        &self.disk.name
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn kind(&self) -> GenerationKind {
        self.kind
    }

    pub fn base(&self) -> Option<u64> {
        self.base
    }

    /// Where an initial full copy continues: 0, or the offset of the last checkpoint.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// What a damaged page of the base means for this generation.
    fn on_damage(&self) -> OnDamage<'_> {
        match (self.kind, self.base) {
            (GenerationKind::InitialFull, _) | (_, None) => OnDamage::StartEmpty,
            (_, Some(point)) => OnDamage::Fail { disk: &self.disk.name, point },
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, PendingState>, StoreError> {
        self.state.lock().map_err(|_: PoisonError<_>| StoreError::Poisoned)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let size = self.disk.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(StoreError::OutOfRange { offset, len, size });
        }
        let bs = u64::from(self.disk.block_size);
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(StoreError::Unaligned { offset, len, block_size: self.disk.block_size });
        }
        Ok(())
    }

    /// Maps `[offset, offset + len)` to the chunk `hash`, which must be stored or staged by
    /// this process and hold exactly `len` bytes. Overrides whatever this generation or the
    /// base had there. A staged chunk is made durable by the next checkpoint or the commit.
    pub fn add_chunk(&mut self, offset: u64, len: u32, hash: [u8; 32]) -> Result<(), StoreError> {
        self.check_range(offset, len.into())?;
        if len == 0 {
            return Err(StoreError::ChunkLength { hash, stored: 0, given: 0 });
        }
        let parts = &*self.parts;
        // Held from the existence check until the reference is recorded, so a retention run
        // cannot remove the chunk in between.
        let _gate = parts.locks.shared();
        let (raw_len, staged) = match chunk::find(parts, &hash)? {
            Some(Found::Durable(n)) => (n, false),
            Some(Found::Staged(n)) => (n, true),
            None => return Err(StoreError::MissingChunk(hash)),
        };
        if raw_len != len {
            return Err(StoreError::ChunkLength { hash, stored: raw_len, given: len });
        }
        let mut st = self.lock()?;
        if staged {
            st.staged.insert(hash);
        }
        for (region, start, end, delta) in pieces(parts.layout.region_size, offset, len.into()) {
            let map = region_mut(parts, &mut st, region, self.on_damage())?;
            let chunk_offset = u32::try_from(delta).expect("within a chunk");
            map.put(start, DataRef { len: end - start, chunk: hash, chunk_offset });
        }
        st.changed_bytes += u64::from(len);
        spill_if_large(parts, &mut st)
    }

    /// Makes `[offset, offset + len)` read as zeroes, overriding earlier data.
    pub fn add_zero(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check_range(offset, len)?;
        let parts = &*self.parts;
        let _gate = parts.locks.shared();
        let mut st = self.lock()?;
        for (region, start, end, _) in pieces(parts.layout.region_size, offset, len) {
            if !st.dirty.contains_key(&region) && !st.root.contains_key(&region) {
                continue; // already reads as zeroes
            }
            if start == 0 && u64::from(end) == parts.layout.region_size {
                st.dirty.insert(region, RegionMap::default());
            } else {
                region_mut(parts, &mut st, region, self.on_damage())?.punch(start, end);
            }
        }
        st.changed_bytes += len;
        spill_if_large(parts, &mut st)
    }

    /// Initial full copies only: durably records the extents so far and `next_offset`, so
    /// that [`Store::resume_initial`](crate::Store::resume_initial) continues from there after
    /// a crash or disconnect.
    pub fn checkpoint(&mut self, next_offset: u64) -> Result<(), StoreError> {
        if self.kind != GenerationKind::InitialFull {
            return Err(StoreError::NotInitial);
        }
        if next_offset > self.disk.size {
            return Err(StoreError::OutOfRange { offset: next_offset, len: 0, size: self.disk.size });
        }
        let parts = &*self.parts;
        let _gate = parts.locks.shared();
        let lock = parts.locks.disk(&self.disk.name);
        let _disk = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut st = self.lock()?;
        // The checkpoint outlives this process: everything it references must be durable.
        chunk::promote(parts, &st.staged)?;
        st.staged.clear();
        flush(parts, &mut st)?;
        let cp = InitialCheckpoint {
            generation: self.generation,
            base: self.base,
            next_offset,
            started_unix_ms: self.started_unix_ms,
            changed_bytes: st.changed_bytes,
            root: st.root.clone(),
        };
        let buf = encode_initial(&cp, self.disk.size, parts.layout.region_size);
        write_atomic(
            parts.m(),
            &parts.tmp,
            &parts.layout.disk_dir(&self.disk.name),
            INITIAL_FILE,
            &[&buf],
            true,
        )?;
        drop(st);
        self.next_offset = next_offset;
        tracing::debug!(disk = %self.disk.name, generation = self.generation, next_offset, "initial copy checkpoint");
        Ok(())
    }

    /// Makes the generation a recovery point: makes the staged chunks it references durable
    /// (one `syncfs`, then renamed into the store), writes its new map pages and root, syncs
    /// them, then writes the point's metadata and renames it into place last. Returns once the
    /// point is durable. If the generation already has a point, returns that one. A referenced
    /// chunk that a failed sync discarded meanwhile is [`StoreError::MissingChunk`].
    pub fn commit(self, cut_unix_ms: u64, consistency: Consistency) -> Result<PointInfo, StoreError> {
        self.commit_with_digest(cut_unix_ms, consistency, None)
    }

    /// [`PendingPoint::commit`], recording `digest`, the source's digest of what the
    /// generation contains. If the generation already has a point whose digest differs, two
    /// sources diverged under one identity: [`StoreError::Diverged`], and nothing is written.
    pub fn commit_with_digest(
        self,
        cut_unix_ms: u64,
        consistency: Consistency,
        digest: Option<[u8; 32]>,
    ) -> Result<PointInfo, StoreError> {
        let parts = &*self.parts;
        let disk = &self.disk.name;
        let _gate = parts.locks.shared();
        let lock = parts.locks.disk(disk);
        let _disk = lock.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = objects::point_for_generation(parts, disk, self.generation)? {
            existing.check_digest(digest.as_ref())?;
            tracing::info!(disk = %disk, generation = self.generation, id = existing.id, "generation already committed");
            return Ok(existing);
        }
        let latest = objects::latest_point(parts, disk)?;
        if let Some(l) = &latest {
            if l.generation > self.generation {
                return Err(StoreError::StaleGeneration {
                    disk: disk.clone(),
                    generation: self.generation,
                    latest: l.generation,
                });
            }
        }
        let id = latest.map_or(1, |l| l.id + 1);
        let mut st = self.lock()?;
        chunk::promote(parts, &st.staged)?;
        st.staged.clear();
        flush(parts, &mut st)?;
        let dir = parts.layout.points_dir(disk);
        let (root, root_sum) = encode_root(self.disk.size, parts.layout.region_size, &st.root);
        write_atomic(parts.m(), &parts.tmp, &dir, &point_file(id, "root"), &[&root], true)?;
        parts.faults.step("commit.before_metadata")?;
        let info = PointInfo {
            disk: disk.clone(),
            id,
            generation: self.generation,
            kind: self.kind,
            base: self.base,
            cut_unix_ms,
            consistency,
            created_unix_ms: now_unix_ms(),
            tags: Vec::new(),
            changed_bytes: st.changed_bytes,
            digest: digest.as_ref().map(|d| hex(d)),
        };
        let json = encode_point_record(&info, &root_sum);
        write_atomic(parts.m(), &parts.tmp, &dir, &point_file(id, "json"), &[&json], true)?;
        tracing::info!(
            disk = %disk, id, generation = self.generation, kind = ?self.kind,
            changed_bytes = st.changed_bytes, regions = st.root.len(), "recovery point committed"
        );
        drop(st);
        if self.kind == GenerationKind::InitialFull {
            // The point is durable; the checkpoint of its copy is no longer needed. A failure
            // here leaves a stale checkpoint that resume_initial removes.
            match objects::read_initial(parts, &self.disk) {
                Ok(Some(cp)) if cp.generation == self.generation => {
                    if let Err(e) = objects::remove_initial(parts, disk) {
                        tracing::warn!(disk = %disk, "removing the initial checkpoint: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(disk = %disk, "reading the initial checkpoint: {e}"),
            }
        }
        Ok(info)
    }
}

impl PointInfo {
    /// Checks that `digest`, the digest of a generation sent again, is this point's: a
    /// different one means another source made this point ([`StoreError::Diverged`]). A side
    /// without a digest is not compared.
    pub fn check_digest(&self, digest: Option<&[u8; 32]>) -> Result<(), StoreError> {
        match (digest.map(|d| hex(d)), &self.digest) {
            (Some(sent), Some(have)) if &sent != have => Err(StoreError::Diverged {
                disk: self.disk.clone(),
                generation: self.generation,
                point: self.id,
                committed: have.clone(),
                sent,
            }),
            _ => Ok(()),
        }
    }
}

impl Drop for PendingPoint {
    fn drop(&mut self) {
        self.parts.live().remove_pending(self.token);
    }
}

/// Splits `[offset, offset + len)` by region: (region, start and end within it, distance of
/// the piece from `offset`).
fn pieces(region_size: u64, offset: u64, len: u64) -> impl Iterator<Item = (u32, u32, u32, u64)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let region = at / region_size;
        let region_start = region * region_size;
        let piece_end = end.min(region_start + region_size);
        let item = (
            u32::try_from(region).expect("regions bounded by MAX_REGIONS"),
            (at - region_start) as u32,
            (piece_end - region_start) as u32,
            at - offset,
        );
        at = piece_end;
        Some(item)
    })
}

/// What a generation does when the page of a region it changes is damaged (the page is
/// quarantined either way).
enum OnDamage<'a> {
    /// An initial full copy (the agent's resync): the region starts empty; the agent sends all
    /// of it, as the base's hashes answer it as damaged.
    StartEmpty,
    /// An incremental or resync: [`StoreError::DamagedBase`], the agent must resync.
    Fail { disk: &'a str, point: u64 },
}

/// The in-memory map of a region, loaded from its page on first change.
fn region_mut<'a>(
    parts: &Parts,
    st: &'a mut PendingState,
    region: u32,
    on_damage: OnDamage<'_>,
) -> Result<&'a mut RegionMap, StoreError> {
    if !st.dirty.contains_key(&region) {
        let map = match st.root.get(&region) {
            Some(page) => match (objects::read_page(parts, page), on_damage) {
                (Ok(map), _) => map,
                (Err(e), OnDamage::StartEmpty) if e.is_damage() => {
                    tracing::warn!(
                        region,
                        "the base's map page of this region is damaged ({e}): starting it empty"
                    );
                    RegionMap::default()
                }
                (Err(e), OnDamage::Fail { disk, point }) if e.is_damage() => {
                    return Err(StoreError::DamagedBase {
                        disk: disk.to_string(),
                        point,
                        reason: format!("the map page of region {region} is damaged: {e}"),
                    })
                }
                (Err(e), _) => return Err(e),
            },
            None => RegionMap::default(),
        };
        st.dirty.insert(region, map);
    }
    Ok(st.dirty.get_mut(&region).expect("just inserted"))
}

/// Writes out the pages of the changed regions into the root (data durable, names not yet).
fn write_pages(parts: &Parts, st: &mut PendingState) -> Result<(), StoreError> {
    while let Some((&region, map)) = st.dirty.first_key_value() {
        if map.is_empty() {
            st.root.remove(&region);
        } else {
            let page = objects::write_page(parts, map)?;
            st.unsynced.insert(page[0]);
            st.root.insert(region, page);
        }
        st.dirty.remove(&region);
    }
    Ok(())
}

/// Writes out the changed regions and syncs the page directories: every page the root names is
/// durable on return.
fn flush(parts: &Parts, st: &mut PendingState) -> Result<(), StoreError> {
    write_pages(parts, st)?;
    while let Some(&shard) = st.unsynced.first() {
        sync_dir(parts.m(), &parts.layout.shard_dir(PAGES, shard))?;
        st.unsynced.remove(&shard);
    }
    Ok(())
}

fn spill_if_large(parts: &Parts, st: &mut PendingState) -> Result<(), StoreError> {
    if st.dirty.len() > MAX_DIRTY_REGIONS {
        write_pages(parts, st)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_region_boundaries() {
        let p: Vec<_> = pieces(4096, 3072, 6144).collect();
        assert_eq!(p, vec![(0, 3072, 4096, 0), (1, 0, 4096, 1024), (2, 0, 1024, 5120)]);
        assert_eq!(pieces(4096, 0, 0).count(), 0);
    }
}
