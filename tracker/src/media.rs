//! Where tracking state is stored, behind a small trait so tests can simulate crashes.
//!
//! Media assumptions (see `docs/tracker-state.md`): a write is durable only after `sync` of
//! its file returns; a rename is durable only after `sync_dir`; a crash may drop any subset of
//! writes that were not synced and may tear a write at 512-byte sector boundaries; a synced
//! write is never lost or changed.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Named files in one directory.
pub trait Media: Send + Sync {
    /// The whole content of `name`, or `None` if it does not exist.
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// Writes `data` at `offset` of `name` (created if missing). Not durable until `sync`.
    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every write to `name` durable.
    fn sync(&self, name: &str) -> io::Result<()>;
    /// Truncates `name` to `len` bytes (created if missing). Not durable until `sync`.
    fn set_len(&self, name: &str, len: u64) -> io::Result<()>;
    /// Renames `from` to `to`, replacing it. Not durable until `sync_dir`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes `name` if it exists. Not durable until `sync_dir`.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes renames and removals durable.
    fn sync_dir(&self) -> io::Result<()>;
}

/// Replaces `name` with `data` atomically and durably: write a temporary file, sync it,
/// rename it over `name`, sync the directory.
pub fn replace(media: &dyn Media, name: &str, data: &[u8]) -> io::Result<()> {
    replace_with(media, name, |w| w.write_all(data))
}

/// `replace`, with the content written by `fill` as it goes (in `WRITE_CHUNK` pieces).
pub fn replace_with(
    media: &dyn Media,
    name: &str,
    fill: impl FnOnce(&mut MediaWriter<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = format!("{name}.tmp");
    media.set_len(&tmp, 0)?;
    let mut w = MediaWriter { media, name: &tmp, offset: 0, buf: Vec::with_capacity(WRITE_CHUNK) };
    fill(&mut w)?;
    w.flush()?;
    media.sync(&tmp)?;
    media.rename(&tmp, name)?;
    media.sync_dir()
}

/// Bytes `MediaWriter` gathers before each write.
const WRITE_CHUNK: usize = 64 << 10;

/// Appends to a file of a `Media`, in writes of `WRITE_CHUNK` bytes.
pub struct MediaWriter<'a> {
    media: &'a dyn Media,
    name: &'a str,
    offset: u64,
    buf: Vec<u8>,
}

impl io::Write for MediaWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > WRITE_CHUNK {
            self.flush()?;
        }
        if data.len() >= WRITE_CHUNK {
            self.media.write_at(self.name, self.offset, data)?;
            self.offset += data.len() as u64;
        } else {
            self.buf.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.media.write_at(self.name, self.offset, &self.buf)?;
            self.offset += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Real files in a directory. Open files are cached so `sync` hits the written descriptor.
pub struct DirMedia {
    dir: PathBuf,
    files: Mutex<HashMap<String, File>>,
}

impl DirMedia {
    /// Uses `dir`, creating it (mode 0700) if needed.
    pub fn open(dir: &Path) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        Ok(Self { dir: dir.to_path_buf(), files: Mutex::new(HashMap::new()) })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn with_file<T>(&self, name: &str, f: impl FnOnce(&File) -> io::Result<T>) -> io::Result<T> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if !files.contains_key(name) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.dir.join(name))?;
            files.insert(name.to_string(), file);
        }
        f(&files[name])
    }
}

