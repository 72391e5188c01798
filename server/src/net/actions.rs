//! What each action a session asks for ([`ServerAction`]) does to the store, and the wire code
//! of each store failure. When an action may be asked for is the session's
//! ([`wire::session::ServerSession`]).

use std::sync::atomic::Ordering;

use wire::session::{Outcome, Refusal, ServerAction};
use wire::{ChunkData, ErrorClass, InitialSync, PointRef};

use super::access::{Access, DiskClaim};
use super::ingest::Ingest;
use crate::store::hashes::PointHashes;
use crate::{Consistency, GenerationKind, PendingPoint, PointInfo, PointSel, Store, StoreError};

/// The wire code and class for a store failure.
pub(super) fn classify(e: &StoreError) -> (ErrorClass, u16) {
    match e {
        StoreError::CorruptChunk { .. } => (ErrorClass::Retryable, wire::ERR_CORRUPT_CHUNK),
        StoreError::DiskMismatch { .. } | StoreError::BaseNotLatest { .. } => {
            (ErrorClass::Fatal, wire::ERR_DISK_MISMATCH)
        }
        StoreError::UnknownDisk(_) => (ErrorClass::Fatal, wire::ERR_NO_SUCH_DISK),
        StoreError::OtherSource { .. } => (ErrorClass::Fatal, wire::ERR_OTHER_SOURCE),
        // The base point names a damaged object: a resync sends its data again (§6.8).
        StoreError::DamagedBase { .. } => (ErrorClass::Retryable, wire::ERR_RESYNC_REQUIRED),
        // One source sends its generations in order, on its latest point, and releases each
        // only once committed: a generation that has another point's content, or that is not
        // above the latest point's without a point of its own, came from another source under
        // the same identity.
        StoreError::Diverged { .. } | StoreError::StaleGeneration { .. } | StoreError::InvalidBase { .. } => {
            (ErrorClass::Fatal, wire::ERR_DIVERGED)
        }
        StoreError::InvalidName { .. } | StoreError::InvalidGeometry { .. } => {
            (ErrorClass::Fatal, wire::ERR_BAD_REQUEST)
        }
        StoreError::MissingChunk(_) => (ErrorClass::Retryable, wire::ERR_BAD_REQUEST),
        e if e.caller_fault() => (ErrorClass::Fatal, wire::ERR_BAD_REQUEST),
        _ => (ErrorClass::Retryable, wire::ERR_STORAGE),
    }
}

/// The refusal that says a store failure.
fn refusal(e: &StoreError) -> Refusal {
    let (class, code) = classify(e);
    Refusal::with_class(class, code, e.to_string())
}

/// `Done`, or the refusal of a store failure.
fn done(r: Result<(), StoreError>) -> Outcome {
    r.map_or_else(|e| Outcome::Refused(refusal(&e)), |()| Outcome::Done)
}

fn point_ref(p: &PointInfo) -> PointRef {
    PointRef { point: p.id, generation: p.generation, cut_unix_ms: p.cut_unix_ms }
}

/// The generation the connection receives.
enum Receiving {
    Nothing,
    /// A generation being assembled.
    Pending(Box<PendingPoint>),
    /// A generation that already has a point: its commit is answered with that point once its
    /// digest matches.
    Done(PointInfo),
}

impl Receiving {
    /// The generation being assembled: the session stores extents, settles them and
    /// checkpoints only while one is.
    fn pending(&mut self) -> &mut PendingPoint {
        match self {
            Receiving::Pending(p) => p,
            _ => unreachable!("the session asks for this only while a generation is received"),
        }
    }
}

/// The store's side of one connection's session: performs each action the session asks for.
pub(super) struct Actions<'scope, 'env> {
    store: &'env Store,
    access: &'env Access,
    /// The agent's certificate, as the enrollment names it.
    fingerprint: Option<String>,
    /// Who holds a disk's session, as the busy refusal names it.
    holder: String,
    /// The disk this session holds against other sessions.
    claim: Option<DiskClaim<'env>>,
    receiving: Receiving,
    /// The point hash queries compare, kept open between them.
    hashes: PointHashes,
    ingest: Ingest<'scope, 'env>,
}

