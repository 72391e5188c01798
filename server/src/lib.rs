//! The recovery site's store: chunks, map pages and durable recovery points.
//!
//! A [`Store`] is one directory. The agent ships each *generation* of a protected disk as
//! chunks (content-addressed by the blake3 of their raw bytes, stored zstd-compressed,
//! deduplicated across points and disks) placed at offsets, plus zero extents; a commit turns
//! the generation into a [`PointInfo`] recovery point. Every point is a complete map of its
//! disk, restorable without the others, yet points share structure: the disk's address space
//! is cut into fixed map regions, each region's extents serialize into a content-addressed map
//! page, and a point's root names the page of every region. A new point copies its base's root
//! and writes pages only for the regions its generation touched.
//!
//! The flow: [`Store::register_disk`]; per generation [`Store::put_chunk`] (verified before it
//! is stored), [`Store::begin`] → [`PendingPoint::add_chunk`] / [`PendingPoint::add_zero`] →
//! [`PendingPoint::commit`], which returns once the point is durable (invariant 3 of
//! `docs/architecture.md`); reading back with [`Store::open_point`] → [`PointReader`]; pruning
//! with [`Store::retain`]. The storage modules do no networking; [`net`] drives this API for agents.
//!
//! `docs/store.md` describes the layout, the formats (each with magic, version and checksum,
//! every length bounded by a named maximum), the durability protocol, the media assumptions
//! and why garbage collection never removes what a kept point needs.
#![forbid(unsafe_code)]

pub mod net;
mod store;

pub use store::error::StoreError;
pub use store::format::{
    max_page_extents, FormatError, MAX_BLOCK_SIZE, MAX_CHUNK_RAW, MAX_CHUNK_STORED, MAX_DISK_SIZE,
    MAX_METADATA_BYTES, MAX_NAME_LEN, MAX_REGIONS, MAX_REGION_SIZE, MAX_TAGS, MAX_TAG_LEN, MIN_BLOCK_SIZE,
    MIN_REGION_SIZE, VERSION,
};
pub use store::info::{
    Consistency, DiskInfo, ExtentKind, GcReport, GenerationKind, InitialProgress, PointInfo, PointSel,
    RestoreReport, Retention, StoreOptions, DEFAULT_REGION_SIZE,
};
pub use store::medium::{self, DiskMedium, Medium, SimMedium};
pub use store::pending::PendingPoint;
pub use store::quarantine::ObjectKind;
pub use store::reader::PointReader;
pub use store::scrub::{Checked, Damaged, Dependent, VerifiedPoint, VerifyOptions, VerifyReport};
pub use store::Store;
