//! Chunks: content-addressed by the blake3 of their raw bytes, stored zstd-compressed as the
//! agent sent them, verified on the way in and on every read.
//!
//! A verified upload is *staged*: written to `incoming/` without a sync and remembered in the
//! live registry's staged set. A commit or checkpoint *promotes* the staged chunks it
//! references: one `syncfs` makes their contents durable, then they are renamed into
//! `chunks/` and the names synced. So every file in `chunks/` has durable contents, and one
//! whose hash is not in the staged set has a durable name too; staged files are never trusted
//! after a restart (`Store::open` removes them). `docs/store.md` has the whole argument.

use std::collections::{BTreeSet, HashSet};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::durable::sync_dir;
use super::error::StoreError;
use super::format::{hex, ChunkHeader, CHUNK_HEADER, MAX_CHUNK_RAW, MAX_CHUNK_STORED};
use super::layout::CHUNKS;
use super::medium::Medium;
use super::parts::Parts;
use super::quarantine::{self, Object};

/// A promotion touching at most this many shard directories fsyncs each of them; one touching
/// more makes the renames durable with a second `syncfs` instead.
const MAX_DIR_SYNCS: usize = 8;

fn corrupt(hash: &[u8; 32], stored: bool, reason: impl Into<String>) -> StoreError {
    StoreError::CorruptChunk { hash: *hash, reason: reason.into(), stored }
}

/// Decompresses into at most `raw_len` bytes and checks length and hash.
fn decode(hash: &[u8; 32], raw_len: u32, compressed: &[u8], stored: bool) -> Result<Vec<u8>, StoreError> {
    let raw = decompress(hash, raw_len, compressed, stored)?;
    if blake3::hash(&raw).as_bytes() != hash {
        return Err(corrupt(hash, stored, "blake3 of the raw bytes differs from its address"));
    }
    Ok(raw)
}

