//! Exports: the protected disk (tracked) and its frozen generations (`gen-N`, read-only, read
//! as the disk was at the cut), the catalog that lists them, and the commands every engine
//! runs the same way (TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use tracker::{BlockState, Extent, Generation, Tracker, WriteTicket};

use crate::backend::Backend;
use nbd_proto::consts::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use nbd_proto::transmission::{self, Command};
use nbd_proto::{BlockSizes, Errno, ExportInfo, MetaContext, MAX_EXTENTS, MAX_PAYLOAD};

/// `siterep:changes:*` status flag: the block is dirty and known to read as zeroes.
pub const STATE_CHANGED_ZERO: u32 = 1 << 1;

/// What an export serves.
#[derive(Debug)]
pub enum ExportKind {
    /// The protected disk itself, tracked unless `tracker` is `None` (`--no-track`).
    Live { tracker: Option<Arc<Tracker>> },
    /// An unreleased generation: read-only, as the disk was at its cut.
    Generation { tracker: Arc<Tracker>, generation: Arc<Generation> },
}

/// One served image.
#[derive(Debug)]
pub struct Export {
    pub info: ExportInfo,
    pub backend: Arc<Backend>,
    pub kind: ExportKind,
}

/// Reads at least this long are checked for holes and may be answered with OFFSET_HOLE chunks.
pub const SPARSE_READ_MIN: u32 = 64 << 10;

/// Name of the export of generation `id`.
pub fn generation_export_name(id: u64) -> String {
    format!("gen-{id}")
}

fn block_sizes(backend: &Backend) -> BlockSizes {
    let min = backend.min_block();
    BlockSizes { minimum: min, preferred: 4096u32.max(min), maximum: MAX_PAYLOAD }
}

impl Export {
    /// The protected disk as export `name`.
    pub fn live(name: &str, backend: Arc<Backend>, read_only: bool, tracker: Option<Arc<Tracker>>) -> Self {
        let info = ExportInfo {
            name: name.to_string(),
            description: format!("siterep protected disk ({} bytes)", backend.size()),
            size: backend.size(),
            read_only,
            rotational: false,
            block_sizes: block_sizes(&backend),
            contexts: vec![
                MetaContext::Allocation,
                MetaContext::DirtyBitmap("live".into()),
                MetaContext::Changes("live".into()),
            ],
        };
        Self { info, backend, kind: ExportKind::Live { tracker } }
    }

    /// Generation `generation` of the disk, read-only.
    pub fn generation(backend: Arc<Backend>, tracker: Arc<Tracker>, generation: Arc<Generation>) -> Self {
        let name = generation_export_name(generation.id);
        let info = ExportInfo {
            name: name.clone(),
            description: format!(
                "siterep generation {} (cut at {} ms)",
                generation.id, generation.cut_unix_ms
            ),
            size: backend.size(),
            read_only: true,
            rotational: false,
            block_sizes: block_sizes(&backend),
            contexts: vec![
                MetaContext::Allocation,
                MetaContext::DirtyBitmap(name.clone()),
                MetaContext::Changes(name),
            ],
        };
        Self { info, backend, kind: ExportKind::Generation { tracker, generation } }
    }

    /// Records a change before the image is touched (invariant 1); pair with `end_write`.
    /// A quiesced disk (planned failover) refuses the write with EPERM; a range the image lost
    /// under the shim ([`crate::watch`]) with EIO, so a write never extends a shrunk file once
    /// the shrink is known.
    pub fn begin_write(&self, offset: u64, len: u64) -> Result<Option<WriteTicket>, Errno> {
        self.backend.check(offset, len)?;
        match &self.kind {
            ExportKind::Live { tracker: Some(t) } => match t.begin_write(offset, len) {
                Ok(ticket) => Ok(Some(ticket)),
                Err(_) => Err(Errno::Perm),
            },
            _ => Ok(None),
        }
    }

    /// Completes the record of a change before its reply is queued; `zeroed` if the range now
    /// reads as zeroes.
    pub fn end_write(&self, ticket: Option<WriteTicket>, offset: u64, len: u64, zeroed: bool) {
        if let (Some(ticket), ExportKind::Live { tracker: Some(t) }) = (ticket, &self.kind) {
            t.end_write(ticket, offset, len, zeroed);
        }
    }

