//! The on-disk formats of the tracking state (`docs/tracker-state.md` describes them):
//! the checkpoint file `state.bin` and the activity log `al.bin`.
//!
//! Every format starts with a magic number and a version and ends with a blake3 checksum;
//! every count is checked against a named maximum before anything is allocated for it.

use std::io;

use crate::bits::{LEAF_BITS, LEAF_BYTES};

pub const STATE_MAGIC: &[u8; 8] = b"SRTRKST\0";
pub const AL_MAGIC: &[u8; 8] = b"SRTRKAL\0";
/// Version of `state.bin` written (1 is still read).
pub const VERSION: u32 = 2;
/// Version of `al.bin`.
pub const AL_VERSION: u32 = 1;

/// Most generations (unreleased, plus the live set) a state file may hold.
pub const MAX_MAPS: u32 = 1025;
/// Longest inconsistency reason stored.
pub const MAX_REASON: usize = 1024;
/// Size of one activity-log record slot; the log has two.
pub const AL_SLOT: usize = 4096;
const AL_HEADER: usize = 8 + 4 + 4 + 8 + 8 + 4 + 4;
const CHECKSUM: usize = 32;
/// Most regions one activity-log record can name.
pub const AL_MAX_REGIONS: usize = (AL_SLOT - AL_HEADER - CHECKSUM) / 4;

/// Flag: the state was written by a clean shutdown, so generations' pre-images are complete.
pub const FLAG_CLEAN: u32 = 1;

/// Why a stored state cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated")]
    Truncated,
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported version {0}")]
    Version(u32),
    #[error("checksum mismatch")]
    Checksum,
    #[error("{0} out of range")]
    Range(&'static str),
    #[error("written for a disk of {size} bytes at granularity {granularity}")]
    Geometry { size: u64, granularity: u64 },
}

/// A stored leaf: every bit set, or a bitmap of `LEAF_BYTES` (little-endian u64 words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafData<'a> {
    Full,
    Bits(&'a [u8]),
}

/// Flag in a stored leaf index: the leaf is full and no bitmap follows (version 2).
const FULL_LEAF: u32 = 1 << 31;

/// One stored map: the live set or a generation (leaves borrowed from the decoded file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRecord<'a> {
    /// 0 for the live set, else the generation id.
    pub gen: u64,
    pub cut_unix_ms: u64,
    pub inconsistent: Option<String>,
    pub dirty: Vec<(u32, LeafData<'a>)>,
    pub zero: Vec<(u32, LeafData<'a>)>,
    /// Preserved pre-images: (block, slot in the preserve store).
    pub preserved: Vec<(u64, u64)>,
}

/// A decoded checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRecord<'a> {
    pub flags: u32,
    pub size: u64,
    pub granularity: u64,
    pub next_gen: u64,
    /// Why the tracked sets cannot be trusted, until a resync clears it.
    pub resync: Option<String>,
    pub maps: Vec<MapRecord<'a>>,
}

/// The header of a checkpoint (what precedes its maps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateHeader {
    pub flags: u32,
    pub size: u64,
    pub granularity: u64,
    pub next_gen: u64,
    pub resync: Option<String>,
}

/// Writes a checkpoint as it goes, hashing what it writes, so a checkpoint of large sets is
/// never held in memory whole. The caller writes, in order: `maps` map headers, each followed
/// by its dirty leaves, its zero leaves and its preserved entries; then `finish`.
pub struct StateWriter<W: io::Write> {
    out: W,
    hash: blake3::Hasher,
}

impl<W: io::Write> StateWriter<W> {
    pub fn new(out: W, h: &StateHeader, maps: usize) -> io::Result<Self> {
        let mut s = Self { out, hash: blake3::Hasher::new() };
        let mut b = Vec::new();
        b.extend_from_slice(STATE_MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&h.flags.to_le_bytes());
        b.extend_from_slice(&h.size.to_le_bytes());
        b.extend_from_slice(&h.granularity.to_le_bytes());
        b.extend_from_slice(&h.next_gen.to_le_bytes());
        put_reason(&mut b, &h.resync);
        b.extend_from_slice(&(maps as u32).to_le_bytes());
        s.put(&b)?;
        Ok(s)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.hash.update(b);
        self.out.write_all(b)
    }

