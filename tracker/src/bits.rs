//! A sparse atomic bitset in leaves of 2^15 bits.
//!
//! A leaf costs nothing until a bit in it is set. A range that covers a whole leaf makes it
//! *full*, which costs no bitmap either: a full leaf keeps only the bits cleared since, and only
//! once one is. So a set that is everything (a disk zeroed or trimmed whole, every block dirty
//! after a big copy) stays small, and memory grows only with the leaves set piecemeal.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::format::{LeafData, StateWriter};

/// Bits per leaf: 2^15 bits = 4 KiB of bitmap, 128 MiB of disk at a 4 KiB granularity.
pub(crate) const LEAF_SHIFT: u32 = 15;
pub(crate) const LEAF_BITS: u64 = 1 << LEAF_SHIFT;
pub(crate) const LEAF_WORDS: usize = (LEAF_BITS / 64) as usize;
/// Bytes of one serialized leaf.
pub(crate) const LEAF_BYTES: usize = LEAF_WORDS * 8;

type Words = Box<[AtomicU64; LEAF_WORDS]>;

fn zeroed() -> Words {
    Box::new(std::array::from_fn(|_| AtomicU64::new(0)))
}

/// One leaf's bits. Which form a leaf takes is decided once, by the first set that reaches it.
enum Leaf {
    /// The set bits.
    Bits(Words),
    /// Every bit set, except the ones in `holes` (allocated by the first clear).
    Full { holes: OnceLock<Words> },
}

/// Sets `mask` in word `w` of `leaf`; returns how many of its bits were clear.
fn or_word(leaf: &Leaf, w: usize, mask: u64) -> u64 {
    match leaf {
        Leaf::Bits(words) => {
            let word = &words[w];
            if word.load(Ordering::Relaxed) & mask == mask {
                return 0;
            }
            u64::from((mask & !word.fetch_or(mask, Ordering::AcqRel)).count_ones())
        }
        Leaf::Full { holes } => {
            let Some(holes) = holes.get() else { return 0 };
            let word = &holes[w];
            if word.load(Ordering::Relaxed) & mask == 0 {
                return 0;
            }
            u64::from((mask & word.fetch_and(!mask, Ordering::AcqRel)).count_ones())
        }
    }
}

/// Clears `mask` in word `w` of `leaf`; returns how many of its bits were set.
fn and_not_word(leaf: &Leaf, w: usize, mask: u64) -> u64 {
    match leaf {
        Leaf::Bits(words) => {
            let word = &words[w];
            if word.load(Ordering::Relaxed) & mask == 0 {
                return 0;
            }
            u64::from((mask & word.fetch_and(!mask, Ordering::AcqRel)).count_ones())
        }
        Leaf::Full { holes } => {
            let word = &holes.get_or_init(zeroed)[w];
            if word.load(Ordering::Relaxed) & mask == mask {
                return 0;
            }
            u64::from((mask & !word.fetch_or(mask, Ordering::AcqRel)).count_ones())
        }
    }
}

/// Calls `f(word, mask)` for each word-piece of the leaf-relative bit range `[lo, hi)`.
fn for_words(lo: u64, hi: u64, mut f: impl FnMut(usize, u64)) {
    let mut b = lo;
    while b < hi {
        let word = (b / 64) as usize;
        let low = b % 64;
        let n = (hi - b).min(64 - low);
        let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << low };
        f(word, mask);
        b += n;
    }
}

/// `nbits` bits, all clear until set; memory grows with the leaves set piecemeal.
pub(crate) struct SparseBits {
    nbits: u64,
    leaves: Box<[OnceLock<Leaf>]>,
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

    /// Bits in leaf `leaf` (the last one may be short).
    fn leaf_len(&self, leaf: usize) -> u64 {
        (self.nbits - ((leaf as u64) << LEAF_SHIFT)).min(LEAF_BITS)
    }

    /// The bits of word `w` of leaf `leaf` that exist (the last leaf may end mid-word).
    fn valid(&self, leaf: usize, w: usize) -> u64 {
        let left = self.leaf_len(leaf).saturating_sub(w as u64 * 64);
        if left >= 64 {
            u64::MAX
        } else {
            (1u64 << left) - 1
        }
    }

    /// Word `w` of leaf `leaf`, as bits.
    fn word(&self, leaf: usize, w: usize) -> u64 {
        match self.leaves[leaf].get() {
            None => 0,
            Some(Leaf::Bits(words)) => words[w].load(Ordering::Acquire),
            Some(Leaf::Full { holes }) => {
                !holes.get().map_or(0, |h| h[w].load(Ordering::Acquire)) & self.valid(leaf, w)
            }
        }
    }

