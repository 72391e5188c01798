//! The live registry: what this process is working on right now — pending points, open
//! readers, recent uploads and staged chunks — which retention must keep (see `gc.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::format::Root;
use super::map::RegionMap;

/// Processes still working on files and references the sweep must not remove.
#[derive(Default)]
pub(crate) struct Live {
    next_seq: u64,
    next_token: u64,
    pub(crate) pending: HashMap<u64, PendingSlot>,
    /// Open readers by (disk, point id); their points are not pruned.
    pub(crate) readers: HashMap<(String, u64), usize>,
    /// Chunks uploaded while some pending point was open, by upload sequence number.
    recent: VecDeque<(u64, [u8; 32])>,
    /// Chunks this process staged in `incoming/`, whose contents may not be durable. A hash
    /// leaves this map only once its file in `chunks/` is durable, contents and name (see
    /// `chunk::promote`), so a file in `chunks/` whose hash is not here is durable.
    pub(crate) staged: HashMap<[u8; 32], Staged>,
    /// Bumped when a failed `syncfs` discards the staged chunks: an upload that read an older
    /// value before writing its file is refused instead of staged.
    pub(crate) stage_epoch: u64,
}

/// A staged chunk: its file under `incoming/` (or, after a promotion whose directory sync
/// failed, already moved to `chunks/`) and its raw length.
pub(crate) struct Staged {
    pub(crate) path: PathBuf,
    pub(crate) raw_len: u32,
}

pub(crate) struct PendingSlot {
    begin_seq: u64,
    pub(crate) state: Arc<Mutex<PendingState>>,
}

/// What a pending point references; the sweep reads it (see `gc.rs`).
#[derive(Debug, Default)]
pub(crate) struct PendingState {
    /// The page of every region not in `dirty` (copied from the base, or written early).
    pub(crate) root: Root,
    /// Regions changed by this generation, in memory.
    pub(crate) dirty: BTreeMap<u32, RegionMap>,
    pub(crate) changed_bytes: u64,
    /// Chunks this generation referenced while they were staged: promoted (made durable) by
    /// the next checkpoint or the commit. The sweep keeps them.
    pub(crate) staged: BTreeSet<[u8; 32]>,
    /// Page shard directories whose new names are not yet synced.
    pub(crate) unsynced: BTreeSet<u8>,
}

impl PendingState {
    pub(crate) fn new(root: Root, changed_bytes: u64) -> PendingState {
        PendingState { root, changed_bytes, ..PendingState::default() }
    }
}

impl Live {
    pub(crate) fn add_pending(&mut self, state: Arc<Mutex<PendingState>>) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.pending.insert(token, PendingSlot { begin_seq: self.next_seq, state });
        token
    }

    pub(crate) fn remove_pending(&mut self, token: u64) {
        self.pending.remove(&token);
        self.trim();
    }

    pub(crate) fn record_put(&mut self, hash: [u8; 32]) {
        if self.pending.is_empty() {
            return;
        }
        self.recent.push_back((self.next_seq, hash));
        self.next_seq += 1;
    }

    /// Forgets uploads older than every open pending point.
    fn trim(&mut self) {
        match self.pending.values().map(|p| p.begin_seq).min() {
            None => self.recent.clear(),
            Some(horizon) => {
                while self.recent.front().is_some_and(|(seq, _)| *seq < horizon) {
                    self.recent.pop_front();
                }
            }
        }
    }

    /// Chunks uploaded since the oldest open pending point began: the sweep keeps them.
    pub(crate) fn protected_uploads(&mut self) -> impl Iterator<Item = &[u8; 32]> + '_ {
        self.trim();
        self.recent.iter().map(|(_, h)| h)
    }

    /// Registers an open reader of point `id` of `disk`.
    pub(crate) fn add_reader(&mut self, disk: &str, id: u64) {
        *self.readers.entry((disk.to_string(), id)).or_default() += 1;
    }

    /// Forgets an open reader of point `id` of `disk`.
    pub(crate) fn remove_reader(&mut self, disk: &str, id: u64) {
        let key = (disk.to_string(), id);
        if let Some(n) = self.readers.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.readers.remove(&key);
            }
        }
    }
}
