//! An export: the image, what the handshake advertises of it, and its dirty map; plus the
//! commands every engine runs the same way (TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS).
#![forbid(unsafe_code)]

use std::sync::Arc;

use tracker::{BlockState, DirtyMap};

use crate::backend::Backend;
use crate::proto::consts::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use crate::proto::transmission::{self, Command};
use crate::proto::{BlockSizes, Errno, ExportInfo, MetaContext, MAX_EXTENTS, MAX_PAYLOAD};

/// One served image.
#[derive(Debug)]
pub struct Export {
    pub info: ExportInfo,
    pub backend: Backend,
    /// The live dirty set, shared by every connection; `None` with `--no-track`.
    pub dirty: Option<Arc<DirtyMap>>,
}

/// Reads at least this long are checked for holes and may be answered with OFFSET_HOLE chunks.
pub const SPARSE_READ_MIN: u32 = 64 << 10;

/// The per-connection view the engines need: the export and what was negotiated.
#[derive(Clone, Debug)]
pub struct Conn {
    pub export: Arc<Export>,
    pub session: transmission::Session,
    /// Selected metadata contexts: (id, index into `export.info.contexts`).
    pub contexts: Vec<(u32, usize)>,
}

impl Export {
    /// Describes `backend` as export `name`; `dirty` is the live map (None: not tracked).
    pub fn new(name: &str, backend: Backend, read_only: bool, dirty: Option<Arc<DirtyMap>>) -> Self {
        let min = backend.min_block();
        let info = ExportInfo {
            name: name.to_string(),
            description: format!("siterep tracked disk ({} bytes)", backend.size()),
            size: backend.size(),
            read_only,
            rotational: false,
            block_sizes: BlockSizes { minimum: min, preferred: 4096u32.max(min), maximum: MAX_PAYLOAD },
            contexts: vec![MetaContext::Allocation, MetaContext::DirtyBitmap("live".into())],
        };
        Self { info, backend, dirty }
    }

    /// Records a change before it is acknowledged (invariant 1).
    pub fn mark(&self, offset: u64, len: u64) {
        if let Some(d) = &self.dirty {
            d.mark(offset, len);
        }
    }

    /// Records that a range now reads as zeroes (after a successful TRIM or WRITE_ZEROES that
    /// was marked as a change before it ran), so it can be shipped as metadata.
    pub fn mark_zero(&self, offset: u64, len: u64) {
        if let Some(d) = &self.dirty {
            d.mark_zero(offset, len);
        }
    }
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
                self.export.mark(offset, len.into());
                match b.trim(offset, len.into(), fua) {
                    Ok(zeroed) => {
                        if zeroed {
                            self.export.mark_zero(offset, len.into());
                        }
                        Ok(())
                    }
                    Err(e) => Err(Errno::from_io(&e)),
                }
            }
            Command::WriteZeroes { offset, len, fua, no_hole, fast } => {
                self.export.mark(offset, len.into());
                let r = b.write_zeroes(offset, len.into(), no_hole, fast, fua);
                if r.is_ok() {
                    self.export.mark_zero(offset, len.into());
                }
                r
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
        let max = if req_one { 1 } else { MAX_EXTENTS };
        let mut chunks = Vec::with_capacity(self.contexts.len());
        for &(id, idx) in &self.contexts {
            let extents: Vec<(u32, u32)> = match &self.export.info.contexts[idx] {
                MetaContext::Allocation => self
                    .export
                    .backend
                    .allocation(offset, len.into(), max)
                    .map_err(|e| Errno::from_io(&e))?
                    .into_iter()
                    .map(|(l, hole)| (l as u32, if hole { STATE_HOLE | STATE_ZERO } else { 0 }))
                    .collect(),
                MetaContext::DirtyBitmap(_) => match &self.export.dirty {
                    Some(d) => d
                        .runs(offset, len.into(), max)
                        .into_iter()
                        .map(|(e, st)| (e.len as u32, if st == BlockState::Clean { 0 } else { STATE_DIRTY }))
                        .collect(),
                    None => vec![(len, 0)],
                },
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
        if !self.structured() || df || (data.len() as u32) < SPARSE_READ_MIN {
            return None;
        }
        let runs = self.export.backend.allocation(offset, data.len() as u64, MAX_EXTENTS).ok()?;
        if runs.iter().all(|(_, hole)| !hole) {
            return None;
        }
        let covered: u64 = runs.iter().map(|r| r.0).sum();
        let mut out = Vec::with_capacity(data.len() / 2);
        let mut pos = 0u64;
        let n = runs.len();
        for (i, (len, hole)) in runs.into_iter().enumerate() {
            // If the run list was capped, the last run takes the rest as data.
            let len = if i + 1 == n { data.len() as u64 - pos } else { len };
            let last = i + 1 == n;
            if hole && (covered == data.len() as u64 || !last) {
                transmission::read_hole(&mut out, cookie, offset + pos, len as u32, last);
            } else {
                transmission::read_data_header(&mut out, cookie, true, offset + pos, len as u32, last);
                out.extend_from_slice(&data[pos as usize..(pos + len) as usize]);
            }
            pos += len;
        }
        Some(out)
    }
}
