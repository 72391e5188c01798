//! The store's errors: one enum, classified by who is at fault (see [`StoreError::caller_fault`]).

use std::path::PathBuf;

use super::format::{hex, FormatError};
use super::info::GenerationKind;

/// Everything that can go wrong in the [`Store`](crate::Store).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An operating-system call failed on a file of the store.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A stored file (marker, page, root, checkpoint, metadata) failed its checks.
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    /// Another process (a running `siterep server`) has the store open for writing.
    #[error("store {0} is in use by another process that writes it (a running siterep server?)")]
    Locked(PathBuf),
    /// A writing operation in a process that opened the store for reading.
    #[error("{0} needs the store open for writing (this process only reads it)")]
    ReadOnly(&'static str),
    /// The directory holds something that is not a store.
    #[error("{0} is not empty and has no store marker")]
    NotAStore(PathBuf),
    /// A reader found no store: the directory does not exist or is empty.
    #[error(
        "no store at {0} (the directory does not exist or is empty; give the --store DIR of siterep server)"
    )]
    NoStore(PathBuf),
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName { what: &'static str, name: String, reason: &'static str },
    #[error("unknown disk {0:?}")]
    UnknownDisk(String),
    /// `register_disk` of a disk that exists with another geometry.
    #[error(
        "disk {disk:?} exists with size {existing_size} and block size {existing_block_size}, \
         not {size} and {block_size}"
    )]
    DiskMismatch { disk: String, existing_size: u64, existing_block_size: u32, size: u64, block_size: u32 },
    #[error("invalid geometry: size {size}, block size {block_size}: {reason}")]
    InvalidGeometry { size: u64, block_size: u32, reason: &'static str },
    #[error("disk {disk:?} has no recovery point {id}")]
    UnknownPoint { disk: String, id: u64 },
    #[error("disk {0:?} has no recovery point yet")]
    NoPoint(String),
    /// An incremental or resync generation named no base point.
    #[error("a {0:?} generation needs a base point")]
    BaseRequired(GenerationKind),
    /// The base point is not older than the generation built on it.
    #[error("base point {base} (generation {base_generation}) is not older than generation {generation}")]
    InvalidBase { base: u64, base_generation: u64, generation: u64 },
    /// An incremental whose base is not the disk's latest point: the changes committed since
    /// would be lost. The agent's tracking no longer matches this copy; a resync mends it.
    #[error(
        "an incremental of disk {disk:?} must apply on its latest point {latest:?}, not {base:?} \
         (the disk changed here since the agent's base; resync it: siterep agent --resync)"
    )]
    BaseNotLatest { disk: String, base: Option<u64>, latest: Option<u64> },
    /// A generation older than the disk's latest point that has no point of its own.
    #[error("generation {generation} of disk {disk:?} is older than its latest point's generation {latest}")]
    StaleGeneration { disk: String, generation: u64, latest: u64 },
    /// A chunk that an extent names is not in the store.
    #[error("chunk {} is not in the store", hex(.0))]
    MissingChunk([u8; 32]),
    /// A chunk failed verification: on upload (`stored: false`, nothing was stored) or when read
    /// back from the store (`stored: true`, including a chunk file that has gone missing).
    #[error("{} chunk {}: {reason}", if *.stored { "stored" } else { "uploaded" }, hex(.hash))]
    CorruptChunk { hash: [u8; 32], reason: String, stored: bool },
    /// An extent's length differs from the length of the chunk it names.
    #[error("chunk {} holds {stored} bytes, the extent says {given}", hex(.hash))]
    ChunkLength { hash: [u8; 32], stored: u32, given: u32 },
    #[error("{what} of {len} bytes exceeds the maximum of {max}")]
    TooLarge { what: &'static str, len: u64, max: u64 },
    #[error("range {offset}+{len} is outside the disk of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("range {offset}+{len} is not aligned to the block size {block_size}")]
    Unaligned { offset: u64, len: u64, block_size: u32 },
    /// `checkpoint` of a generation that is not an initial full copy.
    #[error("only an initial full copy has checkpoints")]
    NotInitial,
    /// The base point of an incremental or resync generation depends on a damaged or
    /// quarantined object (its root, a map page or a chunk): building on it would carry the
    /// damage forward. A resync (an initial full copy on that base) sends the data again.
    #[error(
        "recovery point {point} of disk {disk:?} is damaged ({reason}); an incremental cannot \
         build on it: resync the disk (siterep agent --resync) to send its data again"
    )]
    DamagedBase { disk: String, point: u64, reason: String },
    /// A lock was poisoned by a thread that panicked while holding it.
    #[error("internal state poisoned by a panic")]
    Poisoned,
    /// The disk is bound to another source (invariant 6): a clone, or a second machine under
    /// the same name.
    #[error(
        "disk {disk:?} is replicated from source {bound}, not from this source {offered}: if this \
         machine is a clone, protect it under another disk name; if it is the disk's source and its \
         shim state was re-created (reinstalled, or a shim without --state-dir restarted), run the \
         agent once with --reenroll (which resyncs)"
    )]
    OtherSource { disk: String, bound: String, offered: String },
    /// A generation that already has a point was sent again with other content: two sources
    /// replicate under one identity (a clone that copied the shim's state).
    #[error(
        "generation {generation} of disk {disk:?} was committed as point {point} with digest {committed}, \
         and is now sent again with digest {sent}: two machines replicate under one identity (a clone \
         with a copy of the shim's state?). Stop the clone's agent and protect it under another disk \
         name with a fresh --state-dir"
    )]
    Diverged { disk: String, generation: u64, point: u64, committed: String, sent: String },
    /// An operation that only applies to a disk's latest point named another.
    #[error("point {point} is not the latest point of disk {disk:?} (latest: {latest:?})")]
    NotLatest { disk: String, point: u64, latest: Option<u64> },
}

impl StoreError {
    /// True when the request was at fault (bad input, unknown names, a corrupt upload), false
    /// when the store or its medium was (I/O errors, corrupt stored files).
    pub fn caller_fault(&self) -> bool {
        match self {
            StoreError::Io { .. }
            | StoreError::Format { .. }
            | StoreError::NotAStore(_)
            | StoreError::NoStore(_)
            | StoreError::Locked(_)
            | StoreError::ReadOnly(_)
            | StoreError::DamagedBase { .. }
            | StoreError::Poisoned => false,
            StoreError::CorruptChunk { stored, .. } => !stored,
            _ => true,
        }
    }

    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { op, path, source }
    }

    pub(crate) fn format(path: impl Into<PathBuf>) -> impl FnOnce(FormatError) -> StoreError {
        let path = path.into();
        move |source| StoreError::Format { path, source }
    }

    /// True when the error says a stored object failed its checks or is gone (as opposed to
    /// an I/O error, which may pass): the object is quarantined.
    pub(crate) fn is_damage(&self) -> bool {
        matches!(self, StoreError::Format { .. } | StoreError::CorruptChunk { stored: true, .. })
    }
}
