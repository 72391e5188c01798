//! The dirty map: one bit per block, sparse, lock-free to mark.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Smallest tracking granularity in bytes.
pub const MIN_GRANULARITY: u64 = 512;
/// Largest tracking granularity in bytes.
pub const MAX_GRANULARITY: u64 = 1 << 20;

/// Bits per leaf: 2^15 bits = 4 KiB of bitmap, 128 MiB of disk at a 4 KiB granularity.
const LEAF_SHIFT: u32 = 15;
const LEAF_BITS: u64 = 1 << LEAF_SHIFT;
const LEAF_WORDS: usize = (LEAF_BITS / 64) as usize;

/// A byte range of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn new(offset: u64, len: u64) -> Self {
        Self { offset, len }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A granularity that is not a power of two in `MIN_GRANULARITY..=MAX_GRANULARITY`.
#[derive(Debug, thiserror::Error)]
#[error("granularity {0} is not a power of two from 512 to 1048576 bytes")]
pub struct GranularityError(pub u64);

type Leaf = Box<[AtomicU64]>;

/// The set of dirty blocks of a disk.
///
/// Marking is lock-free apart from the first mark of a leaf, which allocates it once (a
/// concurrent marker of the same leaf waits for that allocation only). Reads of the map are
/// racy snapshots by design: a block marked concurrently may or may not be seen.
pub struct DirtyMap {
    size: u64,
    shift: u32,
    blocks: u64,
    leaves: Box<[OnceLock<Leaf>]>,
    dirty_blocks: AtomicU64,
}

impl std::fmt::Debug for DirtyMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyMap")
            .field("size", &self.size)
            .field("granularity", &self.granularity())
            .field("dirty_bytes", &self.dirty_bytes())
            .finish()
    }
}

impl DirtyMap {
    /// A clean map of a disk of `size` bytes, tracked in blocks of `granularity` bytes.
    pub fn new(size: u64, granularity: u64) -> Result<Self, GranularityError> {
        if !granularity.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity) {
            return Err(GranularityError(granularity));
        }
        let shift = granularity.trailing_zeros();
        let blocks = size.div_ceil(granularity);
        let nleaves = blocks.div_ceil(LEAF_BITS) as usize;
        let leaves = (0..nleaves).map(|_| OnceLock::new()).collect();
        Ok(Self { size, shift, blocks, leaves, dirty_blocks: AtomicU64::new(0) })
    }

    /// Size of the tracked disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Tracking granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Marks every block that `[offset, offset+len)` touches. Bytes past the end are ignored.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset >> self.shift;
        let last = (end - 1) >> self.shift;
        let mut b = first;
        while b <= last {
            let leaf_idx = (b >> LEAF_SHIFT) as usize;
            let leaf = self.leaves[leaf_idx].get_or_init(new_leaf);
            let leaf_end = ((leaf_idx as u64 + 1) << LEAF_SHIFT).min(last + 1);
            let mut newly = 0u64;
            while b < leaf_end {
                let bit = b & (LEAF_BITS - 1);
                let word = (bit / 64) as usize;
                let lo = bit % 64;
                let n = (leaf_end - b).min(64 - lo);
                let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << lo };
                // Relaxed is enough for the bit itself: the caller's reply (a syscall) orders it.
                let w = &leaf[word];
                if w.load(Ordering::Relaxed) & mask != mask {
                    let old = w.fetch_or(mask, Ordering::AcqRel);
                    newly += u64::from((mask & !old).count_ones());
                }
                b += n;
            }
            if newly > 0 {
                self.dirty_blocks.fetch_add(newly, Ordering::Relaxed);
            }
        }
    }

    /// Whether block number `block` is dirty.
    pub fn is_dirty_block(&self, block: u64) -> bool {
        if block >= self.blocks {
            return false;
        }
        match self.leaves[(block >> LEAF_SHIFT) as usize].get() {
            None => false,
            Some(leaf) => {
                let bit = block & (LEAF_BITS - 1);
                leaf[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
            }
        }
    }

    /// Number of dirty bytes (dirty blocks times granularity, the last block clipped).
    pub fn dirty_bytes(&self) -> u64 {
        let blocks = self.dirty_blocks.load(Ordering::Relaxed);
        let bytes = blocks << self.shift;
        if blocks > 0 && !self.size.is_multiple_of(self.granularity()) && self.is_dirty_block(self.blocks - 1) {
            bytes - (self.granularity() - self.size % self.granularity())
        } else {
            bytes
        }
    }

    /// Heap bytes the map uses now.
    pub fn memory_bytes(&self) -> usize {
        let allocated = self.leaves.iter().filter(|l| l.get().is_some()).count();
        std::mem::size_of_val(&*self.leaves) + allocated * LEAF_WORDS * 8
    }

    /// First block in `[block, end)` whose dirtiness is `want`, or `end`.
    fn next_block(&self, mut block: u64, end: u64, want: bool) -> u64 {
        while block < end {
            let leaf_idx = (block >> LEAF_SHIFT) as usize;
            let leaf_end = ((leaf_idx as u64 + 1) << LEAF_SHIFT).min(end);
            let Some(leaf) = self.leaves[leaf_idx].get() else {
                if !want {
                    return block;
                }
                block = leaf_end;
                continue;
            };
            while block < leaf_end {
                let bit = block & (LEAF_BITS - 1);
                let mut w = leaf[(bit / 64) as usize].load(Ordering::Acquire);
                if !want {
                    w = !w;
                }
                w &= u64::MAX << (bit % 64);
                if w != 0 {
                    let found = (block & !63) + u64::from(w.trailing_zeros());
                    return found.min(end);
                }
                block = (block & !63) + 64;
            }
            block = block.min(end);
        }
        end
    }

    /// The runs of equal dirtiness covering `[offset, offset+len)`, clipped to that range and to
    /// the disk, at most `max_runs` of them (the last run may then end early).
    pub fn runs(&self, offset: u64, len: u64, max_runs: usize) -> Vec<(Extent, bool)> {
        let mut out = Vec::new();
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end || max_runs == 0 {
            return out;
        }
        let end_block = ((end - 1) >> self.shift) + 1;
        let mut pos = offset;
        while pos < end && out.len() < max_runs {
            let block = pos >> self.shift;
            let dirty = self.is_dirty_block(block);
            let next = self.next_block(block + 1, end_block, !dirty);
            let run_end = (next << self.shift).min(end);
            out.push((Extent::new(pos, run_end - pos), dirty));
            pos = run_end;
        }
        out
    }

    /// Every dirty extent, coalesced, in order.
    pub fn dirty_extents(&self) -> Vec<Extent> {
        self.runs(0, self.size, usize::MAX).into_iter().filter(|(_, d)| *d).map(|(e, _)| e).collect()
    }
}

