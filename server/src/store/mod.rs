//! The [`Store`]: one directory holding chunks, map pages, disks and their recovery points.

mod chunk;
pub(crate) mod durable;
pub(crate) mod error;
pub(crate) mod format;
mod gc;
pub(crate) mod info;
pub(crate) mod map;
pub mod medium;
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
use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use self::durable::{read_bounded, sync_dir, write_atomic, TmpNames, TMP_PREFIX};
use self::error::{FormatError, StoreError};
use self::format::{
    check_name, check_region_size, check_tag, decode_disk_record, decode_initial, decode_marker, decode_page,
    decode_point_record, decode_root, encode_marker, encode_page, encode_point_record, hex, max_marker_bytes,
    max_page_bytes, max_root_bytes, region_count, DiskRecord, InitialCheckpoint, Root, DISK_FORMAT,
    MAX_BLOCK_SIZE, MAX_DISK_SIZE, MAX_METADATA_BYTES, MAX_REGIONS, MAX_TAGS, MIN_BLOCK_SIZE, VERSION,
};
use self::map::RegionMap;
use self::medium::{DiskMedium, Medium};
use self::pending::{PendingPoint, PendingState};
use self::quarantine::{Object, Quarantined, QUARANTINE};
use self::reader::PointReader;
use self::scrub::{VerifyOptions, VerifyReport};
use crate::{
    DiskInfo, GcReport, GenerationKind, InitialProgress, PointInfo, PointSel, Retention, StoreOptions,
};

pub(crate) const MARKER: &str = "siterep-store";
/// Held exclusively (`flock`) by the one process that writes the store.
pub(crate) const WRITER_LOCK: &str = "writer.lock";
/// Held shared by every process that only reads the store (`points`, `restore`, `export`,
/// `failover`) for its whole life, and exclusively by the writer's retention: pruning and
/// sweeping never run under another process's reader.
pub(crate) const READERS_LOCK: &str = "readers.lock";
pub(crate) const CHUNKS: &str = "chunks";
/// Chunks received but not yet synced; emptied by every [`Store::open`].
pub(crate) const INCOMING: &str = "incoming";
pub(crate) const PAGES: &str = "pages";
pub(crate) const DISKS: &str = "disks";
pub(crate) const DISK_FILE: &str = "disk.json";
pub(crate) const INITIAL_FILE: &str = "initial.bin";
pub(crate) const POINTS: &str = "points";

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn point_file(id: u64, ext: &str) -> String {
    format!("{id:020}.{ext}")
}

/// The id of a point file name `<20 digits>.<ext>`.
pub(crate) fn parse_point_file(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// The recovery site's store: one directory, shared by every disk and agent.
///
/// Every method takes `&self`; the store is `Send + Sync` and cheap to clone (clones share
/// their state). Operations on different disks run in parallel; commits and tag edits of one
/// disk are serialized. One process opens a store directory at a time.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

/// Processes still working on files and references the sweep must not remove.
#[derive(Default)]
pub(crate) struct Live {
    next_seq: u64,
    next_token: u64,
    pub(crate) pending: HashMap<u64, PendingSlot>,
    /// Open readers by (disk, point id); their points are not pruned.
    pub(crate) readers: HashMap<(String, u64), usize>,
    /// Chunks uploaded while some pending point was open, by upload sequence number.
    recent: VecDeque<(u64, [u8; 32])>,
    /// Chunks this process staged in `incoming/`, whose contents may not be durable. A hash
    /// leaves this map only once its file in `chunks/` is durable, contents and name (see
    /// [`chunk::promote`]), so a file in `chunks/` whose hash is not here is durable.
    pub(crate) staged: HashMap<[u8; 32], Staged>,
    /// Bumped when a failed `syncfs` discards the staged chunks: an upload that read an older
    /// value before writing its file is refused instead of staged.
    pub(crate) stage_epoch: u64,
}

/// A staged chunk: its file under `incoming/` (or, after a promotion whose directory sync
/// failed, already moved to `chunks/`) and its raw length.
pub(crate) struct Staged {
    pub(crate) path: PathBuf,
    pub(crate) raw_len: u32,
}

pub(crate) struct PendingSlot {
    begin_seq: u64,
    pub(crate) state: Arc<Mutex<PendingState>>,
}

impl Live {
    pub(crate) fn add_pending(&mut self, state: Arc<Mutex<PendingState>>) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.pending.insert(token, PendingSlot { begin_seq: self.next_seq, state });
        token
    }

    pub(crate) fn remove_pending(&mut self, token: u64) {
        self.pending.remove(&token);
        self.trim();
    }

    pub(crate) fn record_put(&mut self, hash: [u8; 32]) {
        if self.pending.is_empty() {
            return;
        }
        self.recent.push_back((self.next_seq, hash));
        self.next_seq += 1;
    }

    /// Forgets uploads older than every open pending point.
    fn trim(&mut self) {
        match self.pending.values().map(|p| p.begin_seq).min() {
            None => self.recent.clear(),
            Some(horizon) => {
                while self.recent.front().is_some_and(|(seq, _)| *seq < horizon) {
                    self.recent.pop_front();
                }
            }
        }
    }

    /// Chunks uploaded since the oldest open pending point began: the sweep keeps them.
    pub(crate) fn protected_uploads(&mut self) -> impl Iterator<Item = &[u8; 32]> + '_ {
        self.trim();
        self.recent.iter().map(|(_, h)| h)
    }
}

