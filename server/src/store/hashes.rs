//! Block hashes of a recovery point, for a resync (`docs/wire.md` §4.15): the blake3 of each
//! block-sized piece of a range, pieces in zero ranges from a cached zero hash
//! ([`wire::ZeroHashes`]), the rest hashed from their chunks by [`PointReader::block_hashes`].

use wire::{Hash, ZeroHashes, UNREADABLE_HASH};

use super::error::StoreError;
use super::reader::PointReader;

/// Bytes of a point read and hashed at once (with blocks up to this size).
const HASH_READ: u64 = 4 << 20;

/// Answers a session's hash queries (§4.15): the point compared stays open, and so kept by
/// retention, until the session asks about another one or ends.
#[derive(Default)]
pub(crate) struct PointHashes {
    reader: Option<PointReader>,
    zero: ZeroHashes,
}

impl PointHashes {
    /// The hashes of the `block`-sized pieces of `[offset, offset + len)` of `point`; `open`
    /// opens `point` when it is not the one open (the one open is closed first).
    pub(crate) fn answer(
        &mut self,
        point: u64,
        open: impl FnOnce() -> Result<PointReader, StoreError>,
        offset: u64,
        len: u64,
        block: u32,
    ) -> Result<Vec<Hash>, StoreError> {
        if self.reader.as_ref().is_none_or(|r| r.info().id != point) {
            self.reader = None;
            self.reader = Some(open()?);
        }
        let reader = self.reader.as_ref().expect("opened above");
        point_hashes(reader, offset, len, block, &mut self.zero)
    }
}

/// The blake3 of every `block`-sized piece of the point in `[offset, offset + len)`, the last
/// one cut at the end of the range (§4.15), by [`PointReader::block_hashes`]: pieces in zero
/// ranges from the cached zero hash, the rest hashed from their chunks in spans of up to
/// [`HASH_READ`] bytes, a large range by [`HASH_THREADS`] threads. A piece whose chunk is
/// missing or unreadable in the store answers [`UNREADABLE_HASH`].
fn point_hashes(
    reader: &PointReader,
    offset: u64,
    len: u64,
    block: u32,
    zero: &mut ZeroHashes,
) -> Result<Vec<Hash>, StoreError> {
    let block = u64::from(block);
    let n = wire::hash_count(len, block as u32) as usize;
    // The only lengths a piece has: the block, and maybe a short last one.
    let last = len - (n as u64 - 1) * block;
    let r = Pieces {
        reader,
        offset,
        end: offset + len,
        block,
        zero: (zero.remember(block), zero.remember(last)),
    };
    let threads = HASH_THREADS.min((len / HASH_READ) as usize).max(1);
    if threads == 1 {
        return r.hash(0, n);
    }
    let parts: Vec<Result<Vec<Hash>, StoreError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (from, to) = (n * t / threads, n * (t + 1) / threads);
                let r = &r;
                scope.spawn(move || r.hash(from, to))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("hashing thread panicked")).collect()
    });
    let mut out = Vec::with_capacity(n);
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

/// Threads one large `HashQuery` is hashed with.
const HASH_THREADS: usize = 2;

/// The pieces of one `HashQuery` range and what hashing them needs.
struct Pieces<'a> {
    reader: &'a PointReader,
    offset: u64,
    end: u64,
    block: u64,
    /// The zero hash of a whole block and of the last piece.
    zero: (Hash, Hash),
}

