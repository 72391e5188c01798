//! Shipping extents: plan chunks, read + hash + compress them on worker threads (one NBD
//! connection each), ask the server which hashes it already has, send the rest.
//!
//! Memory is bounded by the result channel: at most `QUEUE` chunks (≤ `MAX_CHUNK` raw plus
//! their compressed form) wait for the sender.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crossbeam_channel::bounded;
use nbd_proto::client::Client;
use wire::{ChunkData, Frame};

use crate::error::AgentError;
use crate::link::Link;

/// Largest chunk the agent ships (raw bytes).
pub const MAX_CHUNK: u64 = 1 << 20;
/// Dirty runs closer than this are shipped as one chunk (the gap's clean blocks included), so
/// chunks are at least this large where the dirty set allows.
pub const MIN_CHUNK: u64 = 16 << 10;
/// Chunks waiting for the sender.
const QUEUE: usize = 16;
/// Hashes per HaveQuery.
const BATCH: usize = 64;
/// Hashes remembered as known to the server before the set is dropped.
const KNOWN_MAX: usize = 1 << 20;

/// Byte counts of one shipment.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Stats {
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub bytes_deduplicated: u64,
    pub bytes_zero: u64,
    pub chunks: u64,
}

/// Hashes the server is known to hold (from earlier replies and sends).
#[derive(Default, Clone)]
pub struct Known(Arc<Mutex<HashSet<[u8; 32]>>>);

impl Known {
    fn contains(&self, h: &[u8; 32]) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).contains(h)
    }
    fn insert(&self, h: [u8; 32]) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() >= KNOWN_MAX {
            s.clear();
        }
        s.insert(h);
    }
    /// Forgets everything (after the server said it lacks a hash we thought it had).
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// The digest of what a generation contains (`docs/wire.md` §6.6): blake3 over its extents in
/// offset order, each as offset, length, kind and (for data) the chunk's hash. The same
/// generation sent again has the same digest, however its chunks were scheduled; another
/// source's generation of the same number has another.
#[derive(Debug, Default)]
pub struct GenerationDigest(Vec<(u64, u64, Option<[u8; 32]>)>);

impl GenerationDigest {
    pub fn zero(&mut self, offset: u64, len: u64) {
        self.0.push((offset, len, None));
    }

    pub fn data(&mut self, offset: u64, len: u64, hash: [u8; 32]) {
        self.0.push((offset, len, Some(hash)));
    }

    pub fn finish(mut self) -> [u8; 32] {
        self.0.sort_unstable();
        let mut h = blake3::Hasher::new();
        h.update(b"siterep generation digest 1");
        for (offset, len, hash) in &self.0 {
            h.update(&offset.to_be_bytes());
            h.update(&len.to_be_bytes());
            match hash {
                None => h.update(&[0]),
                Some(x) => h.update(&[1]).update(x),
            };
        }
        *h.finalize().as_bytes()
    }
}

/// Turns sorted, disjoint dirty data extents into chunks: runs separated by less than
/// `MIN_CHUNK` merge (bounded by `end`), then split at `MAX_CHUNK` boundaries.
pub fn plan_chunks(extents: &[(u64, u64)], end: u64) -> Vec<(u64, u64)> {
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for &(o, l) in extents {
        match merged.last_mut() {
            Some(last) if o.saturating_sub(last.0 + last.1) < MIN_CHUNK && o >= last.0 + last.1 => {
                last.1 = (o + l).min(end) - last.0;
            }
            _ => merged.push((o, l.min(end - o))),
        }
    }
    let mut out = Vec::new();
    for (o, l) in merged {
        let mut pos = o;
        let stop = o + l;
        while pos < stop {
            // Cut at MAX_CHUNK-aligned boundaries so re-sent data hashes the same way.
            let next = ((pos / MAX_CHUNK) + 1) * MAX_CHUNK;
            let e = next.min(stop);
            out.push((pos, e - pos));
            pos = e;
        }
    }
    out
}

struct Item {
    offset: u64,
    len: u32,
    hash: [u8; 32],
    /// None when the server is known to have the hash.
    compressed: Option<Vec<u8>>,
}

