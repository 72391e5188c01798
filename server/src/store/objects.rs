//! The store's objects read and written: disk records, point records and roots, initial-copy
//! checkpoints, map pages and chunks. Every read checks what it reads (`format.rs`,
//! `chunk.rs`); a damaged root, page or chunk is quarantined (`quarantine.rs`).

use std::path::Path;

use super::chunk;
use super::durable::{self, read_bounded, sync_dir, write_atomic};
use super::error::StoreError;
use super::format::{
    check_name, decode_disk_record, decode_initial, decode_page, decode_point_record, decode_root,
    encode_page, hex, max_page_bytes, max_root_bytes, region_count, DiskRecord, FormatError,
    InitialCheckpoint, Root, MAX_BLOCK_SIZE, MAX_DISK_SIZE, MAX_METADATA_BYTES, MAX_REGIONS, MIN_BLOCK_SIZE,
};
use super::info::PointInfo;
use super::layout::{parse_point_file, point_file, DISK_FILE, INITIAL_FILE, PAGES, POINTS};
use super::map::RegionMap;
use super::parts::Parts;
use super::quarantine::{self, Object};

// -- disks and points ------------------------------------------------------------------------

pub(crate) fn disk_names(parts: &Parts) -> Result<Vec<String>, StoreError> {
    let dir = parts.layout.disks_dir();
    Ok(durable::list(parts.m(), &dir)?
        .into_iter()
        .filter(|n| check_name(n).is_ok() && parts.m().exists(&dir.join(n).join(DISK_FILE)))
        .collect())
}

/// Every disk, for retention: like [`disk_names`], but a directory that holds points or a
/// checkpoint without its `disk.json` is an error (their references must not be skipped). A
/// directory with neither is an interrupted registration and is skipped.
pub(crate) fn disk_names_strict(parts: &Parts) -> Result<Vec<String>, StoreError> {
    let dir = parts.layout.disks_dir();
    let mut out = Vec::new();
    for name in durable::list(parts.m(), &dir)? {
        if check_name(&name).is_err() || !parts.m().is_dir(&dir.join(&name)) {
            continue;
        }
        let disk_dir = dir.join(&name);
        if parts.m().exists(&disk_dir.join(DISK_FILE)) {
            out.push(name);
            continue;
        }
        let points = disk_dir.join(POINTS);
        let has_points = parts.m().is_dir(&points)
            && durable::list(parts.m(), &points)?.iter().any(|n| parse_point_file(n, "json").is_some());
        if has_points || parts.m().exists(&disk_dir.join(INITIAL_FILE)) {
            return Err(StoreError::format(disk_dir.join(DISK_FILE))(FormatError::Missing));
        }
    }
    Ok(out)
}

pub(crate) fn disk_record(parts: &Parts, disk: &str) -> Result<DiskRecord, StoreError> {
    check_name(disk).map_err(|reason| StoreError::InvalidName {
        what: "disk",
        name: disk.to_string(),
        reason,
    })?;
    let path = parts.layout.disk_dir(disk).join(DISK_FILE);
    let buf = read_bounded(parts.m(), &path, MAX_METADATA_BYTES, "disk record")?
        .ok_or_else(|| StoreError::UnknownDisk(disk.to_string()))?;
    let r = decode_disk_record(&buf, disk).map_err(StoreError::format(&path))?;
    check_geometry(r.size, r.block_size, parts.layout.region_size)
        .map_err(|_| StoreError::format(&path)(FormatError::Range("disk geometry")))?;
    Ok(r)
}