pub(crate) struct Inner {
    pub(crate) root: PathBuf,
    pub(crate) region_size: u64,
    /// Shared by every operation that creates files or references; exclusive for retention.
    gate: RwLock<()>,
    live: Mutex<Live>,
    /// Serializes promotions of staged chunks into `chunks/`.
    promotion: Mutex<()>,
    /// Where the store's files are: every file operation but the lock files goes through it.
    medium: Arc<dyn Medium>,
    disk_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The quarantine as last seen by [`Inner::root_damage`], and for each page read since, the
    /// first quarantined chunk it names: points share pages, so checking a new point reads only
    /// the pages no checked point had.
    page_damage: Mutex<(Quarantined, PageDamage)>,
    pub(crate) tmp: TmpNames,
    pub(crate) access: Access,
    #[cfg(test)]
    faults: Mutex<HashMap<&'static str, usize>>,
}

/// Per map page: the first quarantined chunk it names, if any.
type PageDamage = HashMap<[u8; 32], Option<[u8; 32]>>;

/// How this process holds the store (see [`Store::open`] and [`Store::open_reader`]).
pub(crate) enum Access {
    /// The writer: holds [`WRITER_LOCK`]; `readers` is [`READERS_LOCK`], locked exclusively
    /// only while retention runs.
    Writer { _lock: Flock<File>, readers: File },
    /// A reader: holds [`READERS_LOCK`] shared.
    Reader { _lock: Flock<File> },
}

impl Inner {
    /// Refuses `op` in a process that opened the store for reading.
    pub(crate) fn writable(&self, op: &'static str) -> Result<(), StoreError> {
        match self.access {
            Access::Writer { .. } => Ok(()),
            Access::Reader { .. } => Err(StoreError::ReadOnly(op)),
        }
    }