/// Decompresses into exactly `raw_len` bytes.
fn decompress(hash: &[u8; 32], raw_len: u32, compressed: &[u8], stored: bool) -> Result<Vec<u8>, StoreError> {
    thread_local! {
        // One decompression context per thread: making one per chunk costs more than
        // decompressing a small chunk.
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let raw = DCTX
        .with(|cell| {
            let mut cell = cell.borrow_mut();
            let dctx = match cell.as_mut() {
                Some(d) => d,
                None => cell.insert(zstd::bulk::Decompressor::new()?),
            };
            dctx.decompress(compressed, raw_len as usize)
        })
        .map_err(|e| corrupt(hash, stored, format!("does not decompress into {raw_len} bytes: {e}")))?;
    if raw.len() != raw_len as usize {
        return Err(corrupt(hash, stored, format!("decompresses to {} bytes, not {raw_len}", raw.len())));
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
pub(crate) fn read_header(
    m: &dyn Medium,
    path: &Path,
    hash: &[u8; 32],
) -> Result<Option<ChunkHeader>, StoreError> {
    let Some((len, h)) = m.read(path, CHUNK_HEADER as u64).map_err(StoreError::io("read", path))? else {
        return Ok(None);
    };
    if len < CHUNK_HEADER as u64 || h.len() < CHUNK_HEADER {
        return Err(corrupt(hash, true, "truncated header"));
    }
    let header = ChunkHeader::decode(h[..CHUNK_HEADER].try_into().expect("a header's length"))
        .map_err(|e| corrupt(hash, true, format!("header: {e}")))?;
    if &header.hash != hash {
        return Err(corrupt(hash, true, "header names another chunk"));
    }
    if len != CHUNK_HEADER as u64 + u64::from(header.stored_len) {
        return Err(corrupt(hash, true, format!("file of {len} bytes, header says {}", header.stored_len)));
    }
    Ok(Some(header))
}

/// Reads and verifies a stored chunk; a missing chunk is corruption of the store.
pub(crate) fn read(m: &dyn Medium, path: &Path, hash: &[u8; 32]) -> Result<Vec<u8>, StoreError> {
    let (header, stored) = read_stored(m, path, hash)?;
    decode(hash, header.raw_len, &stored, true)
}

/// Reads and verifies a stored chunk without keeping its bytes; returns the file's size.
pub(crate) fn verify(m: &dyn Medium, path: &Path, hash: &[u8; 32]) -> Result<u64, StoreError> {
    let (header, stored) = read_stored(m, path, hash)?;
    decode(hash, header.raw_len, &stored, true)?;
    Ok(CHUNK_HEADER as u64 + stored.len() as u64)
}

/// A stored chunk's header and compressed bytes.
fn read_stored(m: &dyn Medium, path: &Path, hash: &[u8; 32]) -> Result<(ChunkHeader, Vec<u8>), StoreError> {
    // The whole file, bounded by the largest chunk file; then its header is checked against
    // its length, so a file that changed between the two reads is refused.
    let max = CHUNK_HEADER as u64 + u64::from(MAX_CHUNK_STORED);
    let (len, mut all) = m
        .read(path, max)
        .map_err(StoreError::io("read", path))?
        .ok_or_else(|| corrupt(hash, true, "missing from the store"))?;
    if all.len() < CHUNK_HEADER {
        return Err(corrupt(hash, true, "truncated header"));
    }
    let header = ChunkHeader::decode(all[..CHUNK_HEADER].try_into().expect("a header's length"))
        .map_err(|e| corrupt(hash, true, format!("header: {e}")))?;
    if &header.hash != hash {
        return Err(corrupt(hash, true, "header names another chunk"));
    }
    if len != all.len() as u64 || all.len() != CHUNK_HEADER + header.stored_len as usize {
        return Err(corrupt(hash, true, format!("file of {len} bytes, header says {}", header.stored_len)));
    }
    let stored = all.split_off(CHUNK_HEADER);
    Ok((header, stored))
}

/// Writes a verified upload to `incoming/` under a name of its own, without a sync, and
/// returns the file's path; the caller records it in the staged set (or removes it). Nobody
/// reads the file before it is recorded, so no temporary name is needed.
pub(crate) fn stage(
    parts: &Parts,
    hash: &[u8; 32],
    raw_len: u32,
    compressed: &[u8],
) -> Result<PathBuf, StoreError> {
    let header = ChunkHeader {
        raw_len,
        stored_len: u32::try_from(compressed.len()).expect("bounded by MAX_CHUNK_STORED"),
        hash: *hash,
    }
    .encode();
    let path = parts.layout.incoming_dir().join(format!("{}.{}", hex(hash), parts.tmp.next_id()));
    match parts.m().create(&path, &[&header, compressed], false) {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = parts.m().remove_file(&path);
            Err(StoreError::io("create", &path)(e))
        }
    }
}

/// Where a chunk an extent may name is, with its raw length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// In `chunks/`, contents and name durable.
    Durable(u32),
    /// Staged by this process: durable once promoted.
    Staged(u32),
}

/// Looks a chunk up for a reference. The caller holds the gate (no sweep runs).
///
/// The file is looked at before the staged set: a hash leaves the staged set only after its
/// file in `chunks/` is durable, so a file seen before its hash was found not staged is
/// durable. A promotion may move the file between the two looks (absent from `chunks/`, then
/// no longer staged); hence one more look. A second miss is real: after a promotion the chunk
/// is stored, and an upload does not stage a stored chunk.
pub(crate) fn find(parts: &Parts, hash: &[u8; 32]) -> Result<Option<Found>, StoreError> {
    for _ in 0..2 {
        let header = read_header(parts.m(), &parts.layout.chunk_path(hash), hash);
        if let Some(s) = parts.live().staged.get(hash) {
            return Ok(Some(Found::Staged(s.raw_len)));
        }
        if let Some(h) = header? {
            return Ok(Some(Found::Durable(h.raw_len)));
        }
    }
    Ok(None)
}

/// Makes the chunks in `refs` durable in `chunks/`: those still staged are synced with one
/// `syncfs`, renamed into `chunks/`, and their names synced; the others must already be stored
/// (promoted by another commit), or this fails with [`StoreError::MissingChunk`] (a failed
/// sync discarded them). The caller holds the gate; on success every chunk of `refs` is
/// durable, contents and name.
pub(crate) fn promote(parts: &Parts, refs: &BTreeSet<[u8; 32]>) -> Result<(), StoreError> {
    if refs.is_empty() {
        return Ok(());
    }
    // One promotion at a time: a chunk staged once and needed by several commits is moved by
    // the first, and the others find it stored (and, holding this lock, finished).
    let _promotion = parts.locks.promotion();
    let todo: Vec<([u8; 32], PathBuf)> = {
        let live = parts.live();
        refs.iter().filter_map(|h| live.staged.get(h).map(|s| (*h, s.path.clone()))).collect()
    };
    if todo.len() < refs.len() {
        let staged: HashSet<[u8; 32]> = todo.iter().map(|(h, _)| *h).collect();
        for h in refs.iter().filter(|h| !staged.contains(*h)) {
            // Not staged and no promotion under way: a file here is durable.
            if read_header(parts.m(), &parts.layout.chunk_path(h), h)?.is_none() {
                return Err(StoreError::MissingChunk(*h));
            }
        }
    }
    if todo.is_empty() {
        return Ok(());
    }
    // Contents: everything staged before this call is durable after it.
    if let Err(e) = parts.faults.step("promote.syncfs").and_then(|()| parts.syncfs()) {
        discard_staged(parts, &e);
        return Err(e);
    }
    let mut shards = BTreeSet::new();
    for (hash, from) in &todo {
        let to = parts.layout.chunk_path(hash);
        match parts.m().rename(from, &to) {
            Ok(()) => {}
            // Moved by an earlier promotion whose directory sync failed; sync it now.
            Err(e)
                if e.kind() == ErrorKind::NotFound
                    && matches!(read_header(parts.m(), &to, hash), Ok(Some(_))) => {}
            Err(e) => return Err(StoreError::io("rename", &to)(e)),
        }
        shards.insert(hash[0]);
    }
    // Names. Until this succeeds the chunks stay in the staged set, so every commit that
    // needs them comes here (and tolerates their absence from `incoming/`).
    parts.faults.step("promote.names")?;
    if shards.len() <= MAX_DIR_SYNCS {
        for shard in &shards {
            sync_dir(parts.m(), &parts.layout.shard_dir(CHUNKS, *shard))?;
        }
    } else if let Err(e) = parts.syncfs() {
        discard_staged(parts, &e);
        return Err(e);
    }
    {
        let mut live = parts.live();
        for (hash, _) in &todo {
            live.staged.remove(hash);
        }
    }
    // A promoted chunk that was quarantined is healed: its home is durable again.
    for (hash, _) in &todo {
        if let Err(e) = quarantine::clear(parts, &Object::Chunk(*hash)) {
            tracing::warn!("a healed chunk keeps its quarantine files until the next sweep: {e}");
        }
    }
    tracing::debug!(chunks = todo.len(), shards = shards.len(), "staged chunks promoted");
    Ok(())
}

/// After a failed `syncfs`: the write-back error it reported may belong to any staged chunk,
/// and the next `syncfs` will not report it again, so no staged chunk is trusted any more.
/// Their files are removed and uploads staged meanwhile are refused (the epoch changes); a
/// pending point that references one fails with [`StoreError::MissingChunk`] and the agent
/// sends it again. Chunks an earlier promotion already moved to `chunks/` (their contents
/// synced by an earlier, successful `syncfs`; their names not yet) stay staged.
fn discard_staged(parts: &Parts, cause: &StoreError) {
    let mut live = parts.live();
    live.stage_epoch += 1;
    let before = live.staged.len();
    live.staged.retain(|_, s| match parts.m().remove_file(&s.path) {
        Ok(()) => false,
        Err(e) if e.kind() == ErrorKind::NotFound => true,
        // Not trusted either way; the next sweep or open removes the file.
        Err(_) => false,
    });
    tracing::error!(
        discarded = before - live.staged.len(),
        "staged chunks discarded after a failed sync: {cause}"
    );
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