/// Checks a disk's geometry against the store's bounds.
pub(crate) fn check_geometry(size: u64, block_size: u32, region_size: u64) -> Result<(), StoreError> {
    let bad = |reason| Err(StoreError::InvalidGeometry { size, block_size, reason });
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return bad("the block size must be a power of two from 512 bytes to 1 MiB");
    }
    if u64::from(block_size) > region_size {
        return bad("the block size exceeds the store's map region size");
    }
    if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
        return bad("the size must be a non-zero multiple of the block size");
    }
    if size > MAX_DISK_SIZE {
        return bad("larger than MAX_DISK_SIZE");
    }
    if region_count(size, region_size) > MAX_REGIONS {
        return bad("more map regions than MAX_REGIONS");
    }
    Ok(())
}

/// Ids of a disk's points, ascending.
pub(crate) fn point_ids(parts: &Parts, disk: &str) -> Result<Vec<u64>, StoreError> {
    let mut ids: Vec<u64> = durable::list(parts.m(), &parts.layout.points_dir(disk))?
        .iter()
        .filter_map(|n| parse_point_file(n, "json"))
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// A point's metadata and its root's checksum.
pub(crate) fn point_record(parts: &Parts, disk: &str, id: u64) -> Result<(PointInfo, [u8; 32]), StoreError> {
    let path = parts.layout.points_dir(disk).join(point_file(id, "json"));
    let buf = read_bounded(parts.m(), &path, MAX_METADATA_BYTES, "point record")?
        .ok_or_else(|| StoreError::UnknownPoint { disk: disk.to_string(), id })?;
    decode_point_record(&buf, disk, id).map_err(StoreError::format(&path))
}

/// A point's root, checked against `sum` (from its metadata). A damaged root is quarantined.
pub(crate) fn load_root(
    parts: &Parts,
    disk: &DiskRecord,
    id: u64,
    sum: &[u8; 32],
) -> Result<Root, StoreError> {
    load_root_sized(parts, disk, id, sum).map(|(root, _)| root)
}

/// [`load_root`], with the disk's size when the point was made (a disk may grow).
pub(crate) fn load_root_sized(
    parts: &Parts,
    disk: &DiskRecord,
    id: u64,
    sum: &[u8; 32],
) -> Result<(Root, u64), StoreError> {
    let path = parts.layout.points_dir(&disk.name).join(point_file(id, "root"));
    let region_size = parts.layout.region_size;
    let regions = region_count(disk.size, region_size);
    let read = |path: &Path| -> Result<(Root, u64), StoreError> {
        let buf = read_bounded(parts.m(), path, max_root_bytes(regions), "point root")?
            .ok_or_else(|| StoreError::format(path)(FormatError::Missing))?;
        decode_root(&buf, disk.size, region_size, sum).map_err(StoreError::format(path))
    };
    read(&path).inspect_err(|e| {
        if e.is_damage() {
            let o = Object::Root(disk.name.clone(), id);
            quarantine::quarantine(parts, &o, &e.to_string(), |p| read(p).is_ok());
        }
    })
}

pub(crate) fn latest_point(parts: &Parts, disk: &str) -> Result<Option<PointInfo>, StoreError> {
    match point_ids(parts, disk)?.last() {
        Some(&id) => Ok(Some(point_record(parts, disk, id)?.0)),
        None => Ok(None),
    }
}

/// The point committed for `generation`, if any. Commits keep generations strictly increasing
/// with ids, so this is a binary search.
pub(crate) fn point_for_generation(
    parts: &Parts,
    disk: &str,
    generation: u64,
) -> Result<Option<PointInfo>, StoreError> {
    let ids = point_ids(parts, disk)?;
    let (mut lo, mut hi) = (0usize, ids.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let info = point_record(parts, disk, ids[mid])?.0;
        match info.generation.cmp(&generation) {
            std::cmp::Ordering::Equal => return Ok(Some(info)),
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
        }
    }
    Ok(None)
}

/// Refuses a generation older than the disk's latest point unless it has a point of its own.
pub(crate) fn check_not_stale(parts: &Parts, disk: &str, generation: u64) -> Result<(), StoreError> {
    if let Some(latest) = latest_point(parts, disk)? {
        if latest.generation > generation && point_for_generation(parts, disk, generation)?.is_none() {
            return Err(StoreError::StaleGeneration {
                disk: disk.to_string(),
                generation,
                latest: latest.generation,
            });
        }
    }
    Ok(())
}

pub(crate) fn read_initial(
    parts: &Parts,
    disk: &DiskRecord,
) -> Result<Option<InitialCheckpoint>, StoreError> {
    let path = parts.layout.disk_dir(&disk.name).join(INITIAL_FILE);
    let region_size = parts.layout.region_size;
    let regions = region_count(disk.size, region_size);
    match read_bounded(parts.m(), &path, max_root_bytes(regions), "initial checkpoint")? {
        None => Ok(None),
        Some(buf) => {
            decode_initial(&buf, disk.size, region_size).map(Some).map_err(StoreError::format(&path))
        }
    }
}

pub(crate) fn remove_initial(parts: &Parts, disk: &str) -> Result<(), StoreError> {
    let dir = parts.layout.disk_dir(disk);
    durable::remove(parts.m(), &dir.join(INITIAL_FILE))?;
    sync_dir(parts.m(), &dir)
}

// -- pages and chunks ------------------------------------------------------------------------

/// Stores a page unless it exists; returns its address. The page's data is durable on return;
/// its name is durable once the caller has synced its shard directory.
pub(crate) fn write_page(parts: &Parts, map: &RegionMap) -> Result<[u8; 32], StoreError> {
    let (buf, address) = encode_page(parts.layout.region_size, map);
    // A stored copy is reused only if it passes its checks (a damaged one is quarantined by
    // the read and written anew here). Identical pages are rare, so this read is too.
    let stored = parts.m().exists(&parts.layout.page_path(&address)) && read_page(parts, &address).is_ok();
    if !stored {
        write_atomic(
            parts.m(),
            &parts.tmp,
            &parts.layout.shard_dir(PAGES, address[0]),
            &hex(&address),
            &[&buf],
            false,
        )?;
    }
    Ok(address)
}

/// Reads and checks the map page `address` from `path`, and its size.
pub(crate) fn page_at(
    parts: &Parts,
    path: &Path,
    address: &[u8; 32],
) -> Result<(RegionMap, u64), StoreError> {
    let region_size = parts.layout.region_size;
    let buf = read_bounded(parts.m(), path, max_page_bytes(region_size), "map page")?
        .ok_or_else(|| StoreError::format(path)(FormatError::Missing))?;
    let map = decode_page(&buf, region_size, address).map_err(StoreError::format(path))?;
    Ok((map, buf.len() as u64))
}

/// Reads and checks a map page; a damaged or missing one is quarantined.
pub(crate) fn read_page(parts: &Parts, address: &[u8; 32]) -> Result<RegionMap, StoreError> {
    match page_at(parts, &parts.layout.page_path(address), address) {
        Ok((map, _)) => Ok(map),
        Err(e) => {
            if e.is_damage() {
                let intact = |p: &Path| page_at(parts, p, address).is_ok();
                quarantine::quarantine(parts, &Object::Page(*address), &e.to_string(), intact);
            }
            Err(e)
        }
    }
}

/// Reads and verifies a chunk; a damaged or missing one is quarantined.
pub(crate) fn read_chunk(parts: &Parts, hash: &[u8; 32]) -> Result<Vec<u8>, StoreError> {
    chunk::read(parts.m(), &parts.layout.chunk_path(hash), hash)
        .inspect_err(|e| quarantine_chunk(parts, hash, e))
}

/// Quarantines a chunk found damaged by `e` (nothing for other errors).
pub(crate) fn quarantine_chunk(parts: &Parts, hash: &[u8; 32], e: &StoreError) {
    if e.is_damage() {
        quarantine::quarantine(parts, &Object::Chunk(*hash), &e.to_string(), |p| {
            chunk::read(parts.m(), p, hash).is_ok()
        });
    }
}