    /// Whether leaf `leaf` is full with nothing cleared since (so every bit is set).
    fn solid(&self, leaf: usize) -> bool {
        matches!(self.leaves[leaf].get(), Some(Leaf::Full { holes }) if holes.get().is_none())
    }

    /// Calls `f(leaf, lo, hi)` for each leaf-piece of the bit range `[first, end)` (clipped).
    fn for_leaves(&self, first: u64, end: u64, mut f: impl FnMut(usize, u64, u64)) {
        let end = end.min(self.nbits);
        let mut b = first;
        while b < end {
            let leaf = (b >> LEAF_SHIFT) as usize;
            let base = (leaf as u64) << LEAF_SHIFT;
            let hi = (end - base).min(LEAF_BITS);
            f(leaf, b - base, hi);
            b = base + hi;
        }
    }

    /// Sets bits `[first, end)`; returns how many were clear before.
    pub(crate) fn set_range(&self, first: u64, end: u64) -> u64 {
        let mut newly = 0u64;
        self.for_leaves(first, end, |leaf, lo, hi| {
            let slot = &self.leaves[leaf];
            let whole = lo == 0 && hi == self.leaf_len(leaf);
            if whole && slot.get().is_none() && slot.set(Leaf::Full { holes: OnceLock::new() }).is_ok() {
                newly += hi;
                return;
            }
            let l = slot.get_or_init(|| Leaf::Bits(zeroed()));
            for_words(lo, hi, |w, mask| newly += or_word(l, w, mask));
        });
        newly
    }

    /// Clears bits `[first, end)`; returns how many were set before. Untouched leaves stay
    /// unallocated.
    pub(crate) fn clear_range(&self, first: u64, end: u64) -> u64 {
        let mut cleared = 0u64;
        self.for_leaves(first, end, |leaf, lo, hi| {
            if let Some(l) = self.leaves[leaf].get() {
                for_words(lo, hi, |w, mask| cleared += and_not_word(l, w, mask));
            }
        });
        cleared
    }

    pub(crate) fn get(&self, bit: u64) -> bool {
        if bit >= self.nbits {
            return false;
        }
        let i = bit & (LEAF_BITS - 1);
        self.word((bit >> LEAF_SHIFT) as usize, (i / 64) as usize) & (1 << (i % 64)) != 0
    }

    /// Whether any bit in `[first, end)` is set.
    pub(crate) fn any(&self, first: u64, end: u64) -> bool {
        self.next(first, end.min(self.nbits), true) < end.min(self.nbits)
    }