impl<'scope, 'env> Actions<'scope, 'env> {
    pub(super) fn new(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        store: &'env Store,
        access: &'env Access,
        fingerprint: Option<String>,
        holder: String,
    ) -> Self {
        Self {
            store,
            access,
            fingerprint,
            holder,
            claim: None,
            receiving: Receiving::Nothing,
            hashes: PointHashes::default(),
            ingest: Ingest::new(scope, store),
        }
    }

    /// Who holds the session's disk, as logs and the busy refusal name it.
    pub(super) fn holder(&self) -> &str {
        &self.holder
    }

    /// Whether extents wait to be added to the generation (chunks still being verified).
    pub(super) fn waiting(&self) -> bool {
        self.ingest.waiting()
    }

    /// Performs `action` (any but [`ServerAction::Accept`], which is the connection's).
    pub(super) fn perform(&mut self, action: ServerAction) -> Outcome {
        let store = self.store;
        let metrics = &self.access.metrics;
        match action {
            ServerAction::Accept { .. } => unreachable!("the connection accepts the agent"),
            ServerAction::Register { disk, size, block_size, source, reenroll } => {
                self.register(&disk, size, block_size, &source, reenroll)
            }
            ServerAction::RecordCurrent { disk, point, as_of_unix_ms } => {
                done(store.record_current(&disk, point, as_of_unix_ms))
            }
            ServerAction::OpenGeneration { disk, generation, kind, base_point } => {
                match begin(store, &disk, generation, kind, base_point) {
                    Ok(r) => {
                        let opened =
                            if matches!(r, Receiving::Done(_)) { Outcome::HasPoint } else { Outcome::Opened };
                        self.receiving = r;
                        opened
                    }
                    Err(r) => Outcome::Refused(r),
                }
            }
            ServerAction::AnswerHave { hashes } => {
                Outcome::Have(hashes.iter().map(|h| store.has_chunk(h)).collect())
            }
            ServerAction::AnswerHashes { disk, point, offset, len, block } => {
                let open = || store.open_point(&disk, PointSel::Id(point));
                match self.hashes.answer(point, open, offset, len, block) {
                    Ok(hashes) => Outcome::Hashes(hashes),
                    Err(e) => Outcome::Refused(refusal(&e)),
                }
            }
            ServerAction::StoreChunk { offset, len, hash, data } => {
                let upload = match data {
                    ChunkData::Compressed(bytes) => {
                        metrics.bytes_received_total.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        metrics.chunks_stored_total.fetch_add(1, Ordering::Relaxed);
                        Some(bytes)
                    }
                    ChunkData::Known => None,
                };
                done(self.ingest.chunk(self.receiving.pending(), offset, len, hash, upload))
            }
            ServerAction::StoreZero { offset, len } => {
                done(self.ingest.zero(self.receiving.pending(), offset, len))
            }
            // Every extent, waiting for the uploads still being verified.
            ServerAction::Settle => done(self.ingest.settle(self.receiving.pending(), 0)),
            // The extents whose uploads are verified, without waiting for the others.
            ServerAction::SettleReady => done(self.ingest.settle(self.receiving.pending(), usize::MAX)),
            ServerAction::Checkpoint { next_offset } => {
                done(self.receiving.pending().checkpoint(next_offset))
            }
            ServerAction::Commit { generation, cut_unix_ms, consistency, digest } => {
                let Receiving::Pending(p) = std::mem::replace(&mut self.receiving, Receiving::Nothing) else {
                    unreachable!("the session commits only a generation received")
                };
                let consistency = match consistency {
                    wire::Consistency::Crash => Consistency::Crash,
                    wire::Consistency::App => Consistency::App,
                    wire::Consistency::Inconsistent => Consistency::Inconsistent,
                };
                match p.commit_with_digest(cut_unix_ms, consistency, digest) {
                    Ok(info) => {
                        tracing::info!(disk = %info.disk, point = info.id, generation, "recovery point committed");
                        metrics.points_total.fetch_add(1, Ordering::Relaxed);
                        Outcome::Committed { point: info.id }
                    }
                    Err(e) => Outcome::Refused(refusal(&e)),
                }
            }
            ServerAction::ConfirmCommit { digest, .. } => {
                let Receiving::Done(info) = std::mem::replace(&mut self.receiving, Receiving::Nothing) else {
                    unreachable!("the session confirms only a generation that is a point")
                };
                match info.check_digest(digest.as_ref()) {
                    Ok(()) => Outcome::Committed { point: info.id },
                    Err(e) => Outcome::Refused(refusal(&e)),
                }
            }
        }
    }

