//! `siterep export`: a recovery point served over NBD at once, with no copy first. Read-only
//! by default; `--writable` adds a copy-on-write overlay (an anonymous file, discarded at exit)
//! so a VM can boot from the point while the point itself never changes (test failover).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use clap::Args;
use server::{ExtentKind, PointReader, PointSel, Store};
use shim::{Backend, EngineKind, Export, Listener, Server, StaticCatalog, VirtualImage};
use tracker::{BlockState, DirtyMap};

use crate::recovery::parse_point;

/// Overlay granularity: a partial write copies the rest of its block from the point first.
const BLOCK: u64 = 4096;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The recovery site's store directory.
    #[arg(long, value_name = "DIR")]
    store: PathBuf,
    #[arg(long)]
    disk: String,
    /// The point: its id or `latest`.
    #[arg(long, value_parser = parse_point)]
    point: PointSel,
    /// Unix socket to serve on.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also serve on TCP, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Vec<String>,
    /// Accept writes into a copy-on-write overlay, discarded when the export stops.
    #[arg(long)]
    writable: bool,
    /// Export name (also the default export).
    #[arg(long, default_value = "siterep")]
    export: String,
}

/// A point, optionally under a copy-on-write overlay.
struct PointImage {
    reader: PointReader,
    overlay: Option<Overlay>,
}

struct Overlay {
    file: File,
    /// Blocks present in the overlay (their whole content is there).
    present: DirtyMap,
    /// Serializes read-modify-write of partial blocks.
    lock: Mutex<()>,
}

impl std::fmt::Debug for PointImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointImage")
            .field("point", &self.reader.info().id)
            .field("writable", &self.overlay.is_some())
            .finish()
    }
}

fn store_err(e: server::StoreError) -> io::Error {
    io::Error::other(e)
}

impl PointImage {
    fn read_point(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reader.read_at(buf, offset).map_err(store_err)
    }
}

impl VirtualImage for PointImage {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(o) = &self.overlay else { return self.read_point(buf, offset) };
        let end = offset + buf.len() as u64;
        for (e, st) in o.present.runs(offset, buf.len() as u64, usize::MAX) {
            let part = &mut buf[(e.offset - offset) as usize..(e.end().min(end) - offset) as usize];
            if st == BlockState::Clean {
                self.read_point(part, e.offset)?;
            } else {
                o.file.read_exact_at(part, e.offset)?;
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let Some(o) = &self.overlay else {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        };
        let _serial = o.lock.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset + buf.len() as u64;
        // Complete the partial first and last blocks from the point before overlaying them.
        let size = self.size();
        for b in [offset / BLOCK, (end - 1) / BLOCK] {
            let bstart = b * BLOCK;
            let bend = (bstart + BLOCK).min(size);
            let partial = offset > bstart || end < bend;
            if partial && !o.present.is_dirty_block(b) {
                let mut block = vec![0u8; (bend - bstart) as usize];
                self.read_point(&mut block, bstart)?;
                o.file.write_all_at(&block, bstart)?;
                o.present.mark(bstart, bend - bstart);
            }
        }
        o.file.write_all_at(buf, offset)?;
        o.present.mark(offset, buf.len() as u64);
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.overlay.is_none() {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let mut pos = offset;
        let end = offset + len;
        let zeros = vec![0u8; 1 << 20];
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64);
            self.write_at(&zeros[..n as usize], pos)?;
            pos += n;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // The overlay is discarded at exit: nothing to make durable.
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<(u64, bool)>> {
        let extents = self.reader.extents(offset, len).map_err(store_err)?;
        let mut out: Vec<(u64, bool)> = Vec::new();
        for (o, l, kind) in extents {
            // Overlaid blocks are data whatever the point holds there.
            let runs: Vec<(u64, bool)> = match &self.overlay {
                Some(ov) if kind == ExtentKind::Zero => ov
                    .present
                    .runs(o, l, usize::MAX)
                    .into_iter()
                    .map(|(e, st)| (e.len, st == BlockState::Clean))
                    .collect(),
                _ => vec![(l, kind == ExtentKind::Zero)],
            };
            for (l, hole) in runs {
                match out.last_mut() {
                    Some(last) if last.1 == hole => last.0 += l,
                    _ => out.push((l, hole)),
                }
            }
        }
        out.truncate(max.max(1));
        Ok(out)
    }
}

pub fn export(args: ExportArgs) -> Result<()> {
    let store =
        Store::open_reader(&args.store).with_context(|| format!("opening store {}", args.store.display()))?;
    let reader = store.open_point(&args.disk, args.point)?;
    let info = reader.info().clone();
    let overlay = if args.writable {
        let dir = std::env::var_os("TMPDIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"));
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(&dir)
            .with_context(|| format!("creating the overlay in {}", dir.display()))?;
        file.set_len(reader.size())?;
        Some(Overlay { file, present: DirtyMap::new(reader.size(), BLOCK)?, lock: Mutex::new(()) })
    } else {
        None
    };
    let image = Arc::new(PointImage { reader, overlay });
    let backend = Arc::new(Backend::virtual_image(image));
    let mut listeners = Vec::new();
    if let Some(path) = &args.socket {
        listeners.push(Listener::unix(path).with_context(|| format!("cannot listen on {}", path.display()))?);
    }
    for addr in &args.listen {
        listeners.push(Listener::tcp(addr).with_context(|| format!("cannot listen on {addr}"))?);
    }
    if listeners.is_empty() {
        bail!("give --socket PATH and/or --listen HOST:PORT");
    }
    let export = Arc::new(Export::live(&args.export, backend, !args.writable, None));
    let server = Server::new(Arc::new(StaticCatalog(vec![export])), listeners, EngineKind::Sync)?;
    let shutdown = server.shutdown_handle();
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.thread_block()?;
    std::thread::spawn(move || {
        let _ = signals.wait();
        shutdown.trigger();
    });
    tracing::info!(
        disk = %args.disk,
        point = info.id,
        generation = info.generation,
        writable = args.writable,
        "serving the recovery point{}",
        if args.writable { " with a discardable overlay" } else { " read-only" }
    );
    server.run()?;
    if let Some(p) = &args.socket {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