/// Reads, hashes, compresses and sends `chunks` of export `export` at `socket`.
/// `on_done(bytes)` is called as chunks are sent (progress); each chunk sent is added to
/// `digest`, when given.
#[allow(clippy::too_many_arguments)]
pub fn ship_chunks(
    link: &mut Link,
    socket: &Path,
    export: &str,
    chunks: &[(u64, u64)],
    readers: usize,
    zstd_level: i32,
    known: &Known,
    stats: &mut Stats,
    mut digest: Option<&mut GenerationDigest>,
    on_done: &mut dyn FnMut(u64),
) -> Result<(), AgentError> {
    if chunks.is_empty() {
        return Ok(());
    }
    let (job_tx, job_rx) = bounded::<(u64, u64)>(chunks.len());
    for c in chunks {
        job_tx.send(*c).expect("receiver alive");
    }
    drop(job_tx);
    let (res_tx, res_rx) = bounded::<Result<Item, AgentError>>(QUEUE);
    std::thread::scope(|scope| -> Result<(), AgentError> {
        for _ in 0..readers.max(1).min(chunks.len()) {
            let (job_rx, res_tx, known) = (job_rx.clone(), res_tx.clone(), known.clone());
            scope.spawn(move || {
                let mut client = match Client::connect_unix(socket, export, &[]) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = res_tx.send(Err(e.into()));
                        return;
                    }
                };
                // One compression context per worker, reused for every chunk.
                let mut zstd = match zstd::bulk::Compressor::new(zstd_level) {
                    Ok(z) => z,
                    Err(e) => {
                        let _ = res_tx.send(Err(AgentError::Config(format!("zstd level {zstd_level}: {e}"))));
                        return;
                    }
                };
                let mut buf = vec![0u8; MAX_CHUNK as usize];
                while let Ok((offset, len)) = job_rx.recv() {
                    let data = &mut buf[..len as usize];
                    let item = client.read(offset, data).map_err(AgentError::from).map(|()| {
                        let hash = *blake3::hash(data).as_bytes();
                        let compressed = if known.contains(&hash) {
                            None
                        } else {
                            Some(zstd.compress(data).expect("zstd compresses any input"))
                        };
                        Item { offset, len: len as u32, hash, compressed }
                    });
                    let failed = item.is_err();
                    if res_tx.send(item).is_err() || failed {
                        return;
                    }
                }
                let _ = client.disconnect();
            });
        }
        drop(res_tx);
        let mut batch: Vec<Item> = Vec::with_capacity(BATCH);
        let mut result = Ok(());
        for item in res_rx.iter() {
            match item {
                Ok(item) => {
                    stats.bytes_read += u64::from(item.len);
                    batch.push(item);
                    if batch.len() == BATCH || res_rx.is_empty() {
                        if let Err(e) =
                            send_batch(link, &mut batch, known, stats, digest.as_deref_mut(), on_done)
                        {
                            result = Err(e);
                            break;
                        }
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Unblock workers if we stopped early; the scope joins them.
        drop(res_rx);
        result?;
        if !batch.is_empty() {
            send_batch(link, &mut batch, known, stats, digest, on_done)?;
        }
        Ok(())
    })
}

fn send_batch(
    link: &mut Link,
    batch: &mut Vec<Item>,
    known: &Known,
    stats: &mut Stats,
    mut digest: Option<&mut GenerationDigest>,
    on_done: &mut dyn FnMut(u64),
) -> Result<(), AgentError> {
    let ask: Vec<[u8; 32]> = batch.iter().filter(|i| i.compressed.is_some()).map(|i| i.hash).collect();
    // One answer per hash asked, in order (the session machine checks the count).
    let have: Vec<bool> = if ask.is_empty() { Vec::new() } else { link.have(ask)? };
    let mut answers = have.into_iter();
    let mut done = 0u64;
    for item in batch.drain(..) {
        let data = match item.compressed {
            None => ChunkData::Known,
            Some(c) => {
                if answers.next().unwrap_or(false) {
                    ChunkData::Known
                } else {
                    stats.bytes_sent += c.len() as u64;
                    ChunkData::Compressed(c)
                }
            }
        };
        if matches!(data, ChunkData::Known) {
            stats.bytes_deduplicated += u64::from(item.len);
        }
        stats.chunks += 1;
        done += u64::from(item.len);
        if let Some(d) = digest.as_deref_mut() {
            d.data(item.offset, u64::from(item.len), item.hash);
        }
        link.queue(&Frame::Chunk { offset: item.offset, len: item.len, hash: item.hash, data })?;
        known.insert(item.hash);
    }
    link.flush()?;
    on_done(done);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_merges_close_runs_and_splits_large_ones() {
        let k = 1024;
        // Two 4 KiB writes 8 KiB apart merge; a far one stays alone and small.
        assert_eq!(
            plan_chunks(&[(0, 4 * k), (12 * k, 4 * k), (1000 * k, 4 * k)], 1 << 30),
            vec![(0, 16 * k), (1000 * k, 4 * k)]
        );
        // A 3 MiB run splits at 1 MiB boundaries.
        assert_eq!(
            plan_chunks(&[(512 * k, 3 << 20)], 1 << 30),
            vec![(512 * k, 512 * k), (1 << 20, 1 << 20), (2 << 20, 1 << 20), (3 << 20, 512 * k)]
        );
        assert!(plan_chunks(&[], 10).is_empty());
    }

    #[test]
    fn a_generation_digest_depends_on_content_not_order() {
        let digest = |items: &[(u64, u64, Option<[u8; 32]>)]| {
            let mut d = GenerationDigest::default();
            for &(o, l, h) in items {
                match h {
                    Some(h) => d.data(o, l, h),
                    None => d.zero(o, l),
                }
            }
            d.finish()
        };
        let a = [(0, 4096, Some([1; 32])), (8192, 4096, None), (1 << 20, 65536, Some([2; 32]))];
        let mut shuffled = a;
        shuffled.swap(0, 2);
        assert_eq!(digest(&a), digest(&shuffled));
        // Other bytes at the same place, a zero instead of data, another length: another digest.
        let mut other = a;
        other[0].2 = Some([3; 32]);
        assert_ne!(digest(&a), digest(&other));
        let mut other = a;
        other[1].2 = Some([0; 32]);
        assert_ne!(digest(&a), digest(&other));
        let mut other = a;
        other[1].1 = 8192;
        assert_ne!(digest(&a), digest(&other));
    }
}
