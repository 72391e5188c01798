//! What changed and when.
//!
//! The tracker records every block a protected disk's writer changes, so the agent ships only
//! those. Its core is the [`DirtyMap`]: a bitmap with one bit per block of a configurable
//! power-of-two granularity, marked lock-free from every connection before a write is
//! acknowledged (invariant 1 of `docs/architecture.md`: over-report, never under-report).
//!
//! Memory grows with the regions touched piecemeal, not with the disk size: the bitmap is
//! split into leaves of 2^15 blocks, an untouched leaf costs a 32-byte slot, a leaf first
//! reached by a range covering it whole costs no bitmap either (until part of it is cleared),
//! and any other leaf a 4 KiB bitmap. So 1 TiB at 4 KiB costs 0.5 MiB idle or zeroed whole,
//! and at most 32 MiB more however its blocks were made dirty.
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
    parse_source_id, CutInfo, Generation, GenerationStatus, ImageChange, ImageChangeKind, ImageRead, Options,
    Recovery, ReplicatedPoint, Status, TrackError, Tracker, WriteTicket, MAX_GENERATIONS,
};
