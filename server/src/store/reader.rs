//! Reading a recovery point: random reads, its extent map, and a streaming restore to a sparse
//! image. Every chunk read is verified against its blake3; a damaged root, page or chunk is
//! quarantined when found (see `quarantine.rs`).

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::error::StoreError;
use super::format::{FormatError, Root};
use super::info::{ExtentKind, PointInfo, RestoreReport};
use super::map::{DataRef, RegionMap};
use super::objects;
use super::parts::Parts;

/// Pages and chunks a reader keeps decoded (bounds its memory: chunks are at most 4 MiB).
const PAGE_CACHE: usize = 8;
const CHUNK_CACHE: usize = 4;
/// Zeroes written per call when restoring to a block device.
const ZERO_BUF: usize = 1 << 20;

/// Workers that read, verify and write chunks during a restore, and segments queued for them.
const RESTORE_THREADS: usize = 2;
const RESTORE_QUEUE: usize = 64;

/// One piece of a point's address space, in order.
enum Segment {
    Data(u64, DataRef),
    Zero(u64, u64),
    /// Unknown: its page or the point's root is damaged (only when the walk tolerates it).
    Damaged(u64, u64),
}

#[derive(Default)]
struct ReadCache {
    pages: VecDeque<([u8; 32], Arc<RegionMap>)>,
    chunks: VecDeque<([u8; 32], Arc<Vec<u8>>)>,
}

/// A recovery point open for reading. `Send + Sync`: one reader serves many threads. While it
/// lives, retention keeps its point.
pub struct PointReader {
    parts: Arc<Parts>,
    info: PointInfo,
    size: u64,
    /// The root, or why it cannot be read (the file and the check it failed).
    root: Result<Root, (std::path::PathBuf, FormatError)>,
    cache: Mutex<ReadCache>,
}