fn new_leaf() -> Leaf {
    (0..LEAF_WORDS).map(|_| AtomicU64::new(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn rejects_bad_granularity() {
        for g in [0, 256, 1000, 4095, 2 << 20] {
            assert!(DirtyMap::new(1 << 30, g).is_err(), "{g}");
        }
        for g in [512, 4096, 1 << 20] {
            assert!(DirtyMap::new(1 << 30, g).is_ok(), "{g}");
        }
    }

    #[test]
    fn marks_unaligned_ranges_at_granularity() {
        let m = DirtyMap::new(1 << 20, 4096).unwrap();
        m.mark(4095, 2);
        assert_eq!(m.dirty_extents(), vec![Extent::new(0, 8192)]);
        assert_eq!(m.dirty_bytes(), 8192);
        m.mark(100_000, 1);
        assert_eq!(m.dirty_extents(), vec![Extent::new(0, 8192), Extent::new(98304, 4096)]);
    }

    #[test]
    fn clips_last_block_to_disk_size() {
        let m = DirtyMap::new(10_000, 4096).unwrap();
        m.mark(9_000, 5_000);
        assert_eq!(m.dirty_extents(), vec![Extent::new(8192, 10_000 - 8192)]);
        assert_eq!(m.dirty_bytes(), 10_000 - 8192);
    }

    #[test]
    fn idle_terabyte_is_small_and_full_terabyte_fits() {
        let tib = 1u64 << 40;
        let m = DirtyMap::new(tib, 4096).unwrap();
        assert!(m.memory_bytes() <= 1 << 20, "{}", m.memory_bytes());
        // Every block dirty: 2^28 bits = 32 MiB of leaves plus the slots.
        let full = (tib / 4096 / 8) as usize + m.memory_bytes();
        assert!(full <= 40 << 20, "{full}");
    }

    #[test]
    fn crosses_leaves() {
        let g = 512u64;
        let m = DirtyMap::new(LEAF_BITS * g * 3, g).unwrap();
        let off = LEAF_BITS * g - 1024;
        m.mark(off, 4096);
        assert_eq!(m.dirty_extents(), vec![Extent::new(off, 4096)]);
        assert_eq!(m.runs(0, m.size(), 10).len(), 3);
    }

    fn model_runs(set: &BTreeSet<u64>, g: u64, size: u64, off: u64, len: u64) -> Vec<(Extent, bool)> {
        let mut out: Vec<(Extent, bool)> = Vec::new();
        let end = (off + len).min(size);
        let mut pos = off;
        while pos < end {
            let b = pos / g;
            let next = ((b + 1) * g).min(end);
            let d = set.contains(&b);
            match out.last_mut() {
                Some((e, dd)) if *dd == d => e.len += next - pos,
                _ => out.push((Extent::new(pos, next - pos), d)),
            }
            pos = next;
        }
        out
    }

    proptest! {
        #[test]
        fn matches_btreeset_model(
            gshift in 9u32..=13,
            size in 1u64..(1 << 24),
            marks in proptest::collection::vec((0u64..(1 << 24), 0u64..(1 << 16)), 0..40),
            query in (0u64..(1 << 24), 1u64..(1 << 24)),
        ) {
            let g = 1u64 << gshift;
            let m = DirtyMap::new(size, g).unwrap();
            let mut model = BTreeSet::new();
            for (o, l) in marks {
                m.mark(o, l);
                if l > 0 && o < size {
                    let end = (o + l).min(size);
                    for b in o / g..=(end - 1) / g {
                        model.insert(b);
                    }
                }
            }
            let blocks = size.div_ceil(g);
            for b in 0..blocks.min(5000) {
                prop_assert_eq!(m.is_dirty_block(b), model.contains(&b));
            }
            let expect_bytes: u64 = model.iter().map(|b| ((b + 1) * g).min(size) - b * g).sum();
            prop_assert_eq!(m.dirty_bytes(), expect_bytes);
            let (qo, ql) = query;
            prop_assert_eq!(m.runs(qo, ql, usize::MAX), model_runs(&model, g, size, qo, ql));
        }
    }
}
