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

impl Overlay {
    /// An empty overlay for a disk of `size` bytes, kept in `file` (sized here).
    fn new(file: File, size: u64) -> Result<Overlay> {
        file.set_len(size)?;
        Ok(Overlay { file, present: DirtyMap::new(size, BLOCK)?, lock: Mutex::new(()) })
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
        Some(Overlay::new(file, reader.size())?)
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use server::{Consistency, GenerationKind};

    use super::*;

    const SIZE: u64 = 1 << 20;
    /// Where the point holds data (the rest of it reads as zeroes).
    const DATA: std::ops::Range<u64> = (256 << 10)..(512 << 10);

    /// A store with one point of a 1 MiB disk: 256 KiB of data at 256 KiB, zeroes elsewhere.
    /// Returns the store and the point's whole content.
    fn store_with_point(root: &Path) -> (Store, Vec<u8>) {
        let store = Store::open(root).unwrap();
        store.register_disk("d", SIZE, 4096).unwrap();
        let data: Vec<u8> = (0..DATA.end - DATA.start).map(|i| (i * 7 % 251) as u8 + 1).collect();
        let hash = *blake3::hash(&data).as_bytes();
        store.put_chunk(&hash, data.len() as u32, &zstd::bulk::compress(&data, 1).unwrap()).unwrap();
        let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
        p.add_chunk(DATA.start, data.len() as u32, hash).unwrap();
        p.commit(1, Consistency::Crash).unwrap();
        let mut content = vec![0u8; SIZE as usize];
        content[DATA.start as usize..DATA.end as usize].copy_from_slice(&data);
        (store, content)
    }

    /// The point served writable, as `siterep export --writable` does.
    fn writable(store: &Store) -> PointImage {
        let reader = store.open_point("d", PointSel::Latest).unwrap();
        let overlay = Overlay::new(tempfile::tempfile().unwrap(), reader.size()).unwrap();
        PointImage { reader, overlay: Some(overlay) }
    }

    fn read_all(image: &dyn VirtualImage) -> Vec<u8> {
        let mut buf = vec![0u8; image.size() as usize];
        image.read_at(&mut buf, 0).unwrap();
        buf
    }

    /// Every file under `dir` and its bytes.
    fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files(&p));
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
        out
    }

    /// The point, read afresh from the store, is still `base`, and no file of the store changed.
    /// A store with one point of disk "d", and a copy of every store file before a test.
    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        store: Store,
        base: Vec<u8>,
        before: BTreeMap<PathBuf, Vec<u8>>,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("store");
            let (store, base) = store_with_point(&root);
            let before = files(&root);
            Self { _dir: dir, root, store, base, before }
        }

        fn assert_point_unchanged(&self) {
            let reader = self.store.open_point("d", PointSel::Latest).unwrap();
            let mut buf = vec![0u8; SIZE as usize];
            reader.read_at(&mut buf, 0).unwrap();
            assert!(buf == self.base, "the point's content changed");
            assert!(files(&self.root) == self.before, "a file of the store changed");
        }
    }

    fn write(image: &PointImage, model: &mut [u8], offset: u64, data: &[u8]) {
        image.write_at(data, offset).unwrap();
        model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    fn zero(image: &PointImage, model: &mut [u8], offset: u64, len: u64) {
        image.zero(offset, len).unwrap();
        model[offset as usize..(offset + len) as usize].fill(0);
    }

    #[test]
    fn writes_land_in_the_overlay_and_reads_merge_it_over_the_point() {
        let f = Fixture::new();
        let (store, base) = (&f.store, &f.base);
        let image = writable(store);
        assert!(read_all(&image) == *base, "an untouched overlay reads as the point");

        let mut model = base.clone();
        // Whole blocks: over data, over zeroes, and the last block of the disk.
        write(&image, &mut model, DATA.start + 4096, &[0xa1; 4096]);
        write(&image, &mut model, 0, &[0xa2; 8192]);
        write(&image, &mut model, SIZE - 4096, &[0xa3; 4096]);
        assert!(read_all(&image) == model, "reads merge the overlay over the point");
        // Reads that start and end inside overlaid and point blocks.
        for (offset, len) in [(DATA.start + 4000, 200), (8000, 300), (DATA.start + 4096 + 4095, 2), (100, 50)]
        {
            let mut buf = vec![0u8; len];
            image.read_at(&mut buf, offset).unwrap();
            assert!(buf[..] == model[offset as usize..offset as usize + len], "read {offset}+{len}");
        }
        // A second write over the same blocks replaces the first.
        write(&image, &mut model, 0, &[0xb2; 4096]);
        assert!(read_all(&image) == model);
        image.flush().unwrap();
        f.assert_point_unchanged();
    }

    #[test]
    fn partial_block_writes_keep_the_rest_of_the_block_from_the_point() {
        let f = Fixture::new();
        let (store, base) = (&f.store, &f.base);
        let image = writable(store);
        let mut model = base.clone();
        // Inside one block of data, across two blocks of data, across the data's edge (point
        // zeroes and point data in one write), one byte, and a block written twice in part.
        write(&image, &mut model, DATA.start + 8192 + 50, &[0xc1; 100]);
        write(&image, &mut model, DATA.start + 3 * 4096 - 10, &[0xc2; 20]);
        write(&image, &mut model, DATA.start - 3000, &[0xc3; 6000]);
        write(&image, &mut model, DATA.end - 1, &[0xc4]);
        write(&image, &mut model, DATA.start + 40960 + 10, &[0xc5; 10]);
        write(&image, &mut model, DATA.start + 40960 + 4000, &[0xc6; 10]);
        assert!(read_all(&image) == model, "partial writes merge with the point's bytes");
        f.assert_point_unchanged();
    }

    #[test]
    fn zeroes_land_in_the_overlay() {
        let f = Fixture::new();
        let (store, base) = (&f.store, &f.base);
        let image = writable(store);
        let mut model = base.clone();
        zero(&image, &mut model, DATA.start + 100, 10_000);
        zero(&image, &mut model, DATA.start + 65536, 65536);
        // More than the 1 MiB zero buffer: the whole disk, after writing to it.
        write(&image, &mut model, 4096, &[0xd1; 4096]);
        assert!(read_all(&image) == model);
        zero(&image, &mut model, 0, SIZE);
        assert!(read_all(&image) == vec![0u8; SIZE as usize], "the whole disk zeroed");
        f.assert_point_unchanged();
    }

    #[test]
    fn overlaid_blocks_are_data_in_the_allocation_map() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store_with_point(&dir.path().join("store"));
        let image = writable(&store);
        // (length, hole) runs: zeroes, the point's data, zeroes.
        let point_map = vec![(DATA.start, true), (DATA.end - DATA.start, false), (SIZE - DATA.end, true)];
        assert_eq!(image.allocation(0, SIZE, usize::MAX).unwrap(), point_map);
        write(&image, &mut vec![0u8; SIZE as usize], 8192, &[1; 10]);
        assert_eq!(
            image.allocation(0, SIZE, usize::MAX).unwrap(),
            vec![
                (8192, true),
                (4096, false),
                (DATA.start - 12288, true),
                (DATA.end - DATA.start, false),
                (SIZE - DATA.end, true)
            ]
        );
    }

    #[test]
    fn random_writes_and_zeroes_match_a_model() {
        let f = Fixture::new();
        let (store, base) = (&f.store, &f.base);
        let image = writable(store);
        let mut model = base.clone();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        // Few enough that much of the point is still showing through at the end.
        for i in 0..60u64 {
            let len = 1 + next(20_000);
            let offset = next(SIZE - len + 1);
            if i % 5 == 4 {
                zero(&image, &mut model, offset, len);
            } else {
                write(&image, &mut model, offset, &vec![(i % 250) as u8 + 1; len as usize]);
            }
        }
        assert!(read_all(&image) == model, "the overlay disagrees with the model");
        f.assert_point_unchanged();
    }

    #[test]
    fn without_an_overlay_the_point_is_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, base) = store_with_point(&dir.path().join("store"));
        let image = PointImage { reader: store.open_point("d", PointSel::Latest).unwrap(), overlay: None };
        assert_eq!(image.write_at(&[1; 4096], 0).unwrap_err().raw_os_error(), Some(libc::EROFS));
        assert_eq!(image.zero(0, 4096).unwrap_err().raw_os_error(), Some(libc::EROFS));
        assert!(read_all(&image) == base);
    }
}
