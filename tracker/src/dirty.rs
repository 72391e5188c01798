//! The dirty map: one bit per block, sparse, lock-free to mark.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::bits::SparseBits;
use crate::format::{LeafData, StateWriter};

/// Smallest tracking granularity in bytes.
pub const MIN_GRANULARITY: u64 = 512;
/// Largest tracking granularity in bytes.
pub const MAX_GRANULARITY: u64 = 1 << 20;

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

/// What the tracker knows of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockState {
    /// Not changed.
    Clean,
    /// Changed: its data must be read and shipped.
    Data,
    /// Changed, and known to read as zeroes (trimmed or zeroed whole): ship as metadata.
    Zero,
}

/// The set of dirty blocks of a disk, with the subset known to be zero.
///
/// Marking is lock-free apart from the first mark of a leaf, which allocates it once (a
/// concurrent marker of the same leaf waits for that allocation only). Reads of the map are
/// racy snapshots by design: a block marked concurrently may or may not be seen.
pub struct DirtyMap {
    size: u64,
    shift: u32,
    blocks: u64,
    dirty: SparseBits,
    zero: SparseBits,
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
        Ok(Self {
            size,
            shift,
            blocks,
            dirty: SparseBits::new(blocks),
            zero: SparseBits::new(blocks),
            dirty_blocks: AtomicU64::new(0),
        })
    }

    /// A clean map with the same geometry.
    pub fn empty_like(&self) -> Self {
        Self::new(self.size, self.granularity()).expect("same geometry")
    }

    /// Size of the tracked disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Tracking granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Blocks `[first, end)` that `[offset, offset+len)` touches, clipped to the disk.
    pub fn block_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset >> self.shift, ((end - 1) >> self.shift) + 1))
    }

    /// Marks every block that `[offset, offset+len)` touches as changed data.
    pub fn mark(&self, offset: u64, len: u64) {
        if let Some((first, end)) = self.block_range(offset, len) {
            self.zero.clear_range(first, end);
            self.add_dirty(first, end);
        }
    }

    /// Marks a trimmed or zeroed range: every touched block is dirty; the blocks it covers
    /// whole (or up to the end of the disk) are known to be zero.
    pub fn mark_zero(&self, offset: u64, len: u64) {
        let Some((first, end)) = self.block_range(offset, len) else { return };
        let g = self.granularity();
        let stop = offset.saturating_add(len).min(self.size);
        let zfirst = offset.div_ceil(g);
        let zend = if stop == self.size { self.blocks } else { stop / g };
        if zfirst < zend {
            self.zero.set_range(zfirst, zend);
        }
        self.add_dirty(first, end);
    }

    fn add_dirty(&self, first: u64, end: u64) {
        let newly = self.dirty.set_range(first, end);
        if newly > 0 {
            self.dirty_blocks.fetch_add(newly, Ordering::Relaxed);
        }
    }

    /// Marks a whole block range dirty (as data), e.g. a recovered hot region.
    pub fn mark_blocks(&self, first: u64, end: u64) {
        let end = end.min(self.blocks);
        if first < end {
            self.zero.clear_range(first, end);
            self.add_dirty(first, end);
        }
    }

    /// Whether block number `block` is dirty.
    pub fn is_dirty_block(&self, block: u64) -> bool {
        self.dirty.get(block)
    }

    /// Whether any block in `[first, end)` is dirty.
    pub fn any_dirty(&self, first: u64, end: u64) -> bool {
        self.dirty.any(first, end)
    }

    /// The state of one block.
    pub fn block_state(&self, block: u64) -> BlockState {
        if !self.dirty.get(block) {
            BlockState::Clean
        } else if self.zero.get(block) {
            BlockState::Zero
        } else {
            BlockState::Data
        }
    }

    fn block_bytes(&self, blocks: u64, includes_last: bool) -> u64 {
        let bytes = blocks << self.shift;
        let tail = self.size % self.granularity();
        if includes_last && tail != 0 {
            bytes - (self.granularity() - tail)
        } else {
            bytes
        }
    }

    /// Number of dirty bytes (dirty blocks times granularity, the last block clipped).
    pub fn dirty_bytes(&self) -> u64 {
        let blocks = self.dirty_blocks.load(Ordering::Relaxed);
        self.block_bytes(blocks, blocks > 0 && self.is_dirty_block(self.blocks - 1))
    }

    /// Number of dirty bytes known to be zero (a popcount over the leaves both sets have).
    pub fn zero_bytes(&self) -> u64 {
        let (blocks, last) = self.zero.count_and(&self.dirty);
        self.block_bytes(blocks, last)
    }

    /// Heap bytes the map uses now.
    pub fn memory_bytes(&self) -> usize {
        self.dirty.memory_bytes() + self.zero.memory_bytes()
    }

    /// The runs of equal state covering `[offset, offset+len)`, clipped to that range and to
    /// the disk, at most `max_runs` of them (the last run may then end early).
    pub fn runs(&self, offset: u64, len: u64, max_runs: usize) -> Vec<(Extent, BlockState)> {
        let mut out = Vec::new();
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end || max_runs == 0 {
            return out;
        }
        let end_block = ((end - 1) >> self.shift) + 1;
        let mut pos = offset;
        while pos < end && out.len() < max_runs {
            let block = pos >> self.shift;
            let state = self.block_state(block);
            let next = match state {
                BlockState::Clean => self.dirty.next(block + 1, end_block, true),
                BlockState::Data => {
                    let a = self.dirty.next(block + 1, end_block, false);
                    self.zero.next(block + 1, a, true)
                }
                BlockState::Zero => {
                    let a = self.dirty.next(block + 1, end_block, false);
                    self.zero.next(block + 1, a, false)
                }
            };
            let run_end = (next << self.shift).min(end);
            out.push((Extent::new(pos, run_end - pos), state));
            pos = run_end;
        }
        out
    }

    /// Every dirty extent (data or zero), coalesced, in order.
    pub fn dirty_extents(&self) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for (e, s) in self.runs(0, self.size, usize::MAX) {
            if s == BlockState::Clean {
                continue;
            }
            match out.last_mut() {
                Some(l) if l.end() == e.offset => l.len += e.len,
                _ => out.push(e),
            }
        }
        out
    }

    /// Adds every dirty block of `other` (same geometry) to this map, keeping zero knowledge
    /// only where both agree or this map had the block clean.
    pub fn merge_from(&self, other: &DirtyMap) {
        assert_eq!((self.size, self.shift), (other.size, other.shift), "merging maps of different geometry");
        for (e, s) in other.runs(0, other.size, usize::MAX) {
            match s {
                BlockState::Clean => {}
                BlockState::Data => self.mark(e.offset, e.len),
                BlockState::Zero => {
                    let (first, end) = self.block_range(e.offset, e.len).expect("non-empty run");
                    // A block already holding data stays data: we cannot know which came last.
                    let mut b = first;
                    while b < end {
                        let clean_end = self.dirty.next(b, end, true);
                        if clean_end > b {
                            self.zero.set_range(b, clean_end);
                            self.add_dirty(b, clean_end);
                        }
                        b = self.dirty.next(clean_end, end, false);
                    }
                }
            }
        }
    }

    /// Writes the dirty set's leaves, then the zero set's, to a state file.
    pub(crate) fn write_to<W: io::Write>(&self, out: &mut StateWriter<W>) -> io::Result<()> {
        self.dirty.write_to(out)?;
        self.zero.write_to(out)
    }

    /// Number of leaves of each set (for bounds-checking stored indexes).
    pub(crate) fn leaf_count(&self) -> usize {
        self.dirty.leaf_count()
    }

    /// ORs stored leaves in (indexes and lengths already checked).
    pub(crate) fn import(&self, dirty: &[(u32, LeafData<'_>)], zero: &[(u32, LeafData<'_>)]) {
        for (i, data) in dirty {
            let newly = self.dirty.import_leaf(*i, data);
            self.dirty_blocks.fetch_add(newly, Ordering::Relaxed);
        }
        for (i, data) in zero {
            self.zero.import_leaf(*i, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bits::LEAF_BITS;
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
        let (tib, gib) = (1u64 << 40, 1u64 << 30);
        let slots = DirtyMap::new(tib, 4096).unwrap().memory_bytes();
        assert!(slots <= 1 << 20, "{slots}");
        // Zeroed whole in 1 GiB pieces (mkfs with discard): no bitmap at all.
        let m = DirtyMap::new(tib, 4096).unwrap();
        for i in 0..1024 {
            m.mark_zero(i * gib, gib);
        }
        assert_eq!((m.dirty_bytes(), m.zero_bytes(), m.memory_bytes()), (tib, tib, slots));
        // Then one data block in every leaf: the zero set holds a bitmap per leaf.
        let leaf_span = LEAF_BITS * 4096;
        for leaf in 0..tib / leaf_span {
            m.mark(leaf * leaf_span + 8192, 4096);
        }
        assert_eq!(m.zero_bytes(), tib - (tib / leaf_span) * 4096);
        assert!(m.memory_bytes() <= 40 << 20, "{}", m.memory_bytes());
        // Every leaf set piecemeal first, then all of it: one bitmap per leaf, no more.
        let m = DirtyMap::new(tib, 4096).unwrap();
        for leaf in 0..tib / leaf_span {
            m.mark(leaf * leaf_span + 4096, 4096);
        }
        m.mark(0, tib);
        assert_eq!(m.dirty_bytes(), tib);
        assert_eq!(m.dirty_extents(), vec![Extent::new(0, tib)]);
        assert!(m.memory_bytes() <= 40 << 20, "{}", m.memory_bytes());
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

    fn model_runs(set: &BTreeSet<u64>, g: u64, size: u64, off: u64, len: u64) -> Vec<(Extent, BlockState)> {
        let mut out: Vec<(Extent, BlockState)> = Vec::new();
        let end = (off + len).min(size);
        let mut pos = off;
        while pos < end {
            let b = pos / g;
            let next = ((b + 1) * g).min(end);
            let d = if set.contains(&b) { BlockState::Data } else { BlockState::Clean };
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