    pub fn map(&mut self, gen: u64, cut_unix_ms: u64, inconsistent: &Option<String>) -> io::Result<()> {
        let mut b = Vec::new();
        b.extend_from_slice(&gen.to_le_bytes());
        b.extend_from_slice(&cut_unix_ms.to_le_bytes());
        put_reason(&mut b, inconsistent);
        self.put(&b)
    }

    /// Starts a set of `n` leaves (the dirty set, then the zero set, of the current map).
    pub fn leaf_count(&mut self, n: usize) -> io::Result<()> {
        self.put(&(n as u32).to_le_bytes())
    }

    pub fn leaf(&mut self, index: u32, data: LeafData<'_>) -> io::Result<()> {
        match data {
            LeafData::Full => self.put(&(index | FULL_LEAF).to_le_bytes()),
            LeafData::Bits(bytes) => {
                debug_assert_eq!(bytes.len(), LEAF_BYTES);
                self.put(&index.to_le_bytes())?;
                self.put(bytes)
            }
        }
    }

    pub fn preserved(&mut self, entries: &[(u64, u64)]) -> io::Result<()> {
        self.put(&(entries.len() as u64).to_le_bytes())?;
        for (block, slot) in entries {
            self.put(&block.to_le_bytes())?;
            self.put(&slot.to_le_bytes())?;
        }
        Ok(())
    }

    /// Appends the checksum; returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        let sum = self.hash.finalize();
        self.out.write_all(sum.as_bytes())?;
        Ok(self.out)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let s = self
            .b
            .get(self.pos..self.pos.checked_add(n).ok_or(FormatError::Truncated)?)
            .ok_or(FormatError::Truncated)?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

fn put_reason(b: &mut Vec<u8>, reason: &Option<String>) {
    match reason {
        None => b.push(0),
        Some(reason) => {
            b.push(1);
            let mut end = reason.len().min(MAX_REASON);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            b.extend_from_slice(&(end as u16).to_le_bytes());
            b.extend_from_slice(&reason.as_bytes()[..end]);
        }
    }
}

fn get_reason(r: &mut Reader<'_>) -> Result<Option<String>, FormatError> {
    match r.u8()? {
        0 => Ok(None),
        1 => {
            let l = r.u16()? as usize;
            if l > MAX_REASON {
                return Err(FormatError::Range("reason length"));
            }
            Ok(Some(String::from_utf8_lossy(r.take(l)?).into_owned()))
        }
        _ => Err(FormatError::Range("reason flag")),
    }
}

/// Splits off and verifies the trailing blake3 checksum.
fn verified(b: &[u8]) -> Result<&[u8], FormatError> {
    if b.len() < CHECKSUM {
        return Err(FormatError::Truncated);
    }
    let (body, sum) = b.split_at(b.len() - CHECKSUM);
    if blake3::hash(body).as_bytes() != sum {
        return Err(FormatError::Checksum);
    }
    Ok(body)
}

/// A set of stored leaves; full leaves only from version 2 on.
fn leaves<'a>(
    r: &mut Reader<'a>,
    max_leaf: u32,
    version: u32,
    what: &'static str,
) -> Result<Vec<(u32, LeafData<'a>)>, FormatError> {
    let n = r.u32()?;
    // Each leaf takes at least its 4-byte index: the remaining length bounds the allocation.
    if n > max_leaf || n as usize > (r.b.len() - r.pos) / 4 {
        return Err(FormatError::Range(what));
    }
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let stored = r.u32()?;
        let idx = if version >= 2 { stored & !FULL_LEAF } else { stored };
        if idx >= max_leaf {
            return Err(FormatError::Range(what));
        }
        let data = if stored & FULL_LEAF != 0 { LeafData::Full } else { LeafData::Bits(r.take(LEAF_BYTES)?) };
        out.push((idx, data));
    }
    Ok(out)
}

