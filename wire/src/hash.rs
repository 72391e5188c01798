//! The hashes the protocol defines besides a chunk's own (`docs/wire.md` §4.16, §6.8): the hash
//! of a piece that reads as zeroes, which both sides compute without reading anything, and the
//! hash the server answers for a piece it cannot read back.

use crate::Hash;

/// The hash a `Hashes` reply gives a piece the server cannot read back (a stored chunk that is
/// corrupt or missing, §4.16): 32 bytes of `0xff`, which no data hashes to in practice, so the
/// agent sends that piece again.
pub const UNREADABLE_HASH: Hash = [0xff; 32];

/// Zero bytes hashed at a time.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The blake3 of `len` zero bytes: the hash of a piece that reads as zeroes (written zeroes,
/// trims, never-written ranges; §4.16).
pub fn zero_hash(len: u64) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hash_zeroes(&mut hasher, len);
    *hasher.finalize().as_bytes()
}

/// Feeds `len` zero bytes to `hasher`: the zeroes of a piece that holds data too.
pub fn hash_zeroes(hasher: &mut blake3::Hasher, len: u64) {
    let mut left = len;
    while left > 0 {
        let piece = match usize::try_from(left) {
            Ok(n) if n < ZEROS.len() => &ZEROS[..n],
            _ => &ZEROS[..],
        };
        hasher.update(piece);
        left -= piece.len() as u64;
    }
}

/// [`zero_hash`] of the lengths in use, each computed once: a comparison asks for the same few
/// lengths (its block sizes, and the short last piece of a range) over and over.
#[derive(Clone, Debug, Default)]
pub struct ZeroHashes {
    /// Lengths and their hashes, the most recently added last.
    known: Vec<(u64, Hash)>,
}

impl ZeroHashes {
    /// Lengths [`ZeroHashes::remember`] keeps; adding one more forgets the oldest.
    pub const KEEP: usize = 8;

    /// A cache that knows the hashes of `lengths` already, so that threads that share it by
    /// reference ([`ZeroHashes::get`]) find them.
    pub fn of(lengths: &[u64]) -> Self {
        let mut z = Self::default();
        for &len in lengths {
            z.remember(len);
        }
        z
    }

    /// The hash of `len` zero bytes: known, or computed (and not kept: see
    /// [`ZeroHashes::remember`]).
    pub fn get(&self, len: u64) -> Hash {
        self.find(len).unwrap_or_else(|| zero_hash(len))
    }

    /// The hash of `len` zero bytes, kept for the next time (the latest [`ZeroHashes::KEEP`]
    /// lengths are).
    pub fn remember(&mut self, len: u64) -> Hash {
        if let Some(h) = self.find(len) {
            return h;
        }
        let h = zero_hash(len);
        if self.known.len() >= Self::KEEP {
            self.known.remove(0);
        }
        self.known.push((len, h));
        h
    }

    fn find(&self, len: u64) -> Option<Hash> {
        self.known.iter().find(|(l, _)| *l == len).map(|(_, h)| *h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_hashes_are_blake3_of_zero_bytes() {
        for len in [0u64, 1, 100, 4096, (64 << 10) - 1, 64 << 10, (64 << 10) + 1, 3 << 20] {
            let zeros = vec![0u8; usize::try_from(len).unwrap()];
            assert_eq!(zero_hash(len), *blake3::hash(&zeros).as_bytes(), "{len}");
        }
        assert_ne!(zero_hash(4096), UNREADABLE_HASH);
    }

    #[test]
    fn zeroes_fed_after_data_hash_as_the_bytes_together() {
        for len in [0u64, 1, (64 << 10) + 3, 200 << 10] {
            let mut hasher = blake3::Hasher::new();
            hasher.update(b"data");
            hash_zeroes(&mut hasher, len);
            let mut whole = b"data".to_vec();
            whole.resize(4 + usize::try_from(len).unwrap(), 0);
            assert_eq!(hasher.finalize(), blake3::hash(&whole), "{len}");
        }
    }

    #[test]
    fn the_cache_knows_what_it_was_given_and_keeps_the_latest() {
        let z = ZeroHashes::of(&[4096, 65536]);
        assert_eq!(z.known.len(), 2);
        assert_eq!(z.get(4096), zero_hash(4096));
        // A length it does not know is computed, not kept (`get` borrows it shared).
        assert_eq!(z.get(512), zero_hash(512));
        assert_eq!(z.known.len(), 2);
        let mut z = ZeroHashes::default();
        for len in 1..=10u64 {
            assert_eq!(z.remember(len), zero_hash(len));
        }
        assert_eq!(z.known.len(), ZeroHashes::KEEP);
        assert_eq!(z.known.first().map(|k| k.0), Some(3), "the oldest lengths went first");
        assert_eq!(z.remember(10), zero_hash(10));
        assert_eq!(z.known.len(), ZeroHashes::KEEP);
    }
}