impl Pieces<'_> {
    fn piece(&self, i: usize) -> (u64, u64) {
        let s = self.offset + i as u64 * self.block;
        (s, (s + self.block).min(self.end))
    }

    /// The hashes of pieces `from..to` of `[s, e)`.
    fn hashes(&self, s: u64, e: u64) -> Result<Vec<Hash>, StoreError> {
        let (block, zero) = (self.block, self.zero);
        self.reader.block_hashes(s, e - s, block, |l| if l == block { zero.0 } else { zero.1 })
    }

    /// The hashes of pieces `from..to`.
    fn hash(&self, from: usize, to: usize) -> Result<Vec<Hash>, StoreError> {
        let span = (HASH_READ / self.block).max(1) as usize;
        let mut out = Vec::with_capacity(to - from);
        let mut i = from;
        while i < to {
            let j = (i + span).min(to);
            let (s, e) = (self.piece(i).0, self.piece(j - 1).1);
            match self.hashes(s, e) {
                Ok(h) => out.extend(h),
                Err(StoreError::CorruptChunk { stored: true, .. }) => {
                    // Find the pieces that cannot be read; the others still count.
                    for k in i..j {
                        let (ps, pe) = self.piece(k);
                        match self.hashes(ps, pe) {
                            Ok(h) => out.extend(h),
                            Err(e @ StoreError::CorruptChunk { stored: true, .. }) => {
                                let info = self.reader.info();
                                tracing::warn!(
                                    disk = %info.disk, point = info.id, offset = ps,
                                    "cannot read the point back ({e}): the agent will send this block again"
                                );
                                out.push(UNREADABLE_HASH);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) => return Err(e),
            }
            i = j;
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::{Consistency, GenerationKind, PointSel, Store, StoreOptions};

    pub(crate) const DISK: &str = "d0";
    /// Not a multiple of any hash block: the last piece of a query to the end is short.
    pub(crate) const SIZE: u64 = (1 << 20) + 5 * 512;

    /// Deterministic bytes (xorshift64*).
    pub(crate) fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    pub(crate) fn put(store: &Store, data: &[u8]) -> Hash {
        let hash = *blake3::hash(data).as_bytes();
        store.put_chunk(&hash, data.len() as u32, &zstd::bulk::compress(data, 1).unwrap()).unwrap();
        hash
    }

    /// A store (64 KiB map regions) holding one point of `DISK`: data extents, a zeroed one
    /// and never-written gaps. Returns the point's image too.
    pub(crate) fn store_with_point() -> (tempfile::TempDir, Store, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open_with(&dir.path().join("store"), &StoreOptions { region_size: 64 << 10 }).unwrap();
        store.register_disk(DISK, SIZE, 512).unwrap();
        let mut image = vec![0u8; SIZE as usize];
        let mut p = store.begin(DISK, 1, GenerationKind::InitialFull, None).unwrap();
        for (i, &(off, len)) in [
            (0u64, 8192u64),
            (12288, 512),
            (60 << 10, 10 << 10), // across a map region's end
            (200 << 10, 300 << 10),
            (SIZE - 1536, 1536), // the disk's last bytes
        ]
        .iter()
        .enumerate()
        {
            let data = bytes(i as u64 + 1, len as usize);
            p.add_chunk(off, len as u32, put(&store, &data)).unwrap();
            image[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        p.add_zero(300 << 10, 8192).unwrap();
        image[300 << 10..(300 << 10) + 8192].fill(0);
        p.commit(1, Consistency::Crash).unwrap();
        (dir, store, image)
    }

    pub(crate) fn expected(image: &[u8], offset: u64, len: u64, block: u32) -> Vec<Hash> {
        image[offset as usize..(offset + len) as usize]
            .chunks(block as usize)
            .map(|p| *blake3::hash(p).as_bytes())
            .collect()
    }

    #[test]
    fn hashes_equal_blake3_of_what_the_point_reads() {
        let (_dir, store, image) = store_with_point();
        let reader = store.open_point(DISK, PointSel::Id(1)).unwrap();
        let mut zero = ZeroHashes::default();
        for block in [4096u32, 8192, 64 << 10, 1 << 20, 64 << 20] {
            let b = u64::from(block);
            let mut ranges = vec![(0, SIZE), (0, 1), (SIZE / b * b, SIZE % b), (0, (3 * b + 100).min(SIZE))];
            if b < SIZE {
                ranges.extend([(b, SIZE - b), (b, b.min(SIZE - b))]);
            }
            for (offset, len) in ranges {
                if len == 0 {
                    continue;
                }
                let got = point_hashes(&reader, offset, len, block, &mut zero).unwrap();
                // The reference: blake3 of PointReader::read_at, piece by piece.
                let mut buf = vec![0u8; len as usize];
                reader.read_at(&mut buf, offset).unwrap();
                let from_read: Vec<Hash> =
                    buf.chunks(block as usize).map(|p| *blake3::hash(p).as_bytes()).collect();
                assert_eq!(got, from_read, "block {block}, range {offset}+{len}");
                assert_eq!(got, expected(&image, offset, len, block), "block {block}, range {offset}+{len}");
                assert_eq!(got.len() as u64, wire::hash_count(len, block));
            }
        }
        // Zero ranges hash as zeroes of their length, without data.
        let z = point_hashes(&reader, 512 << 10, 64 << 10, 4096, &mut zero).unwrap();
        assert!(z.iter().all(|h| h == blake3::hash(&[0; 4096]).as_bytes()));
        // Outside the disk: refused.
        assert!(matches!(
            point_hashes(&reader, SIZE - 4096, 8192, 4096, &mut zero),
            Err(StoreError::OutOfRange { .. })
        ));
    }

    #[test]
    fn a_large_range_is_hashed_by_several_threads_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let size = 24u64 << 20;
        store.register_disk(DISK, size, 4096).unwrap();
        let mut image = vec![0u8; size as usize];
        let mut p = store.begin(DISK, 1, GenerationKind::InitialFull, None).unwrap();
        for (i, off) in (0..size).step_by(3 << 20).enumerate() {
            let data = bytes(i as u64 + 10, 1 << 20);
            p.add_chunk(off, 1 << 20, put(&store, &data)).unwrap();
            image[off as usize..off as usize + (1 << 20)].copy_from_slice(&data);
        }
        p.commit(1, Consistency::Crash).unwrap();
        let reader = store.open_point(DISK, PointSel::Id(1)).unwrap();
        for (offset, len, block) in
            [(0, size, 64 << 10), (4 << 20, size - (4 << 20) - 4096, 4096), (0, size, 1 << 20)]
        {
            assert!(len >= HASH_THREADS as u64 * HASH_READ);
            let got = point_hashes(&reader, offset, len, block, &mut ZeroHashes::default()).unwrap();
            assert_eq!(
                got,
                expected(&image, offset, len, block),
                "range {offset}+{len} in blocks of {block}"
            );
        }
    }

    /// The file of a stored chunk, wherever the store keeps it.
    fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()? {
            let p = e.ok()?.path();
            if p.is_dir() {
                if let Some(f) = find_file(&p, name) {
                    return Some(f);
                }
            } else if p.file_name().is_some_and(|n| n == name) {
                return Some(p);
            }
        }
        None
    }

    #[test]
    fn an_unreadable_chunk_answers_a_hash_that_matches_nothing() {
        let (_dir, store, image) = store_with_point();
        // Corrupt the chunk at 200 KiB (300 KiB long). Bytes that changed are hashed as they
        // are: the pieces holding them answer a hash that is not theirs. A missing chunk: all
        // its pieces answer UNREADABLE_HASH. Every other piece answers its real hash.
        let hash = *blake3::hash(&bytes(4, 300 << 10)).as_bytes();
        let name: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let path = find_file(store.root(), &name).expect("the chunk's file");
        let mut data = std::fs::read(&path).unwrap();
        let n = data.len();
        data[n - 10] ^= 0xff;
        std::fs::write(&path, data).unwrap();
        let want = expected(&image, 0, SIZE, 64 << 10);
        for missing in [false, true] {
            if missing {
                // The damaged chunk was quarantined (moved away) by the first round's read.
                assert!(!path.exists());
            }
            let reader = store.open_point(DISK, PointSel::Id(1)).unwrap();
            let got = point_hashes(&reader, 0, SIZE, 64 << 10, &mut ZeroHashes::default()).unwrap();
            assert_eq!(got.len(), want.len());
            let mut differ = 0;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let (s, e) = ((i as u64) << 16, ((i as u64 + 1) << 16).min(SIZE));
                let in_chunk = s < 500 << 10 && e > 200 << 10 && !(s >= 300 << 10 && e <= (300 << 10) + 8192);
                if in_chunk && missing {
                    assert_eq!(*g, UNREADABLE_HASH, "piece {i}");
                } else if !in_chunk {
                    assert_eq!(g, w, "piece {i}");
                }
                differ += usize::from(g != w);
            }
            assert!(differ > 0, "the corrupt chunk went unnoticed (missing: {missing})");
        }
    }
}