    /// Registers `disk` for this session (`RegisterDisk`): the agent must be enrolled for it;
    /// the store creates it or checks its geometry and binds it to `source`; the session holds
    /// it against other sessions. Any generation being received is abandoned.
    fn register(
        &mut self,
        disk: &str,
        size: u64,
        block_size: u32,
        source: &wire::SourceId,
        reenroll: bool,
    ) -> Outcome {
        let store = self.store;
        if let Err(why) = self.access.enrollment.allows(self.fingerprint.as_deref(), disk) {
            return Outcome::Refused(Refusal::new(wire::ERR_AUTH, why));
        }
        let registered = store
            .register_disk(disk, size, block_size)
            .and_then(|_| store.bind_source(disk, source, reenroll));
        if let Err(e) = registered {
            if let StoreError::OtherSource { .. } = e {
                tracing::error!(disk = %disk, peer = %self.holder, "refused a second source: {e}");
            }
            return Outcome::Refused(refusal(&e));
        }
        self.receiving = Receiving::Nothing;
        self.claim = None;
        match self.access.sessions.claim(disk, &self.holder) {
            Err(other) => {
                tracing::warn!(disk = %disk, peer = %self.holder, holder = %other, "disk busy: refused a second session");
                let msg = format!(
                    "disk {disk} is in another session (from {other}): one agent session per disk; retrying later"
                );
                return Outcome::Refused(Refusal::new(wire::ERR_BUSY, msg));
            }
            Ok(claim) => self.claim = Some(claim),
        }
        let state = store.disk(disk).and_then(|info| Ok((info, store.resync_required(disk)?)));
        match state {
            Ok((info, resync)) => Outcome::Registered {
                latest: info.latest.as_ref().map(point_ref),
                initial: info
                    .initial
                    .map(|i| InitialSync { generation: i.generation, next_offset: i.next_offset }),
                resync,
            },
            Err(e) => Outcome::Refused(refusal(&e)),
        }
    }
}

/// Starts receiving `generation` of `disk` (`BeginGeneration`): a generation that already has
/// a point is [`Receiving::Done`], an interrupted initial copy of it resumes.
fn begin(
    store: &Store,
    disk: &str,
    generation: u64,
    kind: wire::GenerationKind,
    base: Option<u64>,
) -> Result<Receiving, Refusal> {
    let refused = |e: StoreError| refusal(&e);
    if let Some(p) = store.point_for_generation(disk, generation).map_err(refused)? {
        return Ok(Receiving::Done(p));
    }
    if kind == wire::GenerationKind::Incremental {
        if let Some(why) = store.resync_required(disk).map_err(refused)? {
            return Err(Refusal::new(wire::ERR_RESYNC_REQUIRED, why));
        }
    }
    let kind = match kind {
        wire::GenerationKind::Incremental => GenerationKind::Incremental,
        wire::GenerationKind::InitialFull => GenerationKind::InitialFull,
        wire::GenerationKind::Resync => GenerationKind::Resync,
    };
    // An incremental applies on top of the latest point only: on any other base the changes
    // committed since would silently vanish (docs/wire.md §6.3).
    if kind == GenerationKind::Incremental {
        let latest = store.disk(disk).map_err(refused)?.latest.map(|p| p.id);
        if base.is_none() || base != latest {
            return Err(refused(StoreError::BaseNotLatest { disk: disk.to_string(), base, latest }));
        }
    }
    if kind == GenerationKind::InitialFull {
        match store.resume_initial(disk) {
            Ok(Some(p)) if p.generation() == generation => return Ok(Receiving::Pending(Box::new(p))),
            Ok(_) => {}
            // The checkpoint of a copy abandoned before the latest point: this generation
            // replaces it with its first checkpoint.
            Err(StoreError::StaleGeneration { .. }) => {}
            Err(e) => return Err(refused(e)),
        }
    }
    Ok(Receiving::Pending(Box::new(store.begin(disk, generation, kind, base).map_err(refused)?)))
}