    /// Fixes up data just read from the image: a generation overlays its pre-images.
    pub fn after_read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.kind {
            ExportKind::Generation { tracker, generation } => {
                tracker.overlay_generation(generation, buf, offset)
            }
            ExportKind::Live { .. } => Ok(()),
        }
    }

    /// Allocation as this export reads: the image's holes, except that a generation's dirty
    /// blocks are data (their content at the cut may be a pre-image, whatever the image holds now).
    pub fn allocation(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<(u64, bool)>> {
        let runs = self.backend.allocation(offset, len, max)?;
        let ExportKind::Generation { generation, .. } = &self.kind else { return Ok(runs) };
        let mut out: Vec<(u64, bool)> = Vec::with_capacity(runs.len());
        let mut push = |l: u64, hole: bool| match out.last_mut() {
            Some(last) if last.1 == hole => last.0 += l,
            _ => out.push((l, hole)),
        };
        let mut pos = offset;
        for (l, hole) in runs {
            if !hole {
                push(l, false);
            } else {
                for (e, st) in generation.map().runs(pos, l, usize::MAX) {
                    push(e.len, st == BlockState::Clean);
                }
            }
            pos += l;
        }
        Ok(out)
    }

    /// The tracked runs this export reports for its dirty-bitmap contexts.
    fn change_runs(&self, offset: u64, len: u64, max: usize) -> Vec<(Extent, BlockState)> {
        match &self.kind {
            ExportKind::Live { tracker: Some(t) } => t.live_runs(offset, len, max),
            ExportKind::Live { tracker: None } => vec![(Extent::new(offset, len), BlockState::Clean)],
            ExportKind::Generation { generation, .. } => generation.map().runs(offset, len, max),
        }
    }
}

/// The exports a server offers right now (the handshake asks for every new connection).
pub trait Catalog: Send + Sync {
    /// Every export; the first is the default (empty name).
    fn exports(&self) -> Vec<Arc<Export>>;
}

/// A fixed list of exports.
pub struct StaticCatalog(pub Vec<Arc<Export>>);

impl Catalog for StaticCatalog {
    fn exports(&self) -> Vec<Arc<Export>> {
        self.0.clone()
    }
}

/// The live export plus one `gen-N` export per unreleased generation of its tracker.
pub struct TrackedCatalog {
    live: Arc<Export>,
    tracker: Arc<Tracker>,
    generations: Mutex<HashMap<u64, Arc<Export>>>,
}

impl TrackedCatalog {
    pub fn new(live: Arc<Export>, tracker: Arc<Tracker>) -> Self {
        Self { live, tracker, generations: Mutex::new(HashMap::new()) }
    }
}

impl Catalog for TrackedCatalog {
    fn exports(&self) -> Vec<Arc<Export>> {
        let ids = self.tracker.generation_ids();
        let mut cache = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|id, _| ids.contains(id));
        let mut out = vec![self.live.clone()];
        for id in ids {
            if let Some(e) = cache.get(&id) {
                out.push(e.clone());
            } else if let Some(g) = self.tracker.generation(id) {
                let e = Arc::new(Export::generation(self.live.backend.clone(), self.tracker.clone(), g));
                cache.insert(id, e.clone());
                out.push(e);
            }
        }
        out
    }
}

/// The per-connection view the engines need: the export and what was negotiated.
#[derive(Clone, Debug)]
pub struct Conn {
    pub export: Arc<Export>,
    pub session: transmission::Session,
    /// Selected metadata contexts: (id, index into `export.info.contexts`).
    pub contexts: Vec<(u32, usize)>,
}

impl Conn {
    pub fn structured(&self) -> bool {
        self.session.structured
    }

    /// Runs a command that needs no data buffer and appends its whole reply to `out`:
    /// FLUSH, TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS.
    pub fn execute_inline(&self, cookie: u64, cmd: Command, out: &mut Vec<u8>) {
        let b = &self.export.backend;
        let res: Result<(), Errno> = match cmd {
            Command::Flush => b.flush().map_err(|e| Errno::from_io(&e)),
            Command::Trim { offset, len, fua } => {
                self.export.begin_write(offset, len.into()).and_then(|ticket| {
                    let r = b.trim(offset, len.into(), fua);
                    self.export.end_write(ticket, offset, len.into(), matches!(r, Ok(true)));
                    r.map(|_| ()).map_err(|e| Errno::from_io(&e))
                })
            }
            Command::WriteZeroes { offset, len, fua, no_hole, fast } => {
                self.export.begin_write(offset, len.into()).and_then(|ticket| {
                    let r = b.write_zeroes(offset, len.into(), no_hole, fast, fua);
                    self.export.end_write(ticket, offset, len.into(), r.is_ok());
                    r
                })
            }
            Command::Cache { offset, len } => b.cache(offset, len.into()).map_err(|e| Errno::from_io(&e)),
            Command::BlockStatus { offset, len, req_one } => {
                match self.block_status(cookie, offset, len, req_one, out) {
                    Ok(()) => return,
                    Err(e) => Err(e),
                }
            }
            Command::Read { .. } | Command::Write { .. } | Command::Disconnect => {
                unreachable!("engines run {cmd:?} themselves")
            }
        };
        match res {
            Ok(()) => transmission::ok_reply(out, cookie, self.structured()),
            Err(e) => transmission::error_reply(out, cookie, self.structured(), e),
        }
    }

