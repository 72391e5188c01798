//! What changed and when.
//!
//! The tracker records every block a protected disk's writer changes, so the agent ships only
//! those. Its core is the [`DirtyMap`]: a bitmap with one bit per block of a configurable
//! power-of-two granularity, marked lock-free from every connection before a write is
//! acknowledged (invariant 1 of `DESIGN.md`: over-report, never under-report).
//!
//! Memory grows with the regions touched, not with the disk size: the bitmap is split into
//! leaves that are allocated on first mark, and an untouched leaf costs one pointer-sized slot.
#![forbid(unsafe_code)]

mod bits;
pub mod control;
mod dirty;
mod format;
pub mod media;
mod preserve;
mod tracker;

pub use dirty::{BlockState, DirtyMap, Extent, GranularityError, MAX_GRANULARITY, MIN_GRANULARITY};
pub use format::{FormatError, AL_MAX_REGIONS};
pub use media::{DirMedia, Media, SimMedia};
pub use tracker::{
    CutInfo, Generation, GenerationStatus, ImageRead, Options, Recovery, ReplicatedPoint, Status, TrackError,
    Tracker, WriteTicket, MAX_GENERATIONS,
};
