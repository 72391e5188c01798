//! Parallel ingest: a generation's chunks are verified and staged on worker threads while the
//! connection reads on, and its extents reach the pending point in the order sent.

use std::collections::VecDeque;

use wire::Hash;

use crate::{PendingPoint, Store, StoreError};

/// Chunks verified (decompressed, blake3) and staged at once, beyond which the connection
/// waits for the oldest before reading on.
const INGEST_WINDOW: usize = 8;
/// Chunks shorter than this (uncompressed) are verified and staged by the connection itself.
pub(super) const INLINE_BELOW: u32 = 128 << 10;
/// How often uploads that finished are looked at while the agent sends nothing.
pub(super) const IDLE_POLL_MS: u8 = 1;

/// An extent of the generation being received, in the order it came.
enum Extent {
    Chunk {
        offset: u64,
        len: u32,
        hash: Hash,
        staged: Option<crossbeam_channel::Receiver<Result<(), StoreError>>>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

struct Upload {
    hash: Hash,
    len: u32,
    bytes: Vec<u8>,
    done: crossbeam_channel::Sender<Result<(), StoreError>>,
}

/// Verifies and stages uploaded chunks on worker threads (two per CPU, started by the first
/// upload) while the connection reads on, and adds every extent to the pending point in the
/// order the agent sent them (a later extent over the same bytes wins).
pub(super) struct Ingest<'scope, 'env> {
    scope: &'scope std::thread::Scope<'scope, 'env>,
    store: &'env Store,
    uploads: Option<crossbeam_channel::Sender<Upload>>,
    queue: VecDeque<Extent>,
}

impl<'scope, 'env> Ingest<'scope, 'env> {
    pub(super) fn new(scope: &'scope std::thread::Scope<'scope, 'env>, store: &'env Store) -> Self {
        Self { scope, store, uploads: None, queue: VecDeque::new() }
    }

    /// Whether extents wait to be added to the pending point.
    pub(super) fn waiting(&self) -> bool {
        !self.queue.is_empty()
    }

    /// A chunk extent; `upload` is its compressed bytes, or `None` for a chunk the store has.
    pub(super) fn chunk(
        &mut self,
        p: &mut PendingPoint,
        offset: u64,
        len: u32,
        hash: Hash,
        upload: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let staged = match upload {
            None => None,
            // A small chunk costs less to verify here than to hand to another thread (a wakeup
            // across CPUs): the wire's order is kept all the same, and a refusal is at once.
            Some(bytes) if len < INLINE_BELOW => {
                self.store.put_chunk(&hash, len, &bytes)?;
                None
            }
            Some(bytes) => {
                let (done, staged) = crossbeam_channel::bounded(1);
                // Workers stop only with the session, or by panicking.
                self.workers().send(Upload { hash, len, bytes, done }).map_err(|_| StoreError::Poisoned)?;
                Some(staged)
            }
        };
        self.push(p, Extent::Chunk { offset, len, hash, staged })
    }

    fn workers(&mut self) -> &crossbeam_channel::Sender<Upload> {
        let (scope, store) = (self.scope, self.store);
        self.uploads.get_or_insert_with(|| {
            let (tx, rx) = crossbeam_channel::bounded::<Upload>(INGEST_WINDOW);
            // Two per CPU: a worker also waits, creating and writing its chunk's file.
            let n = (2 * std::thread::available_parallelism().map_or(2, |n| n.get())).min(INGEST_WINDOW);
            for _ in 0..n {
                let rx = rx.clone();
                scope.spawn(move || {
                    for u in rx {
                        let _ = u.done.send(store.put_chunk(&u.hash, u.len, &u.bytes));
                    }
                });
            }
            tx
        })
    }

    /// A zero extent.
    pub(super) fn zero(&mut self, p: &mut PendingPoint, offset: u64, len: u64) -> Result<(), StoreError> {
        self.push(p, Extent::Zero { offset, len })
    }

    /// Queues an extent, then adds what is ready to the pending point, waiting for the oldest
    /// upload while more than `INGEST_WINDOW` extents wait.
    fn push(&mut self, p: &mut PendingPoint, e: Extent) -> Result<(), StoreError> {
        self.queue.push_back(e);
        self.settle(p, INGEST_WINDOW)
    }

    /// Adds queued extents to the pending point in order: every ready one, and more (waiting
    /// for their uploads) until at most `keep` are left queued. The first failure rejects the
    /// generation.
    pub(super) fn settle(&mut self, p: &mut PendingPoint, keep: usize) -> Result<(), StoreError> {
        while let Some(front) = self.queue.front() {
            if let Extent::Chunk { staged: Some(rx), .. } = front {
                let result = if self.queue.len() > keep {
                    rx.recv().unwrap_or(Err(StoreError::Poisoned))
                } else {
                    match rx.try_recv() {
                        Ok(r) => r,
                        Err(crossbeam_channel::TryRecvError::Empty) => return Ok(()),
                        Err(crossbeam_channel::TryRecvError::Disconnected) => Err(StoreError::Poisoned),
                    }
                };
                result?;
            }
            match self.queue.pop_front().expect("a front") {
                Extent::Chunk { offset, len, hash, .. } => p.add_chunk(offset, len, hash)?,
                Extent::Zero { offset, len } => p.add_zero(offset, len)?,
            }
        }
        Ok(())
    }
}
