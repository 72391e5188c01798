//! The store's on-disk formats (`docs/store.md` describes them): the store marker, chunk files,
//! map pages, point roots and initial-copy checkpoints, plus the small JSON metadata records.
//!
//! Every binary format starts with a magic number and a version; every format but the chunk file
//! ends with a blake3 checksum of everything before it (a chunk's checksum is its address, the
//! blake3 of its raw bytes, checked after every decompression). Every count and length read
//! back is checked against a named maximum before anything is allocated for it. All integers
//! are little-endian.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::info::PointInfo;
use super::map::{DataRef, RegionMap};

/// Why a stored file cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
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
    #[error("{len} bytes, more than the {max} a {what} may have")]
    TooLong { what: &'static str, len: u64, max: u64 },
    #[error("missing")]
    Missing,
    #[error("trailing bytes")]
    Trailing,
    #[error("invalid metadata: {0}")]
    Json(String),
}

/// The version every format of this crate writes and the only one it reads.
pub const VERSION: u32 = 1;

pub(crate) const MARKER_MAGIC: &[u8; 8] = b"SRSTORE\0";
pub(crate) const CHUNK_MAGIC: &[u8; 8] = b"SRCHUNK\0";
pub(crate) const PAGE_MAGIC: &[u8; 8] = b"SRMPAGE\0";
pub(crate) const ROOT_MAGIC: &[u8; 8] = b"SRPROOT\0";
pub(crate) const INITIAL_MAGIC: &[u8; 8] = b"SRINITC\0";
pub(crate) const DISK_FORMAT: &str = "siterep.disk";
pub(crate) const POINT_FORMAT: &str = "siterep.point";

/// Largest raw chunk.
pub const MAX_CHUNK_RAW: u32 = 4 << 20;
/// Largest compressed chunk: zstd's worst-case expansion of [`MAX_CHUNK_RAW`] with room to spare.
pub const MAX_CHUNK_STORED: u32 = MAX_CHUNK_RAW + MAX_CHUNK_RAW / 128;
/// Smallest and largest block size of a disk (powers of two); extents are aligned to it.
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Bounds of a store's map region size (a power of two).
pub const MIN_REGION_SIZE: u64 = 4 << 10;
pub const MAX_REGION_SIZE: u64 = 1 << 30;
/// Most map regions of one disk (bounds a root: 36 bytes per written region).
pub const MAX_REGIONS: u64 = 1 << 22;
/// Largest disk.
pub const MAX_DISK_SIZE: u64 = 1 << 50;
/// Largest JSON metadata file (disk and point records).
pub const MAX_METADATA_BYTES: u64 = 256 << 10;
/// Most tags on a point, and the longest tag.
pub const MAX_TAGS: usize = 64;
pub const MAX_TAG_LEN: usize = 128;
/// Longest disk name.
pub const MAX_NAME_LEN: usize = 64;

pub(crate) const CHECKSUM: usize = 32;
const PREFIX: usize = 8 + 4;
pub(crate) const CHUNK_HEADER: usize = 8 + 4 + 4 + 4 + 4 + 32;
pub(crate) const CODEC_ZSTD: u32 = 1;
const PAGE_EXTENT: usize = 4 + 4 + 4 + 32;
const ROOT_ENTRY: usize = 4 + 32;
const MARKER_LEN: usize = PREFIX + 8 + CHECKSUM;

/// Most extents a page of a region of `region_size` bytes may hold: every block its own extent.
pub fn max_page_extents(region_size: u64) -> u64 {
    region_size / u64::from(MIN_BLOCK_SIZE)
}

/// Largest page file for a region size.
pub(crate) fn max_page_bytes(region_size: u64) -> u64 {
    (PREFIX + 8 + 4 + CHECKSUM) as u64 + max_page_extents(region_size) * PAGE_EXTENT as u64
}