    fn block_status(
        &self,
        cookie: u64,
        offset: u64,
        len: u32,
        req_one: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), Errno> {
        // No context describes a range the image lost: the request fails whole.
        self.export.backend.check(offset, len.into())?;
        let max = if req_one { 1 } else { MAX_EXTENTS };
        let mut chunks = Vec::with_capacity(self.contexts.len());
        for &(id, idx) in &self.contexts {
            let extents: Vec<(u32, u32)> = match &self.export.info.contexts[idx] {
                MetaContext::Allocation => self
                    .export
                    .allocation(offset, len.into(), max)
                    .map_err(|e| Errno::from_io(&e))?
                    .into_iter()
                    .map(|(l, hole)| (l as u32, if hole { STATE_HOLE | STATE_ZERO } else { 0 }))
                    .collect(),
                MetaContext::DirtyBitmap(_) => self
                    .export
                    .change_runs(offset, len.into(), max)
                    .into_iter()
                    .map(|(e, st)| (e.len as u32, if st == BlockState::Clean { 0 } else { STATE_DIRTY }))
                    .collect(),
                MetaContext::Changes(_) => self
                    .export
                    .change_runs(offset, len.into(), max)
                    .into_iter()
                    .map(|(e, st)| {
                        let flags = match st {
                            BlockState::Clean => 0,
                            BlockState::Data => STATE_DIRTY,
                            BlockState::Zero => STATE_DIRTY | STATE_CHANGED_ZERO,
                        };
                        (e.len as u32, flags)
                    })
                    .collect(),
            };
            chunks.push((id, extents));
        }
        let n = chunks.len();
        for (i, (id, extents)) in chunks.into_iter().enumerate() {
            transmission::block_status(out, cookie, id, &extents, i + 1 == n);
        }
        Ok(())
    }

    /// The reply to a successful READ of `data` at `offset`, split into OFFSET_DATA and
    /// OFFSET_HOLE chunks when structured replies are on, the client allows fragmenting, and the
    /// range contains holes. Returns `None` when a single data reply fits (the common case).
    pub fn sparse_read_reply(&self, cookie: u64, offset: u64, data: &[u8], df: bool) -> Option<Vec<u8>> {
        // A generation's holes may have been filled since its cut: only the live disk says.
        if !self.structured()
            || df
            || (data.len() as u32) < SPARSE_READ_MIN
            || !matches!(self.export.kind, ExportKind::Live { .. })
        {
            return None;
        }
        let runs = self.export.backend.allocation(offset, data.len() as u64, MAX_EXTENTS).ok()?;
        if runs.iter().all(|(_, hole)| !hole) {
            return None;
        }
        let mut out = Vec::with_capacity(data.len() / 2);
        let mut pos = 0u64;
        let n = runs.len();
        for (i, (len, hole)) in runs.into_iter().enumerate() {
            let last = i + 1 == n;
            // If the run list was capped, the last run takes the rest, as data.
            let (len, hole) = if last {
                (data.len() as u64 - pos, hole && pos + len == data.len() as u64)
            } else {
                (len, hole)
            };
            // A hole is only claimed where the bytes we read agree.
            let bytes = &data[pos as usize..(pos + len) as usize];
            if hole && bytes.iter().all(|&x| x == 0) {
                transmission::read_hole(&mut out, cookie, offset + pos, len as u32, last);
            } else {
                transmission::read_data_header(&mut out, cookie, true, offset + pos, len as u32, last);
                out.extend_from_slice(bytes);
            }
            pos += len;
        }
        Some(out)
    }
}
