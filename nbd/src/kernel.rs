//! Attaching the kernel's NBD driver (`/dev/nbdN`) to this server, for physical servers:
//! socket pairs whose kernel ends are handed over with `NBD_SET_SOCK`, whose other ends are
//! served like any client connection (already in the transmission phase, simple replies).
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::export::{Conn, Export};
use crate::proto::transmission::Session;
use crate::server::Server;
use crate::sys::{nbd_ioctl, NbdIoctl};

/// A `/dev/nbdN` connected to this server.
pub struct KernelDevice {
    path: PathBuf,
    dev: Arc<File>,
    detaching: Arc<AtomicBool>,
    do_it: Option<JoinHandle<io::Result<()>>>,
}

/// The pid the kernel recorded for a configured device, if any.
fn device_owner(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    std::fs::read_to_string(format!("/sys/block/{name}/pid")).ok()?.trim().parse().ok()
}

/// Transmission flags the kernel honours for our export.
fn kernel_flags(export: &Export) -> u16 {
    use crate::proto::consts::*;
    // The kernel does not negotiate structured replies, DF or block status.
    export.info.transmission_flags(false) & !(FLAG_SEND_DF | FLAG_SEND_FAST_ZERO)
}

impl KernelDevice {
    /// Connects `path` (e.g. `/dev/nbd0`) to `export` through `connections` socket pairs,
    /// served by `server`'s engine. A device left configured by a process that died is
    /// reclaimed; one owned by a live process is refused.
    pub fn attach(path: &Path, export: Arc<Export>, connections: usize, server: &Server) -> io::Result<Self> {
        let dev = OpenOptions::new().read(true).write(true).open(path)?;
        if let Some(pid) = device_owner(path) {
            if Path::new(&format!("/proc/{pid}")).exists() && pid != std::process::id() {
                return Err(io::Error::other(format!("{} is in use by process {pid}", path.display())));
            }
            tracing::warn!(
                "{} was left attached by process {pid}, which is gone: reclaiming it",
                path.display()
            );
            let _ = nbd_ioctl(dev.as_fd(), NbdIoctl::Disconnect);
        }
        // Clears a stale configuration; harmless on an idle device.
        let _ = nbd_ioctl(dev.as_fd(), NbdIoctl::ClearSock);
        let size = export.info.size;
        let block = if size.is_multiple_of(4096) { 4096u32 } else { 512 };
        if !size.is_multiple_of(u64::from(block)) {
            return Err(io::Error::other("the image size must be a multiple of 512 bytes to attach it"));
        }
        let block = block.max(export.info.block_sizes.minimum);
        nbd_ioctl(dev.as_fd(), NbdIoctl::SetBlockSize(block))?;
        nbd_ioctl(dev.as_fd(), NbdIoctl::SetSizeBlocks(size / u64::from(block)))?;
        nbd_ioctl(dev.as_fd(), NbdIoctl::SetTimeout(0))?;
        nbd_ioctl(dev.as_fd(), NbdIoctl::SetFlags(kernel_flags(&export)))?;
        let session = Session::new(&export.info, false, false);
        for _ in 0..connections.max(1) {
            let (ours, kernels) = UnixStream::pair()?;
            nbd_ioctl(dev.as_fd(), NbdIoctl::SetSock(kernels.as_raw_fd()))?;
            // The kernel holds its own reference now.
            drop(kernels);
            let conn = Conn { export: export.clone(), session, contexts: Vec::new() };
            server.spawn_transmission(OwnedFd::from(ours), conn, format!("kernel {}", path.display()))?;
        }
        let dev = Arc::new(dev);
        let detaching = Arc::new(AtomicBool::new(false));
        let (d, det, shutdown) = (dev.clone(), detaching.clone(), server.shutdown_handle());
        let name = path.display().to_string();
        let do_it = std::thread::Builder::new().name("nbd-do-it".into()).spawn(move || {
            // Runs the device until it is disconnected.
            let r = nbd_ioctl(d.as_fd(), NbdIoctl::DoIt);
            let _ = nbd_ioctl(d.as_fd(), NbdIoctl::ClearSock);
            if det.load(Ordering::SeqCst) {
                tracing::info!("{name} disconnected");
            } else {
                tracing::error!("{name} stopped unexpectedly ({r:?}); shutting down");
                shutdown.trigger();
            }
            r
        })?;
        tracing::info!(device = %path.display(), connections, block_size = block, "attached the kernel NBD device");
        Ok(Self { path: path.to_path_buf(), dev, detaching, do_it: Some(do_it) })
    }

    /// Flushes the device's cache through to the image, disconnects it, and waits until the
    /// kernel has let go.
    pub fn detach(mut self) -> io::Result<()> {
        if let Err(e) = self.dev.sync_all() {
            tracing::warn!("flushing {} before detaching: {e}", self.path.display());
        }
        self.detaching.store(true, Ordering::SeqCst);
        nbd_ioctl(self.dev.as_fd(), NbdIoctl::Disconnect)?;
        if let Some(t) = self.do_it.take() {
            match t.join() {
                Ok(Ok(())) => {}
                // DO_IT returns an error when the device was disconnected on purpose.
                Ok(Err(e)) => tracing::debug!("NBD_DO_IT ended: {e}"),
                Err(_) => return Err(io::Error::other("the device thread panicked")),
            }
        }
        Ok(())
    }
}