/// Largest root or checkpoint file of a disk with `regions` map regions.
pub(crate) fn max_root_bytes(regions: u64) -> u64 {
    (PREFIX + 64 + 4 + CHECKSUM) as u64 + regions.min(MAX_REGIONS) * ROOT_ENTRY as u64
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

pub(crate) fn unhex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(s[2 * i])? << 4 | digit(s[2 * i + 1])?;
    }
    Some(out)
}

/// A binary record being written: magic, version, fields, then [`Enc::finish`] appends blake3.
pub(crate) struct Enc(Vec<u8>);

impl Enc {
    pub(crate) fn new(magic: &[u8; 8], capacity: usize) -> Enc {
        let mut v = Vec::with_capacity(capacity + PREFIX + CHECKSUM);
        v.extend_from_slice(magic);
        v.extend_from_slice(&VERSION.to_le_bytes());
        Enc(v)
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    /// Appends the checksum; returns the record and the checksum (which is also its address).
    pub(crate) fn finish(mut self) -> (Vec<u8>, [u8; 32]) {
        let sum = *blake3::hash(&self.0).as_bytes();
        self.0.extend_from_slice(&sum);
        (self.0, sum)
    }
}

/// A binary record being read, after its magic, version and checksum have been checked.
pub(crate) struct Dec<'a> {
    body: &'a [u8],
    pos: usize,
    pub(crate) checksum: [u8; 32],
}