impl<'a> StateRecord<'a> {
    /// Decodes and checks a state file written at `granularity`, for a disk of the size it
    /// states (the caller compares it with the disk's). Reads version 1 (bitmaps only) and
    /// version 2 (full leaves stored as a flag).
    pub fn decode(bytes: &'a [u8], granularity: u64) -> Result<Self, FormatError> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(8).map_err(|_| FormatError::Truncated)? != STATE_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = r.u32()?;
        if version != VERSION && version != 1 {
            return Err(FormatError::Version(version));
        }
        let body = verified(bytes)?;
        let mut r = Reader { b: body, pos: 12 };
        let flags = r.u32()?;
        let (size, g) = (r.u64()?, r.u64()?);
        if g != granularity {
            return Err(FormatError::Geometry { size, granularity: g });
        }
        let blocks = size.div_ceil(granularity);
        let max_leaf = u32::try_from(blocks.div_ceil(LEAF_BITS))
            .ok()
            .filter(|&m| m <= FULL_LEAF)
            .ok_or(FormatError::Range("disk size"))?;
        let next_gen = r.u64()?;
        let resync = get_reason(&mut r)?;
        let n = r.u32()?;
        if n > MAX_MAPS {
            return Err(FormatError::Range("map count"));
        }
        let mut maps = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let gen = r.u64()?;
            let cut_unix_ms = r.u64()?;
            let inconsistent = get_reason(&mut r)?;
            let dirty = leaves(&mut r, max_leaf, version, "dirty leaf")?;
            let zero = leaves(&mut r, max_leaf, version, "zero leaf")?;
            let np = r.u64()?;
            if np > blocks {
                return Err(FormatError::Range("preserved count"));
            }
            // Each entry is 16 bytes: the remaining length bounds the allocation too.
            if np.saturating_mul(16) > (body.len() - r.pos) as u64 {
                return Err(FormatError::Truncated);
            }
            let mut preserved = Vec::with_capacity(np as usize);
            for _ in 0..np {
                let block = r.u64()?;
                if block >= blocks {
                    return Err(FormatError::Range("preserved block"));
                }
                preserved.push((block, r.u64()?));
            }
            maps.push(MapRecord { gen, cut_unix_ms, inconsistent, dirty, zero, preserved });
        }
        if r.pos != body.len() {
            return Err(FormatError::Range("trailing bytes"));
        }
        Ok(StateRecord { flags, size, granularity, next_gen, resync, maps })
    }
}
/// One activity-log record: the hot regions at the time it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlRecord {
    pub seq: u64,
    pub next_gen: u64,
    pub region_shift: u32,
    pub regions: Vec<u32>,
}

