//! Chunks: content-addressed by the blake3 of their raw bytes, stored zstd-compressed as the
//! agent sent them, verified on the way in and on every read.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::Path;

use crate::error::StoreError;
use crate::format::{ChunkHeader, CHUNK_HEADER, MAX_CHUNK_RAW, MAX_CHUNK_STORED};

fn corrupt(hash: &[u8; 32], stored: bool, reason: impl Into<String>) -> StoreError {
    StoreError::CorruptChunk { hash: *hash, reason: reason.into(), stored }
}

/// Decompresses into at most `raw_len` bytes and checks length and hash.
fn decode(hash: &[u8; 32], raw_len: u32, compressed: &[u8], stored: bool) -> Result<Vec<u8>, StoreError> {
    let raw = zstd::bulk::decompress(compressed, raw_len as usize)
        .map_err(|e| corrupt(hash, stored, format!("does not decompress into {raw_len} bytes: {e}")))?;
    if raw.len() != raw_len as usize {
        return Err(corrupt(hash, stored, format!("decompresses to {} bytes, not {raw_len}", raw.len())));
    }
    if blake3::hash(&raw).as_bytes() != hash {
        return Err(corrupt(hash, stored, "blake3 of the raw bytes differs from its address"));
    }
    Ok(raw)
}

/// Checks an upload before anything is stored.
pub(crate) fn verify_upload(hash: &[u8; 32], raw_len: u32, compressed: &[u8]) -> Result<(), StoreError> {
    if raw_len > MAX_CHUNK_RAW {
        return Err(StoreError::TooLarge {
            what: "raw chunk",
            len: raw_len.into(),
            max: MAX_CHUNK_RAW.into(),
        });
    }
    if compressed.len() as u64 > u64::from(MAX_CHUNK_STORED) {
        return Err(StoreError::TooLarge {
            what: "compressed chunk",
            len: compressed.len() as u64,
            max: MAX_CHUNK_STORED.into(),
        });
    }
    if raw_len == 0 || compressed.is_empty() {
        return Err(corrupt(hash, false, "empty chunk"));
    }
    decode(hash, raw_len, compressed, false).map(drop)
}

/// Reads a stored chunk's header, checking it names `hash` and matches the file's length.
/// `None` if the chunk is not stored.
pub(crate) fn read_header(path: &Path, hash: &[u8; 32]) -> Result<Option<(File, ChunkHeader)>, StoreError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("open", path)(e)),
    };
    let len = f.metadata().map_err(StoreError::io("stat", path))?.len();
    let mut h = [0u8; CHUNK_HEADER];
    if len < CHUNK_HEADER as u64 {
        return Err(corrupt(hash, true, "truncated header"));
    }
    f.read_exact(&mut h).map_err(StoreError::io("read", path))?;
    let header = ChunkHeader::decode(&h).map_err(|e| corrupt(hash, true, format!("header: {e}")))?;
    if &header.hash != hash {
        return Err(corrupt(hash, true, "header names another chunk"));
    }
    if len != CHUNK_HEADER as u64 + u64::from(header.stored_len) {
        return Err(corrupt(hash, true, format!("file of {len} bytes, header says {}", header.stored_len)));
    }
    Ok(Some((f, header)))
}

/// Reads and verifies a stored chunk; a missing chunk is corruption of the store.
pub(crate) fn read(path: &Path, hash: &[u8; 32]) -> Result<Vec<u8>, StoreError> {
    let (mut f, header) =
        read_header(path, hash)?.ok_or_else(|| corrupt(hash, true, "missing from the store"))?;
    // Bounded by MAX_CHUNK_STORED (checked by ChunkHeader::decode).
    let mut stored = vec![0u8; header.stored_len as usize];
    f.read_exact(&mut stored).map_err(StoreError::io("read", path))?;
    decode(hash, header.raw_len, &stored, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_checks() {
        let raw = vec![7u8; 10000];
        let hash = *blake3::hash(&raw).as_bytes();
        let z = zstd::bulk::compress(&raw, 1).unwrap();
        verify_upload(&hash, 10000, &z).unwrap();
        let wrong =
            |r: Result<(), StoreError>| matches!(r, Err(StoreError::CorruptChunk { stored: false, .. }));
        assert!(wrong(verify_upload(&hash, 9999, &z)));
        assert!(wrong(verify_upload(&hash, 10001, &z)));
        assert!(wrong(verify_upload(&[0; 32], 10000, &z)));
        assert!(wrong(verify_upload(&hash, 10000, &z[..z.len() - 1])));
        assert!(wrong(verify_upload(&hash, 10000, b"not zstd")));
        assert!(wrong(verify_upload(&hash, 0, &z)));
        assert!(matches!(verify_upload(&hash, MAX_CHUNK_RAW + 1, &z), Err(StoreError::TooLarge { .. })));
        let huge = vec![0u8; MAX_CHUNK_STORED as usize + 1];
        assert!(matches!(verify_upload(&hash, 10000, &huge), Err(StoreError::TooLarge { .. })));
    }

    #[test]
    fn a_bomb_does_not_allocate_past_raw_len() {
        // 64 MiB of zeroes compress to a few KiB; claiming 4 KiB must fail without inflating.
        let raw = vec![0u8; 64 << 20];
        let z = zstd::bulk::compress(&raw, 1).unwrap();
        let hash = *blake3::hash(&raw[..4096]).as_bytes();
        assert!(matches!(verify_upload(&hash, 4096, &z), Err(StoreError::CorruptChunk { .. })));
    }
}