    /// Retention's cross-process exclusion: `None` while another process reads the store.
    pub(crate) fn exclude_readers(&self) -> Result<Option<Flock<File>>, StoreError> {
        let Access::Writer { readers, .. } = &self.access else {
            return Err(StoreError::ReadOnly("retention"));
        };
        let path = self.root.join(READERS_LOCK);
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

    pub(crate) fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Held while staged chunks are synced and moved into `chunks/`. Taken after the gate, a
    /// disk lock and a pending point's state; the live registry may be taken inside it.
    pub(crate) fn promotion(&self) -> MutexGuard<'_, ()> {
        self.promotion.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `syncfs(2)` of the store's file system: every write made before the call, data and
    /// metadata, is durable on success.
    pub(crate) fn syncfs(&self) -> Result<(), StoreError> {
        self.medium.syncfs().map_err(StoreError::io("syncfs", &self.root))
    }

    /// The medium holding the store's files.
    pub(crate) fn m(&self) -> &dyn Medium {
        &*self.medium
    }

    /// The lock serializing commits, checkpoints and tag edits of one disk. Take it after
    /// [`Inner::shared`], never the other way round.
    pub(crate) fn disk_lock(&self, disk: &str) -> Arc<Mutex<()>> {
        let mut locks = self.disk_locks.lock().unwrap_or_else(PoisonError::into_inner);
        locks.entry(disk.to_string()).or_default().clone()
    }

    /// Test-only failure injection: the named step fails once it has passed `n` times.
    #[cfg(test)]
    pub(crate) fn fault(&self, at: &'static str) -> Result<(), StoreError> {
        let mut faults = self.faults.lock().unwrap();
        match faults.get_mut(at) {
            Some(0) => Err(StoreError::Io {
                op: "injected fault",
                path: PathBuf::from(at),
                source: std::io::Error::other("injected"),
            }),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    #[cfg(not(test))]
    #[inline]
    pub(crate) fn fault(&self, _at: &'static str) -> Result<(), StoreError> {
        Ok(())
    }

    // -- paths ------------------------------------------------------------------------------

    pub(crate) fn shard_dir(&self, kind: &str, shard: u8) -> PathBuf {
        self.root.join(kind).join(format!("{shard:02x}"))
    }

    pub(crate) fn chunk_path(&self, hash: &[u8; 32]) -> PathBuf {
        self.shard_dir(CHUNKS, hash[0]).join(hex(hash))
    }

    pub(crate) fn incoming_dir(&self) -> PathBuf {
        self.root.join(INCOMING)
    }

    pub(crate) fn page_path(&self, hash: &[u8; 32]) -> PathBuf {
        self.shard_dir(PAGES, hash[0]).join(hex(hash))
    }

    pub(crate) fn disk_dir(&self, disk: &str) -> PathBuf {
        self.root.join(DISKS).join(disk)
    }

    pub(crate) fn points_dir(&self, disk: &str) -> PathBuf {
        self.disk_dir(disk).join(POINTS)
    }

    // -- disks and points --------------------------------------------------------------------

    pub(crate) fn disk_names(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join(DISKS);
        Ok(durable::list(self.m(), &dir)?
            .into_iter()
            .filter(|n| check_name(n).is_ok() && self.m().exists(&dir.join(n).join(DISK_FILE)))
            .collect())
    }

    /// Every disk, for retention: like [`Inner::disk_names`], but a directory that holds points
    /// or a checkpoint without its `disk.json` is an error (their references must not be
    /// skipped). A directory with neither is an interrupted registration and is skipped.
    pub(crate) fn disk_names_strict(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join(DISKS);
        let mut out = Vec::new();
        for name in durable::list(self.m(), &dir)? {
            if check_name(&name).is_err() || !self.m().is_dir(&dir.join(&name)) {
                continue;
            }
            let disk_dir = dir.join(&name);
            if self.m().exists(&disk_dir.join(DISK_FILE)) {
                out.push(name);
                continue;
            }
            let points = disk_dir.join(POINTS);
            let has_points = self.m().is_dir(&points)
                && durable::list(self.m(), &points)?.iter().any(|n| parse_point_file(n, "json").is_some());
            if has_points || self.m().exists(&disk_dir.join(INITIAL_FILE)) {
                return Err(StoreError::format(disk_dir.join(DISK_FILE))(FormatError::Missing));
            }
        }
        Ok(out)
    }

    pub(crate) fn disk_record(&self, disk: &str) -> Result<DiskRecord, StoreError> {
        check_name(disk).map_err(|reason| StoreError::InvalidName {
            what: "disk",
            name: disk.to_string(),
            reason,
        })?;
        let path = self.disk_dir(disk).join(DISK_FILE);
        let buf = read_bounded(self.m(), &path, MAX_METADATA_BYTES, "disk record")?
            .ok_or_else(|| StoreError::UnknownDisk(disk.to_string()))?;
        let r = decode_disk_record(&buf, disk).map_err(StoreError::format(&path))?;
        check_geometry(r.size, r.block_size, self.region_size)
            .map_err(|_| StoreError::format(&path)(FormatError::Range("disk geometry")))?;
        Ok(r)
    }

    /// Ids of a disk's points, ascending.
    pub(crate) fn point_ids(&self, disk: &str) -> Result<Vec<u64>, StoreError> {
        let mut ids: Vec<u64> = durable::list(self.m(), &self.points_dir(disk))?
            .iter()
            .filter_map(|n| parse_point_file(n, "json"))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// A point's metadata and its root's checksum.
    pub(crate) fn point_record(&self, disk: &str, id: u64) -> Result<(PointInfo, [u8; 32]), StoreError> {
        let path = self.points_dir(disk).join(point_file(id, "json"));
        let buf = read_bounded(self.m(), &path, MAX_METADATA_BYTES, "point record")?
            .ok_or_else(|| StoreError::UnknownPoint { disk: disk.to_string(), id })?;
        decode_point_record(&buf, disk, id).map_err(StoreError::format(&path))
    }

    /// A point's root, checked against `sum` (from its metadata). A damaged root is quarantined.
    pub(crate) fn load_root(&self, disk: &DiskRecord, id: u64, sum: &[u8; 32]) -> Result<Root, StoreError> {
        self.load_root_sized(disk, id, sum).map(|(root, _)| root)
    }

    /// [`Inner::load_root`], with the disk's size when the point was made (a disk may grow).
    pub(crate) fn load_root_sized(
        &self,
        disk: &DiskRecord,
        id: u64,
        sum: &[u8; 32],
    ) -> Result<(Root, u64), StoreError> {
        let path = self.points_dir(&disk.name).join(point_file(id, "root"));
        let regions = region_count(disk.size, self.region_size);
        let read = |path: &Path| -> Result<(Root, u64), StoreError> {
            let buf = read_bounded(self.m(), path, max_root_bytes(regions), "point root")?
                .ok_or_else(|| StoreError::format(path)(FormatError::Missing))?;
            decode_root(&buf, disk.size, self.region_size, sum).map_err(StoreError::format(path))
        };
        read(&path).inspect_err(|e| {
            if e.is_damage() {
                let o = Object::Root(disk.name.clone(), id);
                quarantine::quarantine(self, &o, &e.to_string(), |p| read(p).is_ok());
            }
        })
    }

    /// Why point `id` cannot be restored whole because it depends on a damaged object (its
    /// root, or a page or chunk it names that is quarantined), or `None`. Reads the root, and
    /// while some page or chunk is quarantined, the pages of the point not read since the
    /// quarantine last changed.
    pub(crate) fn point_damage(&self, disk: &DiskRecord, id: u64) -> Result<Option<String>, StoreError> {
        let q = quarantine::list(self)?;
        let root_object = Object::Root(disk.name.clone(), id);
        if q.contains(&root_object) {
            return Ok(Some(format!("its root is {}", quarantine::reason(self, &root_object))));
        }
        let (_, sum) = self.point_record(&disk.name, id)?;
        match self.load_root(disk, id, &sum) {
            Ok(root) => self.root_damage(&root, q),
            Err(e) if e.is_damage() => Ok(Some(format!("its root is damaged: {e}"))),
            Err(e) => Err(e),
        }
    }

    /// Why a point with `root` cannot be restored whole: a page it names is quarantined or
    /// damaged, or a chunk one of them names is quarantined (`q`: the quarantine now).
    pub(crate) fn root_damage(&self, root: &Root, q: Quarantined) -> Result<Option<String>, StoreError> {
        if !q.has_objects() {
            return Ok(None);
        }
        let mut cache = self.page_damage.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.0 != q {
            *cache = (q, HashMap::new());
        }
        for (region, page) in root {
            let at = u64::from(*region) * self.region_size;
            if cache.0.pages.contains(page) {
                return Ok(Some(format!("the map page of bytes {at}.. ({}) is quarantined", hex(page))));
            }
            let bad = match cache.1.get(page) {
                Some(bad) => *bad,
                None => {
                    let map = match self.read_page(page) {
                        Ok(map) => map,
                        Err(e) if e.is_damage() => {
                            return Ok(Some(format!("the map page of bytes {at}.. is damaged: {e}")))
                        }
                        Err(e) => return Err(e),
                    };
                    let bad = map.chunks().find(|c| cache.0.chunks.contains(*c)).copied();
                    cache.1.insert(*page, bad);
                    bad
                }
            };
            if let Some(c) = bad {
                return Ok(Some(format!("chunk {} (in bytes {at}..) is quarantined", hex(&c))));
            }
        }
        Ok(None)
    }

    pub(crate) fn latest_point(&self, disk: &str) -> Result<Option<PointInfo>, StoreError> {
        match self.point_ids(disk)?.last() {
            Some(&id) => Ok(Some(self.point_record(disk, id)?.0)),
            None => Ok(None),
        }
    }

    /// Commits keep generations strictly increasing with ids, so this is a binary search.
    pub(crate) fn point_for_generation(
        &self,
        disk: &str,
        generation: u64,
    ) -> Result<Option<PointInfo>, StoreError> {
        let ids = self.point_ids(disk)?;
        let (mut lo, mut hi) = (0usize, ids.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let info = self.point_record(disk, ids[mid])?.0;
            match info.generation.cmp(&generation) {
                std::cmp::Ordering::Equal => return Ok(Some(info)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    pub(crate) fn read_initial(&self, disk: &DiskRecord) -> Result<Option<InitialCheckpoint>, StoreError> {
        let path = self.disk_dir(&disk.name).join(INITIAL_FILE);
        let regions = region_count(disk.size, self.region_size);
        match read_bounded(self.m(), &path, max_root_bytes(regions), "initial checkpoint")? {
            None => Ok(None),
            Some(buf) => {
                decode_initial(&buf, disk.size, self.region_size).map(Some).map_err(StoreError::format(&path))
            }
        }
    }

    pub(crate) fn remove_initial(&self, disk: &str) -> Result<(), StoreError> {
        durable::remove(self.m(), &self.disk_dir(disk).join(INITIAL_FILE))?;
        sync_dir(self.m(), &self.disk_dir(disk))
    }

    // -- pages and chunks --------------------------------------------------------------------

    /// Stores a page unless it exists; returns its address. The page's data is durable on
    /// return; its name is durable once the caller has synced its shard directory.
    pub(crate) fn write_page(&self, map: &RegionMap) -> Result<[u8; 32], StoreError> {
        let (buf, address) = encode_page(self.region_size, map);
        // A stored copy is reused only if it passes its checks (a damaged one is quarantined
        // by the read and written anew here). Identical pages are rare, so this read is too.
        let stored = self.m().exists(&self.page_path(&address)) && self.read_page(&address).is_ok();
        if !stored {
            write_atomic(
                self.m(),
                &self.tmp,
                &self.shard_dir(PAGES, address[0]),
                &hex(&address),
                &[&buf],
                false,
            )?;
        }
        Ok(address)
    }

    /// Reads and checks the map page `address` from `path`, and its size.
    pub(crate) fn page_at(&self, path: &Path, address: &[u8; 32]) -> Result<(RegionMap, u64), StoreError> {
        let buf = read_bounded(self.m(), path, max_page_bytes(self.region_size), "map page")?
            .ok_or_else(|| StoreError::format(path)(FormatError::Missing))?;
        let map = decode_page(&buf, self.region_size, address).map_err(StoreError::format(path))?;
        Ok((map, buf.len() as u64))
    }

    /// Reads and checks a map page; a damaged or missing one is quarantined.
    pub(crate) fn read_page(&self, address: &[u8; 32]) -> Result<RegionMap, StoreError> {
        match self.page_at(&self.page_path(address), address) {
            Ok((map, _)) => Ok(map),
            Err(e) => {
                if e.is_damage() {
                    let intact = |p: &Path| self.page_at(p, address).is_ok();
                    quarantine::quarantine(self, &Object::Page(*address), &e.to_string(), intact);
                }
                Err(e)
            }
        }
    }

    /// Reads and verifies a chunk; a damaged or missing one is quarantined.
    pub(crate) fn read_chunk(&self, hash: &[u8; 32]) -> Result<Vec<u8>, StoreError> {
        chunk::read(self.m(), &self.chunk_path(hash), hash).inspect_err(|e| self.quarantine_chunk(hash, e))
    }

    /// Quarantines a chunk found damaged by `e` (nothing for other errors).
    pub(crate) fn quarantine_chunk(&self, hash: &[u8; 32], e: &StoreError) {
        if e.is_damage() {
            quarantine::quarantine(self, &Object::Chunk(*hash), &e.to_string(), |p| {
                chunk::read(self.m(), p, hash).is_ok()
            });
        }
    }
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
    if size == 0 || size % u64::from(block_size) != 0 {
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
        let lock_path = root.join(WRITER_LOCK);
        let writer_lock = match Flock::lock(lock_file(&lock_path)?, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, Errno::EWOULDBLOCK)) => return Err(StoreError::Locked(root.to_path_buf())),
            Err((_, e)) => return Err(StoreError::io("lock", &lock_path)(e.into())),
        };
        let readers = lock_file(&root.join(READERS_LOCK))?;
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
                create_layout(m, root, options.region_size)?;
                options.region_size
            }
        };
        tracing::debug!(root = %root.display(), region_size, "store open for writing");
        Store::with_access(root, region_size, Access::Writer { _lock: writer_lock, readers }, medium)
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
        let path = root.join(READERS_LOCK);
        // Blocks while a retention run is pruning or sweeping (seconds at most).
        let lock = Flock::lock(lock_file(&path)?, FlockArg::LockShared)
            .map_err(|(_, e)| StoreError::io("lock", &path)(e.into()))?;
        Store::with_access(root, region_size, Access::Reader { _lock: lock }, Arc::new(medium))
    }

    fn with_access(
        root: &Path,
        region_size: u64,
        access: Access,
        medium: Arc<dyn Medium>,
    ) -> Result<Store, StoreError> {
        Ok(Store {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                region_size,
                gate: RwLock::new(()),
                live: Mutex::new(Live::default()),
                promotion: Mutex::new(()),
                medium,
                disk_locks: Mutex::new(HashMap::new()),
                page_damage: Mutex::default(),
                tmp: TmpNames::default(),
                access,
                #[cfg(test)]
                faults: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Bytes of a disk's address space per map page.
    pub fn region_size(&self) -> u64 {
        self.inner.region_size
    }

    /// Registers a disk, or returns it if it exists with the same geometry.
    pub fn register_disk(&self, disk: &str, size: u64, block_size: u32) -> Result<DiskInfo, StoreError> {
        check_name(disk).map_err(|reason| StoreError::InvalidName {
            what: "disk",
            name: disk.to_string(),
            reason,
        })?;
        check_geometry(size, block_size, self.inner.region_size)?;
        self.inner.writable("disk registration")?;
        let inner = &*self.inner;
        {
            let _gate = inner.shared();
            let lock = inner.disk_lock(disk);
            let _disk = lock.lock().unwrap_or_else(PoisonError::into_inner);
            match inner.disk_record(disk) {
                Ok(r) if r.size == size && r.block_size == block_size => {}
                // The disk grew: points from now on have the new size, older ones keep theirs
                // (each root records its own).
                Ok(r) if r.block_size == block_size && size > r.size => {
                    let record = DiskRecord { size, ..r.clone() };
                    let json = serde_json::to_vec_pretty(&record).expect("a disk record serializes");
                    write_atomic(inner.m(), &inner.tmp, &inner.disk_dir(disk), DISK_FILE, &[&json], true)?;
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
                    let dir = inner.disk_dir(disk);
                    let points = inner.points_dir(disk);
                    inner.m().create_dir_all(&points).map_err(StoreError::io("create directory", &points))?;
                    sync_dir(inner.m(), &dir)?;
                    sync_dir(inner.m(), &inner.root.join(DISKS))?;
                    let record = DiskRecord {
                        format: DISK_FORMAT.into(),
                        version: VERSION,
                        name: disk.to_string(),
                        size,
                        block_size,
                        created_unix_ms: now_unix_ms(),
                    };
                    let json = serde_json::to_vec_pretty(&record).expect("a disk record serializes");
                    write_atomic(inner.m(), &inner.tmp, &dir, DISK_FILE, &[&json], true)?;
                    tracing::info!(disk, size, block_size, "disk registered");
                }
                Err(e) => return Err(e),
            }
        }
        self.disk(disk)
    }

    /// A disk, its latest point and the progress of an interrupted initial copy.
    pub fn disk(&self, disk: &str) -> Result<DiskInfo, StoreError> {
        let r = self.inner.disk_record(disk)?;
        let latest = self.inner.latest_point(disk)?;
        let initial = self
            .inner
            .read_initial(&r)?
            .map(|c| InitialProgress { generation: c.generation, next_offset: c.next_offset });
        Ok(DiskInfo { name: r.name, size: r.size, block_size: r.block_size, latest, initial })
    }

    /// Every registered disk, by name.
    pub fn disks(&self) -> Result<Vec<DiskInfo>, StoreError> {
        self.inner.disk_names()?.iter().map(|d| self.disk(d)).collect()
    }

    /// Why the disk's latest point cannot be restored whole — it depends on a damaged or
    /// quarantined object (its root, a map page or a chunk) — or `None` (also with no point).
    /// The agent should then resync: an incremental on that point fails with
    /// [`StoreError::DamagedBase`], a resync (an initial full copy on it) sends again what is
    /// damaged and makes a whole point. Cheap while nothing is quarantined; otherwise it reads
    /// the point's pages once per change of the quarantine.
    pub fn needs_resync(&self, disk: &str) -> Result<Option<String>, StoreError> {
        let record = self.inner.disk_record(disk)?;
        let Some(&id) = self.inner.point_ids(disk)?.last() else { return Ok(None) };
        Ok(self
            .inner
            .point_damage(&record, id)?
            .map(|reason| format!("recovery point {id} is damaged: {reason}")))
    }

    /// Whether a chunk is stored, or staged by this process. A quarantined chunk is not stored:
    /// the answer is no until a new copy is uploaded. (It may still be collected by a
    /// concurrent retention run unless a pending point references it, and a failed sync
    /// discards staged chunks; [`PendingPoint::add_chunk`] or the commit then says so with
    /// [`StoreError::MissingChunk`].)
    pub fn has_chunk(&self, hash: &[u8; 32]) -> bool {
        self.inner.live().staged.contains_key(hash) || self.inner.m().exists(&self.inner.chunk_path(hash))
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
        self.inner.writable("upload")?;
        chunk::verify_upload(hash, raw_len, compressed)?;
        let inner = &*self.inner;
        let _gate = inner.shared();
        // The file first, the staged set second (see `chunk::find`). A stored copy counts only
        // if it passes every check (the caller sent the chunk anyway, so reading the stored
        // copy is cheap next to that); a damaged one is quarantined, and this upload is staged
        // and heals it when promoted.
        let stored = inner.m().exists(&inner.chunk_path(hash)) && inner.read_chunk(hash).is_ok();
        let epoch = {
            let mut live = inner.live();
            if stored || live.staged.contains_key(hash) {
                live.record_put(*hash);
                return Ok(());
            }
            live.stage_epoch
        };
        let path = chunk::stage(inner, hash, raw_len, compressed)?;
        let mut live = inner.live();
        if live.stage_epoch != epoch {
            drop(live);
            let _ = durable::remove(inner.m(), &path);
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
                let _ = durable::remove(inner.m(), &path);
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
        let inner = &self.inner;
        inner.writable("generation")?;
        let record = inner.disk_record(disk)?;
        if kind != GenerationKind::InitialFull && base.is_none() {
            return Err(StoreError::BaseRequired(kind));
        }
        let _gate = inner.shared();
        let root = match base {
            Some(b) => {
                let (info, sum) = inner.point_record(disk, b)?;
                if info.generation >= generation {
                    return Err(StoreError::InvalidBase {
                        base: b,
                        base_generation: info.generation,
                        generation,
                    });
                }
                base_root(inner, &record, b, &sum, kind)?
            }
            None => Root::new(),
        };
        check_not_stale(inner, disk, generation)?;
        let state = PendingState::new(root, 0);
        Ok(PendingPoint::start(inner.clone(), record, generation, kind, base, now_unix_ms(), 0, state))
    }

    /// The interrupted initial full copy of `disk`, as of its last checkpoint, or `None`.
    pub fn resume_initial(&self, disk: &str) -> Result<Option<PendingPoint>, StoreError> {
        self.inner.writable("resume")?;
        let inner = &self.inner;
        let record = inner.disk_record(disk)?;
        let _gate = inner.shared();
        let lock = inner.disk_lock(disk);
        let _disk = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(cp) = inner.read_initial(&record)? else { return Ok(None) };
        if inner.point_for_generation(disk, cp.generation)?.is_some() {
            // Committed; the checkpoint outlived the commit by a crash.
            inner.remove_initial(disk)?;
            return Ok(None);
        }
        check_not_stale(inner, disk, cp.generation)?;
        let state = PendingState::new(cp.root, cp.changed_bytes);
        Ok(Some(PendingPoint::start(
            inner.clone(),
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
        self.inner.disk_record(disk)?;
        let ids = self.inner.point_ids(disk)?;
        ids.iter().map(|&id| Ok(self.inner.point_record(disk, id)?.0)).collect()
    }

    /// The point committed for `generation`, if any (for an idempotent re-send).
    pub fn point_for_generation(&self, disk: &str, generation: u64) -> Result<Option<PointInfo>, StoreError> {
        self.inner.disk_record(disk)?;
        self.inner.point_for_generation(disk, generation)
    }

    /// Opens a point for reading. While the reader lives, retention keeps the point. A damaged
    /// root makes every read of the reader fail (and `block_hashes` answer it as damaged).
    pub fn open_point(&self, disk: &str, point: PointSel) -> Result<PointReader, StoreError> {
        let inner = &self.inner;
        let record = inner.disk_record(disk)?;
        let _gate = inner.shared();
        let id = match point {
            PointSel::Id(id) => id,
            PointSel::Latest => {
                *inner.point_ids(disk)?.last().ok_or_else(|| StoreError::NoPoint(disk.to_string()))?
            }
        };
        let (info, sum) = inner.point_record(disk, id)?;
        // A damaged root fails reads later, not the open: hash queries on the point (a resync)
        // must go on and answer the whole disk as damaged.
        let (root, size) = match inner.load_root_sized(&record, id, &sum) {
            Ok((root, size)) => (Ok(root), size),
            Err(StoreError::Format { path, source }) => (Err((path, source)), record.size),
            Err(e) => return Err(e),
        };
        Ok(PointReader::new(inner.clone(), size, info, root))
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
        let inner = &self.inner;
        inner.disk_record(disk)?;
        // Shared: retention (exclusive) must not delete the record while it is rewritten.
        let _gate = inner.shared();
        let lock = inner.disk_lock(disk);
        let _disk = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut info, root_sum) = inner.point_record(disk, point)?;
        if edit(&mut info.tags)? {
            let json = encode_point_record(&info, &root_sum);
            write_atomic(
                inner.m(),
                &inner.tmp,
                &inner.points_dir(disk),
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
        scrub::verify(&self.inner, options)
    }

    /// Prunes points the policy does not keep (never a disk's latest point, a tagged point or
    /// one being read), then removes every page and chunk no remaining point, checkpoint or
    /// pending point references. Writers wait while it runs.
    pub fn retain(&self, policy: &Retention) -> Result<GcReport, StoreError> {
        self.inner.writable("retention")?;
        gc::retain(&self.inner, policy, now_unix_ms())
    }

    #[cfg(test)]
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Test-only: make step `at` fail after it has passed `after` times.
    #[cfg(test)]
    pub(crate) fn inject_fault(&self, at: &'static str, after: usize) {
        self.inner.faults.lock().unwrap().insert(at, after);
    }

    /// Test-only: every step succeeds again.
    #[cfg(test)]
    pub(crate) fn clear_faults(&self) {
        self.inner.faults.lock().unwrap().clear();
    }
}

/// The root a generation on `base` starts from. An initial full copy (the agent's resync)
/// starts without whatever of the base is damaged: everything if its root is, the region of
/// each quarantined page; the agent's hash queries answer those ranges as unknown, so it sends
/// them all again. Any other kind fails with [`StoreError::DamagedBase`] on a damaged base.
fn base_root(
    inner: &Inner,
    record: &DiskRecord,
    base: u64,
    sum: &[u8; 32],
    kind: GenerationKind,
) -> Result<Root, StoreError> {
    let full = kind == GenerationKind::InitialFull;
    let damaged = |reason: String| StoreError::DamagedBase { disk: record.name.clone(), point: base, reason };
    let q = quarantine::list(inner)?;
    let mut root = if q.roots.contains(&(record.name.clone(), base)) {
        if !full {
            return Err(damaged("its root is quarantined".into()));
        }
        Root::new()
    } else {
        match inner.load_root(record, base, sum) {
            Ok(root) => root,
            Err(e) if e.is_damage() && full => Root::new(),
            Err(e) if e.is_damage() => return Err(damaged(format!("its root is damaged: {e}"))),
            Err(e) => return Err(e),
        }
    };
    if full {
        root.retain(|_, page| !q.pages.contains(page));
    } else if let Some(reason) = inner.root_damage(&root, q)? {
        return Err(damaged(reason));
    }
    Ok(root)
}

/// Refuses a generation older than the disk's latest point unless it has a point of its own.
pub(crate) fn check_not_stale(inner: &Inner, disk: &str, generation: u64) -> Result<(), StoreError> {
    if let Some(latest) = inner.latest_point(disk)? {
        if latest.generation > generation && inner.point_for_generation(disk, generation)?.is_none() {
            return Err(StoreError::StaleGeneration {
                disk: disk.to_string(),
                generation,
                latest: latest.generation,
            });
        }
    }
    Ok(())
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

fn create_layout(m: &dyn Medium, root: &Path, region_size: u64) -> Result<(), StoreError> {
    for name in durable::list(m, root)? {
        if ![CHUNKS, PAGES, DISKS, INCOMING, QUARANTINE, WRITER_LOCK, READERS_LOCK].contains(&name.as_str())
            && !name.starts_with(TMP_PREFIX)
        {
            return Err(StoreError::NotAStore(root.to_path_buf()));
        }
    }
    for kind in [CHUNKS, PAGES] {
        let dir = root.join(kind);
        for shard in 0..=255u8 {
            let d = dir.join(format!("{shard:02x}"));
            m.create_dir_all(&d).map_err(StoreError::io("create directory", &d))?;
        }
        sync_dir(m, &dir)?;
    }
    for dir in [DISKS, INCOMING] {
        let dir = root.join(dir);
        m.create_dir_all(&dir).map_err(StoreError::io("create directory", &dir))?;
    }
    sync_dir(m, root)?;
    // The marker last: a directory without it is an unfinished creation, finished next time.
    write_atomic(m, &TmpNames::default(), root, MARKER, &[&encode_marker(region_size)], true)?;
    tracing::info!(root = %root.display(), region_size, "store created");
    Ok(())
}
