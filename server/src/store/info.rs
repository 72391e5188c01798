//! The store's public value types: what callers pass in and get back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The time now, as the records of the store keep it: milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Size of a map region unless the store was created with another.
pub const DEFAULT_REGION_SIZE: u64 = 64 << 20;

/// How a generation was produced by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GenerationKind {
    /// The blocks that changed since the base point.
    Incremental,
    /// The whole disk, the first time (or again): unwritten ranges read as zeroes unless a base
    /// is given.
    InitialFull,
    /// The ranges found to differ from the base point after the tracker lost track.
    Resync,
}

/// What a recovery point's data is consistent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// As if the machine had lost power at the cut.
    Crash,
    /// Applications were quiesced (freeze hooks) at the cut.
    App,
    /// Not a point-in-time image (the tracker lost pre-images); usable only as a base.
    Inconsistent,
}

/// Which point to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointSel {
    Id(u64),
    /// The point with the highest id.
    Latest,
}

/// What a range of a point reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtentKind {
    Data,
    /// Zeroes: written as zeroes, trimmed, or never written. A restore leaves a hole.
    Zero,
}

/// A recovery point: a complete, durable map of its disk at a generation's cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PointInfo {
    pub disk: String,
    /// Monotonic per disk, from 1.
    pub id: u64,
    /// The source tracker's generation this point was built from.
    pub generation: u64,
    pub kind: GenerationKind,
    /// The point this one was built on (informational: every point restores on its own).
    pub base: Option<u64>,
    /// When the source cut the generation.
    pub cut_unix_ms: u64,
    pub consistency: Consistency,
    /// When the point was committed here.
    pub created_unix_ms: u64,
    /// Tags with the time each was added. A tagged point is never pruned by retention.
    pub tags: Vec<(String, u64)>,
    /// Bytes the generation carried (data and zero extents; overlaps counted each time).
    pub changed_bytes: u64,
    /// The source's digest of what the generation contains (hex blake3), when it sent one:
    /// a generation sent again must carry the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// Progress of an interrupted initial full copy, as of its last checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InitialProgress {
    pub generation: u64,
    /// Where the agent continues.
    pub next_offset: u64,
}

/// A protected disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DiskInfo {
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub latest: Option<PointInfo>,
    pub initial: Option<InitialProgress>,
}

/// Which points [`Store::retain`](crate::Store::retain) keeps. A point is kept when any rule
/// keeps it; with no rule set every point is kept (and `retain` only collects garbage). The
/// latest point of each disk, tagged points and points open in a [`PointReader`](crate::PointReader)
/// are always kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Keep the newest N points of each disk.
    pub keep_last: Option<usize>,
    /// Keep points whose cut is at most this old.
    pub max_age: Option<Duration>,
}

/// What a retention run removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GcReport {
    /// (disk, point id) of every pruned point.
    pub points_removed: Vec<(String, u64)>,
    pub pages_removed: u64,
    pub chunks_removed: u64,
    /// Size of the files removed (pages, chunks, staged chunks, orphaned roots and temporary
    /// files).
    pub bytes_freed: u64,
    /// Referenced objects left in place.
    pub pages_kept: u64,
    pub chunks_kept: u64,
    /// Staged (not yet committed) chunks dropped: uploaded outside every pending generation
    /// and referenced by none.
    #[serde(default)]
    pub staged_removed: u64,
    /// Nothing was done: another process was reading the store (the next run retries).
    #[serde(default)]
    pub deferred: bool,
}

/// What a restore wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RestoreReport {
    pub bytes_written: u64,
    /// Bytes left as holes (or written as zeroes on a block device).
    pub bytes_zero: u64,
}

/// Settings used when a store is created; an existing store keeps those it was created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Bytes of a disk's address space per map page: a power of two from
    /// [`MIN_REGION_SIZE`](crate::MIN_REGION_SIZE) to [`MAX_REGION_SIZE`](crate::MAX_REGION_SIZE).
    pub region_size: u64,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions { region_size: DEFAULT_REGION_SIZE }
    }
}
