//! A sparse atomic bitset: leaves of 2^15 bits allocated on first set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Bits per leaf: 2^15 bits = 4 KiB of bitmap, 128 MiB of disk at a 4 KiB granularity.
pub(crate) const LEAF_SHIFT: u32 = 15;
pub(crate) const LEAF_BITS: u64 = 1 << LEAF_SHIFT;
pub(crate) const LEAF_WORDS: usize = (LEAF_BITS / 64) as usize;
/// Bytes of one serialized leaf.
pub(crate) const LEAF_BYTES: usize = LEAF_WORDS * 8;

type Leaf = Box<[AtomicU64]>;

/// Serialized leaves: (leaf index, `LEAF_BYTES` little-endian bytes).
pub(crate) type Leaves = Vec<(u32, Vec<u8>)>;

fn new_leaf() -> Leaf {
    (0..LEAF_WORDS).map(|_| AtomicU64::new(0)).collect()
}

/// `nbits` bits, all clear until set; memory grows with the leaves touched.
pub(crate) struct SparseBits {
    nbits: u64,
    leaves: Box<[OnceLock<Leaf>]>,
}

/// Calls `f(leaf, word, mask)` for each word-piece of the bit range `[first, end)`.
fn for_words(first: u64, end: u64, mut f: impl FnMut(usize, usize, u64)) {
    let mut b = first;
    while b < end {
        let leaf = (b >> LEAF_SHIFT) as usize;
        let bit = b & (LEAF_BITS - 1);
        let word = (bit / 64) as usize;
        let lo = bit % 64;
        let n = (end - b).min(64 - lo);
        let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << lo };
        f(leaf, word, mask);
        b += n;
    }
}

impl std::fmt::Debug for SparseBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseBits").field("nbits", &self.nbits).finish()
    }
}

impl SparseBits {
    pub(crate) fn new(nbits: u64) -> Self {
        let nleaves = nbits.div_ceil(LEAF_BITS) as usize;
        Self { nbits, leaves: (0..nleaves).map(|_| OnceLock::new()).collect() }
    }

    /// Sets bits `[first, end)`; returns how many were clear before.
    pub(crate) fn set_range(&self, first: u64, end: u64) -> u64 {
        let mut newly = 0u64;
        for_words(first, end.min(self.nbits), |leaf, word, mask| {
            let w = &self.leaves[leaf].get_or_init(new_leaf)[word];
            if w.load(Ordering::Relaxed) & mask != mask {
                let old = w.fetch_or(mask, Ordering::AcqRel);
                newly += u64::from((mask & !old).count_ones());
            }
        });
        newly
    }

    /// Clears bits `[first, end)`; returns how many were set before. Untouched leaves stay
    /// unallocated.
    pub(crate) fn clear_range(&self, first: u64, end: u64) -> u64 {
        let mut cleared = 0u64;
        for_words(first, end.min(self.nbits), |leaf, word, mask| {
            if let Some(l) = self.leaves[leaf].get() {
                let w = &l[word];
                if w.load(Ordering::Relaxed) & mask != 0 {
                    let old = w.fetch_and(!mask, Ordering::AcqRel);
                    cleared += u64::from((mask & old).count_ones());
                }
            }
        });
        cleared
    }

    pub(crate) fn get(&self, bit: u64) -> bool {
        if bit >= self.nbits {
            return false;
        }
        match self.leaves[(bit >> LEAF_SHIFT) as usize].get() {
            None => false,
            Some(leaf) => {
                let i = bit & (LEAF_BITS - 1);
                leaf[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
            }
        }
    }

    /// Whether any bit in `[first, end)` is set.
    pub(crate) fn any(&self, first: u64, end: u64) -> bool {
        self.next(first, end.min(self.nbits), true) < end.min(self.nbits)
    }

    /// First bit in `[bit, end)` whose value is `want`, or `end`.
    pub(crate) fn next(&self, mut bit: u64, end: u64, want: bool) -> u64 {
        while bit < end {
            let leaf_idx = (bit >> LEAF_SHIFT) as usize;
            let leaf_end = ((leaf_idx as u64 + 1) << LEAF_SHIFT).min(end);
            let Some(leaf) = self.leaves[leaf_idx].get() else {
                if !want {
                    return bit;
                }
                bit = leaf_end;
                continue;
            };
            while bit < leaf_end {
                let i = bit & (LEAF_BITS - 1);
                let mut w = leaf[(i / 64) as usize].load(Ordering::Acquire);
                if !want {
                    w = !w;
                }
                w &= u64::MAX << (i % 64);
                if w != 0 {
                    let found = (bit & !63) + u64::from(w.trailing_zeros());
                    return found.min(end);
                }
                bit = (bit & !63) + 64;
            }
            bit = bit.min(end);
        }
        end
    }

    /// Number of bits set both here and in `other` (same length), and whether the last bit
    /// is among them. A scan of the leaves both have allocated.
    pub(crate) fn count_and(&self, other: &SparseBits) -> (u64, bool) {
        let mut n = 0u64;
        for (a, b) in self.leaves.iter().zip(other.leaves.iter()) {
            if let (Some(a), Some(b)) = (a.get(), b.get()) {
                for (x, y) in a.iter().zip(b.iter()) {
                    n += u64::from((x.load(Ordering::Acquire) & y.load(Ordering::Acquire)).count_ones());
                }
            }
        }
        let last = self.nbits.checked_sub(1).is_some_and(|l| self.get(l) && other.get(l));
        (n, last)
    }

    /// Heap bytes in use.
    pub(crate) fn memory_bytes(&self) -> usize {
        let allocated = self.leaves.iter().filter(|l| l.get().is_some()).count();
        std::mem::size_of_val(&*self.leaves) + allocated * LEAF_BYTES
    }

    /// Allocated leaves with at least one bit set, as (leaf index, little-endian words).
    pub(crate) fn export_leaves(&self) -> Leaves {
        let mut out = Vec::new();
        for (i, l) in self.leaves.iter().enumerate() {
            let Some(l) = l.get() else { continue };
            let words: Vec<u64> = l.iter().map(|w| w.load(Ordering::Acquire)).collect();
            if words.iter().all(|&w| w == 0) {
                continue;
            }
            let mut bytes = Vec::with_capacity(LEAF_BYTES);
            for w in words {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
            out.push((i as u32, bytes));
        }
        out
    }

    /// ORs a serialized leaf in; returns newly set bits. `bytes` must be `LEAF_BYTES` long and
    /// `leaf` in range (the caller checked both).
    pub(crate) fn import_leaf(&self, leaf: u32, bytes: &[u8]) -> u64 {
        let l = self.leaves[leaf as usize].get_or_init(new_leaf);
        let mut newly = 0;
        let base = u64::from(leaf) << LEAF_SHIFT;
        for (i, c) in bytes.chunks_exact(8).enumerate() {
            let mut w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            // Never set bits past the end.
            let first = base + i as u64 * 64;
            if first >= self.nbits {
                break;
            }
            if self.nbits - first < 64 {
                w &= (1u64 << (self.nbits - first)) - 1;
            }
            if w != 0 {
                let old = l[i].fetch_or(w, Ordering::AcqRel);
                newly += u64::from((w & !old).count_ones());
            }
        }
        newly
    }

    pub(crate) fn leaf_count(&self) -> usize {
        self.leaves.len()
    }
}