impl std::fmt::Debug for PointReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointReader")
            .field("info", &self.info)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl PointReader {
    pub(crate) fn new(
        parts: Arc<Parts>,
        size: u64,
        info: PointInfo,
        root: Result<Root, (std::path::PathBuf, FormatError)>,
    ) -> PointReader {
        parts.live().add_reader(&info.disk, info.id);
        PointReader { parts, info, size, root, cache: Mutex::new(ReadCache::default()) }
    }

    pub fn info(&self) -> &PointInfo {
        &self.info
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(StoreError::OutOfRange { offset, len, size: self.size });
        }
        Ok(())
    }

    fn page(&self, address: &[u8; 32]) -> Result<Arc<RegionMap>, StoreError> {
        {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, p)) = cache.pages.iter().find(|(a, _)| a == address) {
                return Ok(p.clone());
            }
        }
        let page = Arc::new(objects::read_page(&self.parts, address)?);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.pages.len() >= PAGE_CACHE {
            cache.pages.pop_front();
        }
        cache.pages.push_back((*address, page.clone()));
        Ok(page)
    }

    /// A chunk's bytes; decoded and verified outside the cache lock so readers run in parallel.
    fn chunk(&self, hash: &[u8; 32]) -> Result<Arc<Vec<u8>>, StoreError> {
        {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, c)) = cache.chunks.iter().find(|(h, _)| h == hash) {
                return Ok(c.clone());
            }
        }
        let data = Arc::new(objects::read_chunk(&self.parts, hash)?);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.chunks.len() >= CHUNK_CACHE {
            cache.chunks.pop_front();
        }
        cache.chunks.push_back((*hash, data.clone()));
        Ok(data)
    }

    /// The bytes of a data segment.
    fn data<'a>(&self, chunk: &'a [u8], d: &DataRef) -> Result<&'a [u8], StoreError> {
        let start = d.chunk_offset as usize;
        chunk.get(start..start + d.len as usize).ok_or_else(|| StoreError::CorruptChunk {
            hash: d.chunk,
            reason: format!(
                "{} bytes long; a map page names bytes {start}..{}",
                chunk.len(),
                start + d.len as usize
            ),
            stored: true,
        })
    }

    /// Walks `[offset, offset + len)` in order as data and zero segments. A damaged root or
    /// page is an error, or with `tolerate` a [`Segment::Damaged`] covering what it maps.
    fn walk(
        &self,
        offset: u64,
        len: u64,
        tolerate: bool,
        mut f: impl FnMut(Segment) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let rs = self.parts.layout.region_size;
        let end = offset + len;
        let root = match &self.root {
            Ok(root) => root,
            Err(_) if tolerate => return f(Segment::Damaged(offset, len)),
            Err((path, e)) => return Err(StoreError::Format { path: path.clone(), source: e.clone() }),
        };
        let mut at = offset;
        while at < end {
            let region = at / rs;
            let base = region * rs;
            let Some(page) = root.get(&(region as u32)) else {
                // Zeroes up to the next region that has a page.
                let next = root.range(region as u32..).next().map_or(end, |(r, _)| u64::from(*r) * rs);
                let stop = end.min(next);
                f(Segment::Zero(at, stop - at))?;
                at = stop;
                continue;
            };
            let region_end = end.min(base + rs);
            let (a, b) = ((at - base) as u32, (region_end - base) as u32);
            let map = match self.page(page) {
                Ok(map) => map,
                Err(e) if tolerate && e.is_damage() => {
                    f(Segment::Damaged(at, region_end - at))?;
                    at = region_end;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut cur = a;
            for (s, d) in map.overlapping(a, b) {
                if s > cur {
                    f(Segment::Zero(base + u64::from(cur), u64::from(s - cur)))?;
                }
                cur = s + d.len;
                f(Segment::Data(base + u64::from(s), d))?;
            }
            if cur < b {
                f(Segment::Zero(base + u64::from(cur), u64::from(b - cur)))?;
            }
            at = region_end;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`; zero and unwritten ranges read as zeroes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.check_range(offset, buf.len() as u64)?;
        self.walk(offset, buf.len() as u64, false, |seg| {
            match seg {
                Segment::Zero(at, len) => {
                    let i = (at - offset) as usize;
                    buf[i..i + len as usize].fill(0);
                }
                Segment::Data(at, d) => {
                    let chunk = self.chunk(&d.chunk)?;
                    let i = (at - offset) as usize;
                    buf[i..i + d.len as usize].copy_from_slice(self.data(&chunk, &d)?);
                }
                Segment::Damaged(..) => unreachable!("not tolerated"),
            }
            Ok(())
        })
    }

    /// The blake3 of each `block`-sized piece of `[offset, offset + len)` (the last one may be
    /// shorter), hashed straight from the chunks without copying them into one buffer; a piece
    /// that lies in zero ranges only is `zero_hash(its length)`, without hashing anything.
    ///
    /// A piece that touches damaged data answers [`wire::UNREADABLE_HASH`], which matches no
    /// data, so the agent sends the piece again: any part of a chunk that fails verification
    /// (each chunk is verified whole, once per call, so every piece that names it is sent
    /// again, not only those whose bytes changed), a region whose map page is damaged, or
    /// anything under a damaged root. What is found damaged is quarantined.
    pub fn block_hashes(
        &self,
        offset: u64,
        len: u64,
        block: u64,
        zero_hash: impl Fn(u64) -> [u8; 32],
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        self.check_range(offset, len)?;
        assert!(block > 0, "block_hashes: a zero block size");
        let end = offset + len;
        let piece_end = |at: u64| (offset + ((at - offset) / block + 1) * block).min(end);
        let mut out = Vec::with_capacity(len.div_ceil(block) as usize);
        let mut hasher = blake3::Hasher::new();
        // Bytes of the current piece so far; zero bytes at its end not yet given to `hasher`
        // (a piece without data is never hashed); whether it holds data; whether it touches
        // damaged data.
        let (mut fed, mut zeroes, mut had_data, mut damaged) = (0u64, 0u64, false, false);
        let mut chunk: Option<([u8; 32], Arc<Vec<u8>>)> = None;
        let mut bad: Vec<[u8; 32]> = Vec::new();
        let info = &self.info;
        self.walk(offset, len, true, |seg| {
            let (start, seg_end, data) = match &seg {
                Segment::Zero(at, l) => (*at, at + l, Some(None)),
                Segment::Damaged(at, l) => {
                    tracing::warn!(
                        disk = %info.disk, point = info.id, offset = at, len = l,
                        "the map of this range is damaged: the agent will send it again"
                    );
                    (*at, at + l, None)
                }
                Segment::Data(at, d) => {
                    let end = at + u64::from(d.len);
                    if chunk.as_ref().map(|c| c.0) != Some(d.chunk) && !bad.contains(&d.chunk) {
                        match self.chunk(&d.chunk) {
                            Ok(bytes) => chunk = Some((d.chunk, bytes)),
                            Err(e) if e.is_damage() => {
                                tracing::warn!(
                                    disk = %info.disk, point = info.id,
                                    "cannot read the point back ({e}): the agent will send every block of this chunk again"
                                );
                                bad.push(d.chunk);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    match &chunk {
                        Some((h, bytes)) if *h == d.chunk => (*at, end, Some(Some(self.data(bytes, d)?))),
                        _ => (*at, end, None),
                    }
                }
            };
            let mut at = start;
            while at < seg_end {
                let pend = piece_end(at);
                let stop = pend.min(seg_end);
                match data {
                    None => damaged = true,
                    Some(Some(bytes)) if !damaged => {
                        wire::hash_zeroes(&mut hasher, std::mem::take(&mut zeroes));
                        let i = (at - start) as usize;
                        hasher.update(&bytes[i..i + (stop - at) as usize]);
                        had_data = true;
                    }
                    Some(Some(_)) => {}
                    Some(None) => zeroes += stop - at,
                }
                fed += stop - at;
                at = stop;
                if at == pend {
                    out.push(if damaged {
                        wire::UNREADABLE_HASH
                    } else if had_data {
                        wire::hash_zeroes(&mut hasher, std::mem::take(&mut zeroes));
                        *hasher.finalize().as_bytes()
                    } else {
                        zero_hash(fed)
                    });
                    hasher.reset();
                    (fed, zeroes, had_data, damaged) = (0, 0, false, false);
                }
            }
            Ok(())
        })?;
        debug_assert_eq!(fed, 0);
        Ok(out)
    }

    /// The ranges of `[offset, offset + len)`, in order, adjacent ranges of a kind merged.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, ExtentKind)>, StoreError> {
        self.check_range(offset, len)?;
        let mut out: Vec<(u64, u64, ExtentKind)> = Vec::new();
        self.walk(offset, len, false, |seg| {
            let (at, len, kind) = match seg {
                Segment::Zero(at, len) => (at, len, ExtentKind::Zero),
                Segment::Data(at, d) => (at, u64::from(d.len), ExtentKind::Data),
                Segment::Damaged(..) => unreachable!("not tolerated"),
            };
            match out.last_mut() {
                Some((s, l, k)) if *k == kind && *s + *l == at => *l += len,
                _ => out.push((at, len, kind)),
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Writes the point to `path` as an image: a regular file is created or truncated and its
    /// zero ranges left as holes; a block device gets zeroes written. Every chunk is verified;
    /// the target is fsynced before this returns. Memory stays bounded (a few pages and
    /// chunks). `progress` is called with (bytes done, total bytes).
    pub fn restore_to(
        &self,
        path: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RestoreReport, StoreError> {
        let device = fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        let mut file = if device {
            OpenOptions::new().write(true).open(path).map_err(StoreError::io("open", path))?
        } else {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(StoreError::io("create", path))?;
            f.set_len(self.size).map_err(StoreError::io("truncate", path))?;
            f
        };
        if device {
            let len = file.seek(SeekFrom::End(0)).map_err(StoreError::io("seek", path))?;
            if len < self.size {
                return Err(StoreError::OutOfRange { offset: 0, len: self.size, size: len });
            }
        }
        let zeroes = if device { vec![0u8; ZERO_BUF] } else { Vec::new() };
        let total = self.size;
        progress(0, total);
        // The walk runs here; RESTORE_THREADS workers read, verify and write the data
        // segments (positional writes, any order), so reading the store, decompressing,
        // hashing and writing overlap.
        let written = AtomicU64::new(0);
        let mut zeroed = 0u64;
        let stop = AtomicBool::new(false);
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, DataRef)>(RESTORE_QUEUE);
        let rx = Mutex::new(rx);
        let file = &file;
        std::thread::scope(|scope| -> Result<(), StoreError> {
            let workers: Vec<_> = (0..RESTORE_THREADS)
                .map(|_| {
                    scope.spawn(|| -> Result<(), StoreError> {
                        let result = (|| loop {
                            let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                            let Ok((at, d)) = next else { return Ok(()) };
                            let chunk = self.chunk(&d.chunk)?;
                            file.write_all_at(self.data(&chunk, &d)?, at)
                                .map_err(StoreError::io("write", path))?;
                            written.fetch_add(u64::from(d.len), Ordering::Relaxed);
                        })();
                        if result.is_err() {
                            stop.store(true, Ordering::Relaxed);
                        }
                        result
                    })
                })
                .collect();
            let walked = self.walk(0, total, false, |seg| {
                if stop.load(Ordering::Relaxed) {
                    // A worker failed; its error is the one reported.
                    return Err(StoreError::Poisoned);
                }
                match seg {
                    Segment::Data(at, d) => tx.send((at, d)).map_err(|_| StoreError::Poisoned)?,
                    Segment::Zero(at, len) => {
                        if device {
                            let mut done = 0;
                            while done < len {
                                let n = (len - done).min(ZERO_BUF as u64);
                                file.write_all_at(&zeroes[..n as usize], at + done)
                                    .map_err(StoreError::io("write", path))?;
                                done += n;
                            }
                        }
                        zeroed += len;
                    }
                    Segment::Damaged(..) => unreachable!("not tolerated"),
                }
                progress(written.load(Ordering::Relaxed) + zeroed, total);
                Ok(())
            });
            drop(tx);
            for w in workers {
                w.join().expect("restore worker panicked")?;
            }
            walked
        })?;
        let report = RestoreReport { bytes_written: written.into_inner(), bytes_zero: zeroed };
        progress(total, total);
        file.sync_all().map_err(StoreError::io("fsync", path))?;
        tracing::info!(
            disk = %self.info.disk, id = self.info.id, path = %path.display(),
            written = report.bytes_written, zero = report.bytes_zero, "restored"
        );
        Ok(report)
    }
}

impl Drop for PointReader {
    fn drop(&mut self) {
        self.parts.live().remove_reader(&self.info.disk, self.info.id);
    }
}