impl AlRecord {
    /// Encodes into one slot (`AL_SLOT` bytes). At most `AL_MAX_REGIONS` regions.
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.regions.len() <= AL_MAX_REGIONS, "activity log record too large");
        let mut b = Vec::with_capacity(AL_SLOT);
        b.extend_from_slice(AL_MAGIC);
        b.extend_from_slice(&AL_VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.next_gen.to_le_bytes());
        b.extend_from_slice(&self.region_shift.to_le_bytes());
        b.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for r in &self.regions {
            b.extend_from_slice(&r.to_le_bytes());
        }
        b.resize(AL_SLOT - CHECKSUM, 0);
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        b
    }

    pub fn decode(slot: &[u8]) -> Result<Self, FormatError> {
        if slot.len() != AL_SLOT {
            return Err(FormatError::Truncated);
        }
        if &slot[..8] != AL_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let body = verified(slot)?;
        let mut r = Reader { b: body, pos: 8 };
        let version = r.u32()?;
        if version != AL_VERSION {
            return Err(FormatError::Version(version));
        }
        r.u32()?;
        let seq = r.u64()?;
        let next_gen = r.u64()?;
        let region_shift = r.u32()?;
        if !(12..=40).contains(&region_shift) {
            return Err(FormatError::Range("region size"));
        }
        let n = r.u32()? as usize;
        if n > AL_MAX_REGIONS {
            return Err(FormatError::Range("region count"));
        }
        let regions = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
        Ok(AlRecord { seq, next_gen, region_shift, regions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(leaf: &[u8]) -> StateRecord<'_> {
        StateRecord {
            flags: FLAG_CLEAN,
            size: 1 << 30,
            granularity: 4096,
            next_gen: 7,
            resync: Some("test".into()),
            maps: vec![
                MapRecord {
                    gen: 0,
                    cut_unix_ms: 0,
                    inconsistent: None,
                    dirty: vec![(1, LeafData::Full), (0, LeafData::Bits(leaf))],
                    zero: vec![],
                    preserved: vec![],
                },
                MapRecord {
                    gen: 6,
                    cut_unix_ms: 123,
                    inconsistent: Some("preserve store full".into()),
                    dirty: vec![(0, LeafData::Bits(leaf))],
                    zero: vec![(0, LeafData::Bits(leaf))],
                    preserved: vec![(5, 0), (9, 1)],
                },
            ],
        }
    }

    fn encode(s: &StateRecord<'_>) -> Vec<u8> {
        let h = StateHeader {
            flags: s.flags,
            size: s.size,
            granularity: s.granularity,
            next_gen: s.next_gen,
            resync: s.resync.clone(),
        };
        let mut w = StateWriter::new(Vec::new(), &h, s.maps.len()).unwrap();
        for m in &s.maps {
            w.map(m.gen, m.cut_unix_ms, &m.inconsistent).unwrap();
            for set in [&m.dirty, &m.zero] {
                w.leaf_count(set.len()).unwrap();
                for (i, d) in set {
                    w.leaf(*i, *d).unwrap();
                }
            }
            w.preserved(&m.preserved).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn state_round_trips_and_detects_damage() {
        let leaf = vec![1; LEAF_BYTES];
        let s = sample(&leaf);
        let b = encode(&s);
        assert_eq!(StateRecord::decode(&b, 4096), Ok(s));
        assert!(matches!(StateRecord::decode(&b, 8192), Err(FormatError::Geometry { .. })));
        for cut in [0, 5, 20, b.len() - 1] {
            assert!(StateRecord::decode(&b[..cut], 4096).is_err(), "truncated at {cut}");
        }
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert_eq!(StateRecord::decode(&bad, 4096), Err(FormatError::Checksum));
        let mut bad = b.clone();
        bad[0] = b'X';
        assert_eq!(StateRecord::decode(&bad, 4096), Err(FormatError::BadMagic));
        let mut bad = b;
        bad[8] = 9;
        assert_eq!(StateRecord::decode(&bad, 4096), Err(FormatError::Version(9)));
    }

    #[test]
    fn version_1_files_are_still_read() {
        let leaf = vec![0xa5; LEAF_BYTES];
        let mut s = sample(&leaf);
        s.maps[0].dirty.remove(0);
        let mut b = encode(&s);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let body = b.len() - CHECKSUM;
        let sum = blake3::hash(&b[..body]);
        b[body..].copy_from_slice(sum.as_bytes());
        assert_eq!(StateRecord::decode(&b, 4096), Ok(s));
    }

    #[test]
    fn al_round_trips_and_detects_torn_slots() {
        let a = AlRecord { seq: 3, next_gen: 4, region_shift: 22, regions: (1..900).collect() };
        let b = a.encode();
        assert_eq!(b.len(), AL_SLOT);
        assert_eq!(AlRecord::decode(&b), Ok(a));
        let mut torn = b.clone();
        torn[2048..2560].fill(0);
        assert!(AlRecord::decode(&torn).is_err());
        let full = AlRecord { seq: 1, next_gen: 1, region_shift: 22, regions: vec![7; AL_MAX_REGIONS] };
        assert_eq!(AlRecord::decode(&full.encode()), Ok(full));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = StateRecord::decode(&data, 4096);
            let _ = AlRecord::decode(&data);
        }

        #[test]
        fn al_round_trips(seq in any::<u64>(), next in any::<u64>(), regions in proptest::collection::vec(any::<u32>(), 0..AL_MAX_REGIONS)) {
            let a = AlRecord { seq, next_gen: next, region_shift: 22, regions };
            prop_assert_eq!(AlRecord::decode(&a.encode()), Ok(a));
        }
    }
}