impl<'a> Dec<'a> {
    pub(crate) fn open(buf: &'a [u8], magic: &[u8; 8]) -> Result<Dec<'a>, FormatError> {
        if buf.len() < PREFIX + CHECKSUM {
            return Err(FormatError::Truncated);
        }
        if &buf[..8] != magic {
            return Err(FormatError::BadMagic);
        }
        let version = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let (data, sum) = buf.split_at(buf.len() - CHECKSUM);
        if blake3::hash(data).as_bytes() != sum {
            return Err(FormatError::Checksum);
        }
        Ok(Dec { body: data, pos: PREFIX, checksum: sum.try_into().expect("32 bytes") })
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.body.len() - self.pos < n {
            return Err(FormatError::Truncated);
        }
        let s = &self.body[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub(crate) fn remaining(&self) -> usize {
        self.body.len() - self.pos
    }
    pub(crate) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub(crate) fn hash(&mut self) -> Result<[u8; 32], FormatError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    pub(crate) fn end(self) -> Result<(), FormatError> {
        if self.pos == self.body.len() {
            Ok(())
        } else {
            Err(FormatError::Trailing)
        }
    }
}

/// Checks a region size read back or configured.
pub(crate) fn check_region_size(region_size: u64) -> Result<(), FormatError> {
    if !region_size.is_power_of_two() || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size) {
        return Err(FormatError::Range("region size"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Store marker

pub(crate) fn encode_marker(region_size: u64) -> Vec<u8> {
    let mut e = Enc::new(MARKER_MAGIC, 8);
    e.u64(region_size);
    e.finish().0
}

pub(crate) fn max_marker_bytes() -> u64 {
    MARKER_LEN as u64
}

/// Returns the store's region size.
pub(crate) fn decode_marker(buf: &[u8]) -> Result<u64, FormatError> {
    let mut d = Dec::open(buf, MARKER_MAGIC)?;
    let region_size = d.u64()?;
    d.end()?;
    check_region_size(region_size)?;
    Ok(region_size)
}

// ---------------------------------------------------------------------------------------------
// Chunk file header

/// The fixed header in front of a chunk's stored (compressed) bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkHeader {
    pub(crate) raw_len: u32,
    pub(crate) stored_len: u32,
    pub(crate) hash: [u8; 32],
}

impl ChunkHeader {
    pub(crate) fn encode(&self) -> [u8; CHUNK_HEADER] {
        let mut h = [0u8; CHUNK_HEADER];
        h[..8].copy_from_slice(CHUNK_MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&CODEC_ZSTD.to_le_bytes());
        h[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        h[20..24].copy_from_slice(&self.stored_len.to_le_bytes());
        h[24..56].copy_from_slice(&self.hash);
        h
    }

    pub(crate) fn decode(h: &[u8; CHUNK_HEADER]) -> Result<ChunkHeader, FormatError> {
        if &h[..8] != CHUNK_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        if word(8) != VERSION {
            return Err(FormatError::Version(word(8)));
        }
        if word(12) != CODEC_ZSTD {
            return Err(FormatError::Range("codec"));
        }
        let raw_len = word(16);
        let stored_len = word(20);
        if raw_len == 0 || raw_len > MAX_CHUNK_RAW {
            return Err(FormatError::TooLong {
                what: "raw chunk",
                len: raw_len.into(),
                max: MAX_CHUNK_RAW.into(),
            });
        }
        if stored_len == 0 || stored_len > MAX_CHUNK_STORED {
            return Err(FormatError::TooLong {
                what: "stored chunk",
                len: stored_len.into(),
                max: MAX_CHUNK_STORED.into(),
            });
        }
        Ok(ChunkHeader { raw_len, stored_len, hash: h[24..56].try_into().expect("32 bytes") })
    }
}

// ---------------------------------------------------------------------------------------------
// Map pages

/// Serializes a region's extents; returns the page and its address.
pub(crate) fn encode_page(region_size: u64, map: &RegionMap) -> (Vec<u8>, [u8; 32]) {
    let mut e = Enc::new(PAGE_MAGIC, 12 + map.len() * PAGE_EXTENT);
    e.u64(region_size);
    e.u32(u32::try_from(map.len()).expect("page extents bounded by the region size"));
    for (off, d) in map.iter() {
        e.u32(off);
        e.u32(d.len);
        e.u32(d.chunk_offset);
        e.bytes(&d.chunk);
    }
    e.finish()
}

/// Parses and validates a page; `address` is the hash it was stored under.
pub(crate) fn decode_page(
    buf: &[u8],
    region_size: u64,
    address: &[u8; 32],
) -> Result<RegionMap, FormatError> {
    if buf.len() as u64 > max_page_bytes(region_size) {
        return Err(FormatError::TooLong {
            what: "map page",
            len: buf.len() as u64,
            max: max_page_bytes(region_size),
        });
    }
    let mut d = Dec::open(buf, PAGE_MAGIC)?;
    if &d.checksum != address {
        return Err(FormatError::Checksum);
    }
    if d.u64()? != region_size {
        return Err(FormatError::Range("page region size"));
    }
    let n = u64::from(d.u32()?);
    if n > max_page_extents(region_size) || n * PAGE_EXTENT as u64 != d.remaining() as u64 {
        return Err(FormatError::Range("page extent count"));
    }
    let mut map = RegionMap::default();
    let mut end = 0u64;
    for _ in 0..n {
        let off = d.u32()?;
        let len = d.u32()?;
        let chunk_offset = d.u32()?;
        let chunk = d.hash()?;
        let (o, l) = (u64::from(off), u64::from(len));
        if len == 0 || o < end || o + l > region_size {
            return Err(FormatError::Range("page extent"));
        }
        if u64::from(chunk_offset) + l > u64::from(MAX_CHUNK_RAW) {
            return Err(FormatError::Range("page extent's chunk offset"));
        }
        end = o + l;
        map.push_sorted(off, DataRef { len, chunk, chunk_offset });
    }
    d.end()?;
    Ok(map)
}

// ---------------------------------------------------------------------------------------------
// Roots and initial-copy checkpoints

/// A complete map of a disk: the page of every region that has data (others read as zeroes).
pub(crate) type Root = BTreeMap<u32, [u8; 32]>;

/// Regions of a disk.
pub(crate) fn region_count(disk_size: u64, region_size: u64) -> u64 {
    disk_size.div_ceil(region_size)
}

fn put_root(e: &mut Enc, disk_size: u64, region_size: u64, root: &Root) {
    e.u64(disk_size);
    e.u64(region_size);
    e.u32(u32::try_from(root.len()).expect("regions bounded by MAX_REGIONS"));
    for (region, page) in root {
        e.u32(*region);
        e.bytes(page);
    }
}

/// A root of a disk now `disk_size` bytes; the root's own size may be smaller (the disk grew
/// since). Returns it with its size.
fn get_root(d: &mut Dec<'_>, disk_size: u64, region_size: u64) -> Result<(Root, u64), FormatError> {
    let root_size = d.u64()?;
    if root_size == 0 || root_size > disk_size {
        return Err(FormatError::Range("root disk size"));
    }
    let disk_size = root_size;
    if d.u64()? != region_size {
        return Err(FormatError::Range("root region size"));
    }
    let regions = region_count(disk_size, region_size);
    let n = u64::from(d.u32()?);
    if n > regions || n > MAX_REGIONS || n * ROOT_ENTRY as u64 > d.remaining() as u64 {
        return Err(FormatError::Range("root entry count"));
    }
    let mut root = Root::new();
    let mut next = 0u64;
    for _ in 0..n {
        let region = d.u32()?;
        if u64::from(region) < next || u64::from(region) >= regions {
            return Err(FormatError::Range("root region"));
        }
        next = u64::from(region) + 1;
        root.insert(region, d.hash()?);
    }
    Ok((root, disk_size))
}

/// A point's root file; returns it and its checksum (which the point's metadata records).
pub(crate) fn encode_root(disk_size: u64, region_size: u64, root: &Root) -> (Vec<u8>, [u8; 32]) {
    let mut e = Enc::new(ROOT_MAGIC, 20 + root.len() * ROOT_ENTRY);
    put_root(&mut e, disk_size, region_size, root);
    e.finish()
}

/// A point's root and the disk's size when the point was made (at most `disk_size`, the
/// disk's size now).
pub(crate) fn decode_root(
    buf: &[u8],
    disk_size: u64,
    region_size: u64,
    checksum: &[u8; 32],
) -> Result<(Root, u64), FormatError> {
    let mut d = Dec::open(buf, ROOT_MAGIC)?;
    if &d.checksum != checksum {
        return Err(FormatError::Checksum);
    }
    let root = get_root(&mut d, disk_size, region_size)?;
    d.end()?;
    Ok(root)
}

/// The durable state of an interrupted initial full copy (`initial.bin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InitialCheckpoint {
    pub(crate) generation: u64,
    pub(crate) base: Option<u64>,
    pub(crate) next_offset: u64,
    pub(crate) started_unix_ms: u64,
    pub(crate) changed_bytes: u64,
    pub(crate) root: Root,
}

pub(crate) fn encode_initial(c: &InitialCheckpoint, disk_size: u64, region_size: u64) -> Vec<u8> {
    let mut e = Enc::new(INITIAL_MAGIC, 60 + c.root.len() * ROOT_ENTRY);
    e.u64(c.generation);
    e.u8(u8::from(c.base.is_some()));
    e.u64(c.base.unwrap_or(0));
    e.u64(c.next_offset);
    e.u64(c.started_unix_ms);
    e.u64(c.changed_bytes);
    put_root(&mut e, disk_size, region_size, &c.root);
    e.finish().0
}

pub(crate) fn decode_initial(
    buf: &[u8],
    disk_size: u64,
    region_size: u64,
) -> Result<InitialCheckpoint, FormatError> {
    let mut d = Dec::open(buf, INITIAL_MAGIC)?;
    let generation = d.u64()?;
    let has_base = d.u8()?;
    let base = d.u64()?;
    let base = match has_base {
        0 => None,
        1 => Some(base),
        _ => return Err(FormatError::Range("checkpoint base flag")),
    };
    let next_offset = d.u64()?;
    if next_offset > disk_size {
        return Err(FormatError::Range("checkpoint next offset"));
    }
    let started_unix_ms = d.u64()?;
    let changed_bytes = d.u64()?;
    let (root, _) = get_root(&mut d, disk_size, region_size)?;
    d.end()?;
    Ok(InitialCheckpoint { generation, base, next_offset, started_unix_ms, changed_bytes, root })
}

// ---------------------------------------------------------------------------------------------
// JSON metadata

/// `disk.json`: a protected disk. The disk exists once this file does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DiskRecord {
    pub(crate) format: String,
    pub(crate) version: u32,
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) block_size: u32,
    pub(crate) created_unix_ms: u64,
}

/// `points/<id>.json`: a recovery point. The point exists once this file does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PointRecord {
    pub(crate) format: String,
    pub(crate) version: u32,
    #[serde(flatten)]
    pub(crate) info: PointInfo,
    /// Hex blake3 checksum of the point's root file.
    pub(crate) root: String,
}

/// Checks a disk name: it becomes a directory name.
pub(crate) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err("must be 1 to 64 bytes");
    }
    if name.starts_with('.') {
        return Err("must not start with a dot");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return Err("may hold only ASCII letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

pub(crate) fn check_tag(tag: &str) -> Result<(), &'static str> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err("must be 1 to 128 bytes");
    }
    if tag.chars().any(char::is_control) {
        return Err("must not hold control characters");
    }
    Ok(())
}

fn json_err(e: impl std::fmt::Display) -> FormatError {
    FormatError::Json(e.to_string())
}

pub(crate) fn decode_disk_record(buf: &[u8], name: &str) -> Result<DiskRecord, FormatError> {
    let r: DiskRecord = serde_json::from_slice(buf).map_err(json_err)?;
    if r.format != DISK_FORMAT {
        return Err(FormatError::BadMagic);
    }
    if r.version != VERSION {
        return Err(FormatError::Version(r.version));
    }
    if r.name != name {
        return Err(FormatError::Range("disk name"));
    }
    Ok(r)
}

pub(crate) fn decode_point_record(
    buf: &[u8],
    disk: &str,
    id: u64,
) -> Result<(PointInfo, [u8; 32]), FormatError> {
    let r: PointRecord = serde_json::from_slice(buf).map_err(json_err)?;
    if r.format != POINT_FORMAT {
        return Err(FormatError::BadMagic);
    }
    if r.version != VERSION {
        return Err(FormatError::Version(r.version));
    }
    if r.info.disk != disk {
        return Err(FormatError::Range("point disk"));
    }
    if r.info.id != id {
        return Err(FormatError::Range("point id"));
    }
    if r.info.tags.len() > MAX_TAGS || r.info.tags.iter().any(|(t, _)| check_tag(t).is_err()) {
        return Err(FormatError::Range("point tags"));
    }
    if r.info.base.is_some_and(|b| b >= id) {
        return Err(FormatError::Range("point base"));
    }
    let root = unhex32(&r.root).ok_or(FormatError::Range("point root checksum"))?;
    Ok((r.info, root))
}

pub(crate) fn encode_point_record(info: &PointInfo, root: &[u8; 32]) -> Vec<u8> {
    let r =
        PointRecord { format: POINT_FORMAT.into(), version: VERSION, info: info.clone(), root: hex(root) };
    serde_json::to_vec_pretty(&r).expect("a point record serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::info::DEFAULT_REGION_SIZE;

    fn sample_map() -> RegionMap {
        let mut m = RegionMap::default();
        m.put(0, DataRef { len: 4096, chunk: [1; 32], chunk_offset: 0 });
        m.put(8192, DataRef { len: 512, chunk: [2; 32], chunk_offset: 1024 });
        m
    }

    #[test]
    fn hex_round_trip() {
        let h = *blake3::hash(b"x").as_bytes();
        assert_eq!(unhex32(&hex(&h)), Some(h));
        assert_eq!(unhex32("zz"), None);
        assert_eq!(unhex32(&"g".repeat(64)), None);
    }

    #[test]
    fn page_round_trip_and_corruption() {
        let m = sample_map();
        let (buf, addr) = encode_page(65536, &m);
        assert_eq!(decode_page(&buf, 65536, &addr).unwrap(), m);
        assert_eq!(decode_page(&buf, 131072, &addr), Err(FormatError::Range("page region size")));
        assert_eq!(decode_page(&buf, 65536, &[0; 32]), Err(FormatError::Checksum));
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(decode_page(&bad, 65536, &addr).is_err(), "flip at {i} undetected");
        }
        assert!(decode_page(&buf[..buf.len() - 1], 65536, &addr).is_err());
    }

    #[test]
    fn page_with_forged_checksum_is_range_checked() {
        // A page whose checksum is right but whose extents overlap or leave the region.
        for (off, len) in [(65536 - 512, 1024), (0, 0)] {
            let mut e = Enc::new(PAGE_MAGIC, 64);
            e.u64(65536);
            e.u32(1);
            e.u32(off);
            e.u32(len);
            e.u32(0);
            e.bytes(&[0; 32]);
            let (buf, addr) = e.finish();
            assert_eq!(decode_page(&buf, 65536, &addr), Err(FormatError::Range("page extent")));
        }
        let mut e = Enc::new(PAGE_MAGIC, 64);
        e.u64(65536);
        e.u32(u32::MAX);
        let (buf, addr) = e.finish();
        assert_eq!(decode_page(&buf, 65536, &addr), Err(FormatError::Range("page extent count")));
    }

    #[test]
    fn root_and_checkpoint_round_trip() {
        let root: Root = [(0, [3; 32]), (5, [4; 32])].into_iter().collect();
        let (buf, sum) = encode_root(6 * 65536, 65536, &root);
        assert_eq!(decode_root(&buf, 6 * 65536, 65536, &sum).unwrap(), (root.clone(), 6 * 65536));
        assert_eq!(decode_root(&buf, 5 * 65536, 65536, &sum), Err(FormatError::Range("root disk size")));
        // A disk that grew since reads its older roots at their own size.
        assert_eq!(decode_root(&buf, 9 * 65536, 65536, &sum).unwrap(), (root.clone(), 6 * 65536));
        let (buf, sum) = encode_root(5 * 65536, 65536, &root);
        assert_eq!(decode_root(&buf, 5 * 65536, 65536, &sum), Err(FormatError::Range("root region")));
        let c = InitialCheckpoint {
            generation: 7,
            base: Some(2),
            next_offset: 65536,
            started_unix_ms: 1,
            changed_bytes: 2,
            root,
        };
        let buf = encode_initial(&c, 6 * 65536, 65536);
        assert_eq!(decode_initial(&buf, 6 * 65536, 65536).unwrap(), c);
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert_eq!(decode_initial(&bad, 6 * 65536, 65536), Err(FormatError::BadMagic));
    }

    #[test]
    fn chunk_header_checks() {
        let h = ChunkHeader { raw_len: 4096, stored_len: 100, hash: [9; 32] };
        assert_eq!(ChunkHeader::decode(&h.encode()).unwrap(), h);
        let mut big = h.encode();
        big[16..20].copy_from_slice(&(MAX_CHUNK_RAW + 1).to_le_bytes());
        assert!(matches!(ChunkHeader::decode(&big), Err(FormatError::TooLong { .. })));
        let mut v = h.encode();
        v[8] = 2;
        assert_eq!(ChunkHeader::decode(&v), Err(FormatError::Version(2)));
    }

    #[test]
    fn marker_round_trip() {
        let m = encode_marker(DEFAULT_REGION_SIZE);
        assert_eq!(m.len() as u64, max_marker_bytes());
        assert_eq!(decode_marker(&m).unwrap(), DEFAULT_REGION_SIZE);
        assert_eq!(decode_marker(&encode_marker(1000)), Err(FormatError::Range("region size")));
    }

    #[test]
    fn names_and_tags() {
        assert!(check_name("vm-01.disk_0").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_tag("before upgrade").is_ok());
        assert!(check_tag("a\nb").is_err());
        assert!(check_tag("").is_err());
    }
}