    /// First bit in `[bit, end)` whose value is `want`, or `end`.
    pub(crate) fn next(&self, mut bit: u64, end: u64, want: bool) -> u64 {
        let end = end.min(self.nbits);
        while bit < end {
            let leaf = (bit >> LEAF_SHIFT) as usize;
            let leaf_end = ((leaf as u64 + 1) << LEAF_SHIFT).min(end);
            // Leaves of one value are skipped or answered whole.
            let uniform = match self.leaves[leaf].get() {
                None => Some(false),
                Some(_) if self.solid(leaf) => Some(true),
                Some(_) => None,
            };
            if let Some(v) = uniform {
                if v == want {
                    return bit;
                }
                bit = leaf_end;
                continue;
            }
            while bit < leaf_end {
                let i = bit & (LEAF_BITS - 1);
                let mut w = self.word(leaf, (i / 64) as usize);
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
    /// is among them. A scan of the leaves both have.
    pub(crate) fn count_and(&self, other: &SparseBits) -> (u64, bool) {
        let mut n = 0u64;
        for leaf in 0..self.leaves.len() {
            if self.leaves[leaf].get().is_none() || other.leaves[leaf].get().is_none() {
                continue;
            }
            if self.solid(leaf) && other.solid(leaf) {
                n += self.leaf_len(leaf);
                continue;
            }
            for w in 0..LEAF_WORDS {
                n += u64::from((self.word(leaf, w) & other.word(leaf, w)).count_ones());
            }
        }
        let last = self.nbits.checked_sub(1).is_some_and(|l| self.get(l) && other.get(l));
        (n, last)
    }

    /// Heap bytes in use.
    pub(crate) fn memory_bytes(&self) -> usize {
        let bitmaps = self
            .leaves
            .iter()
            .filter(|l| match l.get() {
                None => false,
                Some(Leaf::Bits(_)) => true,
                Some(Leaf::Full { holes }) => holes.get().is_some(),
            })
            .count();
        std::mem::size_of_val(&*self.leaves) + bitmaps * LEAF_BYTES
    }

    /// Writes the leaves with a bit set to a state file: a leaf with every bit set as a full
    /// leaf, any other as its bitmap. A racy snapshot: a bit set before the call is in it.
    pub(crate) fn write_to<W: io::Write>(&self, out: &mut StateWriter<W>) -> io::Result<()> {
        let words = |leaf: usize| (0..LEAF_WORDS).map(move |w| self.word(leaf, w));
        let present: Vec<usize> = (0..self.leaves.len())
            .filter(|&leaf| self.leaves[leaf].get().is_some() && words(leaf).any(|w| w != 0))
            .collect();
        out.leaf_count(present.len())?;
        let mut bytes = [0u8; LEAF_BYTES];
        for leaf in present {
            let mut full = true;
            for (w, c) in bytes.chunks_exact_mut(8).enumerate() {
                let word = self.word(leaf, w);
                full &= word == self.valid(leaf, w);
                c.copy_from_slice(&word.to_le_bytes());
            }
            out.leaf(leaf as u32, if full { LeafData::Full } else { LeafData::Bits(&bytes) })?;
        }
        Ok(())
    }

    /// ORs a stored leaf in; returns newly set bits. `leaf` must be in range and a bitmap
    /// `LEAF_BYTES` long (the decoder checked both).
    pub(crate) fn import_leaf(&self, leaf: u32, data: &LeafData<'_>) -> u64 {
        let leaf = leaf as usize;
        let base = (leaf as u64) << LEAF_SHIFT;
        let LeafData::Bits(bytes) = data else {
            return self.set_range(base, base + LEAF_BITS);
        };
        let l = self.leaves[leaf].get_or_init(|| Leaf::Bits(zeroed()));
        let mut newly = 0;
        for (w, c) in bytes.chunks_exact(8).enumerate() {
            // Never a bit past the end.
            let mask = u64::from_le_bytes(c.try_into().expect("8 bytes")) & self.valid(leaf, w);
            if mask != 0 {
                newly += or_word(l, w, mask);
            }
        }
        newly
    }

    pub(crate) fn leaf_count(&self) -> usize {
        self.leaves.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn whole_leaves_cost_no_bitmap_until_cleared() {
        let nbits = LEAF_BITS * 3 + 100;
        let s = SparseBits::new(nbits);
        let slots = s.memory_bytes();
        assert_eq!(s.set_range(0, nbits), nbits);
        assert_eq!(s.memory_bytes(), slots);
        assert!(s.get(nbits - 1) && !s.get(nbits));
        assert_eq!(s.next(0, nbits, false), nbits);
        assert_eq!(s.clear_range(5, 7), 2);
        assert_eq!(s.memory_bytes(), slots + LEAF_BYTES);
        assert_eq!(s.next(0, nbits, false), 5);
        assert_eq!(s.next(5, nbits, true), 7);
        assert_eq!(s.set_range(0, LEAF_BITS), 2);
        assert_eq!(s.count_and(&s), (nbits, true));
    }

    proptest! {
        #[test]
        fn matches_btreeset_model(
            nbits in 1u64..(LEAF_BITS * 3),
            ops in proptest::collection::vec((any::<bool>(), 0u64..(LEAF_BITS * 3), 0u64..(LEAF_BITS * 2)), 0..30),
        ) {
            let s = SparseBits::new(nbits);
            let mut model = BTreeSet::new();
            for (set, first, len) in ops {
                let end = (first + len).min(nbits);
                let before = model.len() as u64;
                if set {
                    let n = s.set_range(first, first + len);
                    model.extend(first..end);
                    prop_assert_eq!(n, model.len() as u64 - before);
                } else {
                    let n = s.clear_range(first, first + len);
                    model.retain(|b| !(first..end).contains(b));
                    prop_assert_eq!(n, before - model.len() as u64);
                }
            }
            for b in 0..nbits {
                prop_assert_eq!(s.get(b), model.contains(&b), "bit {}", b);
            }
            let first_clear = (0..nbits).find(|b| !model.contains(b)).unwrap_or(nbits);
            prop_assert_eq!(s.next(0, nbits, false), first_clear);
            let first_set = model.iter().next().copied().unwrap_or(nbits);
            prop_assert_eq!(s.next(0, nbits, true), first_set);
            prop_assert_eq!(s.count_and(&s).0, model.len() as u64);
        }
    }
}
