//! Where everything is in a store's directory (`docs/store.md`, "Layout"): the names of its
//! files and directories, and the path of each object.

use std::path::{Path, PathBuf};

use super::durable::{self, sync_dir, write_atomic, TmpNames, TMP_PREFIX};
use super::error::StoreError;
use super::format::{encode_marker, hex};
use super::medium::Medium;

/// The store marker: magic, version, region size.
pub(crate) const MARKER: &str = "siterep-store";
/// Held exclusively (`flock`) by the one process that writes the store.
pub(crate) const WRITER_LOCK: &str = "writer.lock";
/// Held shared by every process that only reads the store (`points`, `restore`, `export`,
/// `failover`) for its whole life, and exclusively by the writer's retention: pruning and
/// sweeping never run under another process's reader.
pub(crate) const READERS_LOCK: &str = "readers.lock";
pub(crate) const CHUNKS: &str = "chunks";
/// Chunks received but not yet synced; emptied by every [`Store::open`](crate::Store::open).
pub(crate) const INCOMING: &str = "incoming";
pub(crate) const PAGES: &str = "pages";
pub(crate) const DISKS: &str = "disks";
pub(crate) const QUARANTINE: &str = "quarantine";
pub(crate) const DISK_FILE: &str = "disk.json";
pub(crate) const SOURCE_FILE: &str = "source.json";
pub(crate) const CURRENT_FILE: &str = "current.json";
pub(crate) const INITIAL_FILE: &str = "initial.bin";
pub(crate) const POINTS: &str = "points";

/// A point's file name: its id as 20 digits, then `ext` (`json` or `root`).
pub(crate) fn point_file(id: u64, ext: &str) -> String {
    format!("{id:020}.{ext}")
}

/// The id of a point file name `<20 digits>.<ext>`.
pub(crate) fn parse_point_file(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// A store's directory and its map region size (fixed when the store is created).
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) root: PathBuf,
    pub(crate) region_size: u64,
}

impl Layout {
    pub(crate) fn shard_dir(&self, kind: &str, shard: u8) -> PathBuf {
        self.root.join(kind).join(format!("{shard:02x}"))
    }

    pub(crate) fn chunk_path(&self, hash: &[u8; 32]) -> PathBuf {
        self.shard_dir(CHUNKS, hash[0]).join(hex(hash))
    }

    pub(crate) fn incoming_dir(&self) -> PathBuf {
        self.root.join(INCOMING)
    }

    pub(crate) fn page_path(&self, hash: &[u8; 32]) -> PathBuf {
        self.shard_dir(PAGES, hash[0]).join(hex(hash))
    }

    pub(crate) fn disks_dir(&self) -> PathBuf {
        self.root.join(DISKS)
    }

    pub(crate) fn disk_dir(&self, disk: &str) -> PathBuf {
        self.disks_dir().join(disk)
    }

    pub(crate) fn points_dir(&self, disk: &str) -> PathBuf {
        self.disk_dir(disk).join(POINTS)
    }

    pub(crate) fn quarantine_dir(&self) -> PathBuf {
        self.root.join(QUARANTINE)
    }
}

/// Creates the layout of a new store in `root` (missing or empty, or left so by an interrupted
/// creation), the marker last. A directory holding anything else is refused
/// ([`StoreError::NotAStore`]).
pub(crate) fn create(m: &dyn Medium, root: &Path, region_size: u64) -> Result<(), StoreError> {
    for name in durable::list(m, root)? {
        if ![CHUNKS, PAGES, DISKS, INCOMING, QUARANTINE, WRITER_LOCK, READERS_LOCK].contains(&name.as_str())
            && !name.starts_with(TMP_PREFIX)
        {
            return Err(StoreError::NotAStore(root.to_path_buf()));
        }
    }
    for kind in [CHUNKS, PAGES] {
        let dir = root.join(kind);
        for shard in 0..=255u8 {
            let d = dir.join(format!("{shard:02x}"));
            m.create_dir_all(&d).map_err(StoreError::io("create directory", &d))?;
        }
        sync_dir(m, &dir)?;
    }
    for dir in [DISKS, INCOMING] {
        let dir = root.join(dir);
        m.create_dir_all(&dir).map_err(StoreError::io("create directory", &dir))?;
    }
    sync_dir(m, root)?;
    // The marker last: a directory without it is an unfinished creation, finished next time.
    write_atomic(m, &TmpNames::default(), root, MARKER, &[&encode_marker(region_size)], true)?;
    tracing::info!(root = %root.display(), region_size, "store created");
    Ok(())
}