impl Media for DirMedia {
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.dir.join(name)) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with_file(name, |f| f.write_all_at(data, offset))
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        self.with_file(name, |f| f.sync_data())
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        self.with_file(name, |f| f.set_len(len))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::rename(self.dir.join(from), self.dir.join(to))?;
        files.remove(to);
        if let Some(f) = files.remove(from) {
            files.insert(to.to_string(), f);
        }
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.remove(name);
        match std::fs::remove_file(self.dir.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

/// A crash-simulating medium for tests: it keeps what was written apart from what is durable,
/// and `crash` keeps a random subset of the non-durable writes, torn at sector boundaries.
#[derive(Default)]
pub struct SimMedia {
    inner: Mutex<SimState>,
}

#[derive(Default, Clone)]
struct SimState {
    /// Durable contents.
    durable: HashMap<String, Vec<u8>>,
    /// What a reader sees now (durable plus pending).
    visible: HashMap<String, Vec<u8>>,
    /// Pending writes per file: (offset, data), or a truncation as (len, empty) with a flag.
    pending: HashMap<String, Vec<PendingOp>>,
    /// Pending directory operations: Some((from, to)) rename, None-from removal.
    pending_dir: Vec<(Option<String>, String)>,
    /// When set, every operation fails (the simulated device died).
    failing: bool,
}

#[derive(Clone)]
enum PendingOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

fn apply(file: &mut Vec<u8>, op: &PendingOp) {
    match op {
        PendingOp::Write(off, data) => {
            let end = *off as usize + data.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[*off as usize..end].copy_from_slice(data);
        }
        PendingOp::SetLen(len) => file.resize(*len as usize, 0),
    }
}

impl SimMedia {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every later operation fail with EIO (a dead device).
    pub fn set_failing(&self, failing: bool) {
        self.state().failing = failing;
    }

    /// Simulates power loss: a new medium holding the durable state plus, for each pending
    /// write, chosen by `coin`, nothing, all of it, or a sector-aligned torn part of it.
    pub fn crash(&self, coin: &mut dyn FnMut(u32) -> u32) -> SimMedia {
        let st = self.state().clone();
        let mut durable = st.durable.clone();
        for (name, ops) in &st.pending {
            let file = durable.entry(name.clone()).or_default();
            for op in ops {
                match coin(3) {
                    0 => {}
                    1 => apply(file, op),
                    _ => {
                        if let PendingOp::Write(off, data) = op {
                            // Keep a random subset of its sectors.
                            for (i, sector) in data.chunks(512).enumerate() {
                                if coin(2) == 1 {
                                    apply(file, &PendingOp::Write(off + i as u64 * 512, sector.to_vec()));
                                }
                            }
                        }
                    }
                }
            }
        }
        // Directory operations are journaled in order: a prefix of them survives.
        let keep = coin(st.pending_dir.len() as u32 + 1) as usize;
        for (from, to) in &st.pending_dir[..keep] {
            {
                match from {
                    Some(from) => {
                        if let Some(d) = durable.remove(from) {
                            durable.insert(to.clone(), d);
                        }
                    }
                    None => {
                        durable.remove(to);
                    }
                }
            }
        }
        let next = SimState { visible: durable.clone(), durable, ..Default::default() };
        SimMedia { inner: Mutex::new(next) }
    }
}

fn eio() -> io::Error {
    io::Error::other("simulated I/O error")
}

impl Media for SimMedia {
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let st = self.state();
        if st.failing {
            return Err(eio());
        }
        Ok(st.visible.get(name).cloned())
    }

    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut st = self.state();
        if st.failing {
            return Err(eio());
        }
        let op = PendingOp::Write(offset, data.to_vec());
        apply(st.visible.entry(name.to_string()).or_default(), &op);
        st.pending.entry(name.to_string()).or_default().push(op);
        Ok(())
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        let mut st = self.state();
        if st.failing {
            return Err(eio());
        }
        let ops = st.pending.remove(name).unwrap_or_default();
        let file = st.durable.entry(name.to_string()).or_default();
        for op in &ops {
            apply(file, op);
        }
        Ok(())
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        let mut st = self.state();
        if st.failing {
            return Err(eio());
        }
        let op = PendingOp::SetLen(len);
        apply(st.visible.entry(name.to_string()).or_default(), &op);
        st.pending.entry(name.to_string()).or_default().push(op);
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut st = self.state();
        if st.failing {
            return Err(eio());
        }
        let d = st.visible.remove(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        st.visible.insert(to.to_string(), d);
        // The file's pending writes move with it; a rename of unsynced data is the classic trap.
        if let Some(p) = st.pending.remove(from) {
            st.pending.insert(to.to_string(), p);
        }
        st.pending_dir.push((Some(from.to_string()), to.to_string()));
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut st = self.state();
        if st.failing {
            return Err(eio());
        }
        st.visible.remove(name);
        st.pending_dir.push((None, name.to_string()));
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut st = self.state();
        if st.failing {
            return Err(eio());
        }
        let ops = std::mem::take(&mut st.pending_dir);
        for (from, to) in ops {
            match from {
                Some(from) => {
                    if let Some(d) = st.durable.remove(&from) {
                        st.durable.insert(to, d);
                    }
                }
                None => {
                    st.durable.remove(&to);
                }
            }
        }
        Ok(())
    }
}
