//! What each request of a session does to the store, and the wire code of each store failure.

use wire::{ErrorClass, Frame, InitialSync, PointRef};

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

fn point_ref(p: &PointInfo) -> PointRef {
    PointRef { point: p.id, generation: p.generation, cut_unix_ms: p.cut_unix_ms }
}

/// What the connection is receiving for.
pub(super) enum Receiving {
    Nothing,
    /// A generation being assembled.
    Pending(Box<PendingPoint>),
    /// A generation that already has a point: its frames are read and dropped, its commit
    /// answered with that point (re-sending is idempotent).
    Done(PointInfo),
}

/// What the server holds of a registered disk (`docs/wire.md` §4.4).
pub(super) fn disk_state(store: &Store, disk: &str) -> Result<Frame, StoreError> {
    let info = store.disk(disk)?;
    Ok(Frame::DiskState {
        disk: disk.to_string(),
        latest: info.latest.as_ref().map(point_ref),
        initial: info.initial.map(|i| InitialSync { generation: i.generation, next_offset: i.next_offset }),
        resync: store.resync_required(disk)?,
    })
}

/// Why `begin` refused a generation.
pub(super) enum Refusal {
    Store(StoreError),
    /// An incremental while the disk needs a resync (`ERR_RESYNC_REQUIRED`).
    Resync(String),
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::Store(e)
    }
}

/// Starts receiving `generation` of `disk` (`BeginGeneration`): a generation that already has
/// a point is [`Receiving::Done`], an interrupted initial copy of it resumes.
pub(super) fn begin(
    store: &Store,
    disk: &str,
    generation: u64,
    kind: wire::GenerationKind,
    base: Option<u64>,
) -> Result<Receiving, Refusal> {
    if let Some(p) = store.point_for_generation(disk, generation)? {
        return Ok(Receiving::Done(p));
    }
    if kind == wire::GenerationKind::Incremental {
        if let Some(why) = store.resync_required(disk)? {
            return Err(Refusal::Resync(why));
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
        let latest = store.disk(disk)?.latest.map(|p| p.id);
        if base.is_none() || base != latest {
            return Err(StoreError::BaseNotLatest { disk: disk.to_string(), base, latest }.into());
        }
    }
    if kind == GenerationKind::InitialFull {
        match store.resume_initial(disk) {
            Ok(Some(p)) if p.generation() == generation => return Ok(Receiving::Pending(Box::new(p))),
            Ok(_) => {}
            // The checkpoint of a copy abandoned before the latest point: this generation
            // replaces it with its first checkpoint.
            Err(StoreError::StaleGeneration { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Receiving::Pending(Box::new(store.begin(disk, generation, kind, base)?)))
}

/// Registers `disk` and binds it to `source` (`RegisterDisk`).
pub(super) fn register(
    store: &Store,
    disk: &str,
    size: u64,
    block_size: u32,
    source: &wire::SourceId,
    reenroll: bool,
    holder: &str,
) -> Result<(), StoreError> {
    let registered =
        store.register_disk(disk, size, block_size).and_then(|_| store.bind_source(disk, source, reenroll));
    if let Err(e @ StoreError::OtherSource { .. }) = &registered {
        tracing::error!(disk = %disk, peer = %holder, "refused a second source: {e}");
    }
    registered
}

/// Records that `point` still equals the disk (`Current`).
pub(super) fn current(
    store: &Store,
    disk: &str,
    point: u64,
    as_of_unix_ms: u64,
) -> Result<Frame, StoreError> {
    store.record_current(disk, point, as_of_unix_ms)?;
    Ok(Frame::CurrentAck { point, as_of_unix_ms })
}

/// Which of `hashes` the store has (`HaveQuery`).
pub(super) fn have(store: &Store, hashes: &[wire::Hash]) -> Frame {
    Frame::HaveReply { have: hashes.iter().map(|h| store.has_chunk(h)).collect() }
}

/// The block hashes of a range of a point (`HashQuery`); `open` keeps the point open between
/// queries.
pub(super) fn hashes(
    store: &Store,
    open: &mut PointHashes,
    disk: &str,
    point: u64,
    offset: u64,
    len: u64,
    block: u32,
) -> Result<Frame, StoreError> {
    let hashes = open.answer(point, || store.open_point(disk, PointSel::Id(point)), offset, len, block)?;
    Ok(Frame::Hashes { offset, block, hashes })
}

/// Checkpoints an initial full copy (`Progress`).
pub(super) fn progress(p: &mut PendingPoint, next_offset: u64) -> Result<Frame, StoreError> {
    p.checkpoint(next_offset)?;
    Ok(Frame::ProgressAck { next_offset })
}

/// Commits the generation being received (`Commit`).
pub(super) fn commit(
    p: PendingPoint,
    cut_unix_ms: u64,
    consistency: wire::Consistency,
    digest: Option<wire::Hash>,
) -> Result<PointInfo, StoreError> {
    let consistency = match consistency {
        wire::Consistency::Crash => Consistency::Crash,
        wire::Consistency::App => Consistency::App,
        wire::Consistency::Inconsistent => Consistency::Inconsistent,
    };
    p.commit_with_digest(cut_unix_ms, consistency, digest)
}
