//! `siterep serve`: the tracking NBD shim.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use shim::kernel::KernelDevice;
use shim::ublk::{UblkConfig, UblkDevice};
use shim::{Backend, Catalog, EngineKind, Export, Listener, Server, StaticCatalog, TrackedCatalog};
use tracker::{DirMedia, Media, Options, TrackError, Tracker};

use crate::size::parse_size;
use tracker::control;

#[derive(Args, Debug)]
pub struct ServeCmd {
    /// The disk image (regular file) or block device to serve.
    pub image: PathBuf,
    #[command(flatten)]
    pub args: ServeArgs,
}

/// How the shim serves and tracks an image.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Set by `siterep failover`: the image was just materialized from this recovery point, so
    /// the tracker knows it exactly (no resync needed) and tracks from the first write.
    #[arg(skip)]
    pub materialized_from: Option<String>,
    /// Unix socket to listen on (replaced if a stale socket file is there).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also listen on TCP, e.g. 127.0.0.1:10809 (repeatable).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Vec<String>,
    /// Export name; the export also answers to the empty (default) name.
    #[arg(long, default_value = "siterep")]
    export: String,
    /// Refuse writes (EPERM); the image is opened read-only.
    #[arg(long)]
    read_only: bool,
    /// Open the image with O_DIRECT (bypass the page cache).
    #[arg(long)]
    direct: bool,
    /// Do not track changes (benchmark baselines only: nothing is recorded for replication).
    #[arg(long)]
    no_track: bool,
    /// Dirty-tracking granularity in bytes: a power of two from 512 to 1048576 (K/M suffixes).
    #[arg(long, default_value = "4096", value_name = "BYTES", value_parser = parse_size)]
    granularity: u64,
    /// Keep the tracking state here so it survives restarts and crashes (one directory per disk).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Most pre-image bytes kept for unreleased generations (e.g. 1G); beyond it a generation
    /// is marked inconsistent instead of blocking writes.
    #[arg(long, default_value = "1G", value_name = "BYTES", value_parser = parse_size)]
    preserve_limit: u64,
    /// Connect the kernel's NBD driver to the shim: the disk appears as this device
    /// (e.g. /dev/nbd0; needs the nbd module). SIGTERM flushes and detaches it.
    #[arg(long, value_name = "DEVICE")]
    attach: Option<PathBuf>,
    /// Connections between the kernel device and the shim (multi-queue).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    connections: u16,
    /// Serve the disk as a ublk block device, /dev/ublkbN (Linux 6.0+, ublk_drv module), with
    /// user recovery: a restarted shim takes back the device a dead one left. SIGTERM flushes,
    /// stops and deletes it.
    #[arg(long, conflicts_with = "attach")]
    ublk: bool,
    /// ublk hardware queues (default: one per CPU); each locks queue-depth × 256 KiB of buffers.
    #[arg(long, value_name = "N", requires = "ublk", value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: Option<u16>,
    /// Requests in flight per ublk queue.
    #[arg(long, value_name = "D", default_value_t = shim::ublk::DEFAULT_DEPTH,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    queue_depth: u16,
    /// Recover ublk device DEV_ID (/dev/ublkbDEV_ID) instead of creating one. Without it, a
    /// device of this image whose shim died is recovered automatically.
    #[arg(long, value_name = "DEV_ID", requires = "ublk")]
    recover: Option<u32>,
    /// Control socket for `siterep cut|release|status` (default: the NBD socket path + ".ctl").
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// I/O engine: io_uring, plain pread/pwrite, or auto (io_uring when the kernel allows).
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    engine: EngineArg,
    /// Microseconds a connection busy-polls its socket for the client's next request before it
    /// sleeps, while requests keep coming within that time (a client at queue depth 1); at
    /// most half the CPUs poll at once. 0 turns it off.
    #[arg(long, value_name = "MICROS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    poll_us: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineArg {
    Auto,
    Uring,
    Sync,
}

pub fn run(image: PathBuf, args: ServeArgs) -> Result<()> {
    // Signals are taken by a dedicated thread; block them before any other thread exists.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals.thread_block().context("blocking signals")?;
    // A client that goes away must not kill the server: with SIGPIPE blocked, a write to a closed
    // socket fails with EPIPE instead.
    let mut pipe = SigSet::empty();
    pipe.add(Signal::SIGPIPE);
    pipe.thread_block().context("blocking SIGPIPE")?;

    let mut listeners = Vec::new();
    for fd in shim::sys::take_listen_fds().context("socket activation")? {
        listeners.push(Listener::from_activated(fd).context("adopting an activated socket")?);
    }
    // Socket files this run created go away however it ends.
    let mut created = SocketFiles(Vec::new());
    if let Some(path) = &args.socket {
        listeners.push(Listener::unix(path).with_context(|| format!("cannot listen on {}", path.display()))?);
        created.0.push(path.clone());
    }
    for addr in &args.listen {
        listeners.push(Listener::tcp(addr).with_context(|| format!("cannot listen on {addr}"))?);
    }
    if listeners.is_empty() && args.attach.is_none() && !args.ublk {
        bail!("nothing to serve: give --socket PATH, --listen HOST:PORT, --attach DEVICE, --ublk, or use socket activation");
    }
    if args.attach.is_some() || args.ublk {
        // The shim may back a filesystem on this very machine: it must not wait on reclaim that
        // waits on it, nor be paged out.
        if let Err(e) = shim::sys::set_io_flusher() {
            tracing::warn!("PR_SET_IO_FLUSHER failed ({e}); under memory pressure the device may stall");
        }
        nix::sys::mman::mlockall(
            nix::sys::mman::MlockAllFlags::MCL_CURRENT | nix::sys::mman::MlockAllFlags::MCL_FUTURE,
        )
        .context("locking memory (mlockall)")?;
    }
    if args.no_track && args.state_dir.is_some() {
        bail!("--no-track and --state-dir contradict each other");
    }

    let backend = Arc::new(Backend::open(&image, args.read_only, args.direct)?);
    let tracker = if args.no_track {
        tracing::warn!("--no-track: changes are NOT recorded; use this for benchmark baselines only");
        None
    } else {
        Some(open_tracker(&image, &args, backend.clone())?)
    };
    // The image shrinking or being replaced under us is logged by the watch, fails the lost
    // range with EIO, and (through the tracker) requires a resync and shows in `status`.
    if let Some(t) = &tracker {
        let weak = Arc::downgrade(t);
        backend.watch().set_listener(Box::new(move |change| {
            if let Some(t) = weak.upgrade() {
                t.image_changed(change.clone());
            }
        }));
    }
    backend.spawn_watcher(shim::watch::PERIOD).context("starting the image watch")?;
    let control = match (&tracker, &args.socket, &args.control) {
        (None, _, _) => None,
        (Some(_), Some(sock), c) => Some(control::control_path(sock, c.as_deref())),
        (Some(_), None, c) => c.clone(),
    };
    let named = image_info(&image, &backend);
    let control_listener = match &control {
        Some(path) => {
            let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
            let r = control::bind(path);
            nix::sys::stat::umask(old);
            let l = r.with_context(|| format!("cannot create the control socket {}", path.display()))?;
            created.0.push(path.clone());
            Some(l)
        }
        None => None,
    };
    let engine = match args.engine {
        EngineArg::Auto => EngineKind::detect(),
        EngineArg::Uring => EngineKind::Uring,
        EngineArg::Sync => EngineKind::Sync,
    };
    tracing::info!(
        image = %image.display(),
        size = backend.size(),
        engine = ?engine,
        poll_us = args.poll_us,
        direct = args.direct,
        read_only = args.read_only,
        granularity = args.granularity,
        tracking = !args.no_track,
        state_dir = ?args.state_dir,
        control = ?control,
        "serving"
    );
    let live = Arc::new(Export::live(&args.export, backend, args.read_only, tracker.clone()));
    let catalog: Arc<dyn Catalog> = match &tracker {
        Some(t) => Arc::new(TrackedCatalog::new(live.clone(), t.clone())),
        None => Arc::new(StaticCatalog(vec![live.clone()])),
    };
    let mut server = Server::new(catalog, listeners, engine)?;
    server.set_idle_poll(std::time::Duration::from_micros(args.poll_us));
    let shutdown = server.shutdown_handle();
    let device = match &args.attach {
        Some(dev) => Some(
            KernelDevice::attach(dev, live.clone(), args.connections.into(), &server)
                .with_context(|| format!("cannot attach {}", dev.display()))?,
        ),
        None => None,
    };
    let ublk = if args.ublk {
        let config = UblkConfig { queues: args.queues, depth: args.queue_depth, recover: args.recover };
        Some(UblkDevice::start(live, &config, shutdown.clone()).context("cannot start the ublk device")?)
    } else {
        None
    };
    let control_thread = match (control_listener, &tracker) {
        (Some(l), Some(t)) => {
            let (t, s, image) = (t.clone(), shutdown.clone(), named);
            Some(
                std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || serve_control(l, t, image, s))?,
            )
        }
        _ => None,
    };
    let s = shutdown.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Ok(sig) = signals.wait() {
            tracing::info!("{sig:?}: finishing in-flight requests");
        }
        if let Some(dev) = device {
            // The kernel flushes and disconnects first, so its last requests are answered.
            if let Err(e) = dev.detach() {
                tracing::error!("detaching the kernel device: {e}");
            }
        }
        if let Some(dev) = ublk {
            if let Err(e) = dev.stop() {
                tracing::error!("stopping the ublk device: {e}");
            }
        }
        s.trigger();
    })?;
    server.run()?;
    if let Some(t) = control_thread {
        let _ = t.join();
    }
    if let Some(t) = &tracker {
        // Every connection has finished: write the complete state.
        t.close().context("writing the tracking state at shutdown")?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Removes the socket files it names when dropped.
struct SocketFiles(Vec<PathBuf>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Opens the tracker: persistent with `--state-dir` (recovering what it holds), else in memory
/// with pre-images in an anonymous file under $TMPDIR (default /var/tmp).
fn open_tracker(image: &Path, args: &ServeArgs, backend: Arc<Backend>) -> Result<Arc<Tracker>> {
    let opts =
        Options { granularity: args.granularity, preserve_limit: args.preserve_limit, ..Options::default() };
    let backend_size = backend.size();
    let (media, preserve): (Option<Box<dyn Media>>, std::fs::File) = match &args.state_dir {
        Some(dir) => {
            let media = DirMedia::open(dir)
                .with_context(|| format!("cannot use state directory {}", dir.display()))?;
            claim_state_dir(dir, image)?;
            let preserve = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join("preserve.dat"))
                .context("opening the preserve store")?;
            (Some(Box::new(media)), preserve)
        }
        None => {
            let dir =
                std::env::var_os("TMPDIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"));
            let file = anonymous_file(&dir).with_context(|| {
                format!("creating the preserve store in {} (set TMPDIR or use --state-dir)", dir.display())
            })?;
            (None, file)
        }
    };
    let (tracker, recovery) =
        Tracker::open(backend_size, &opts, backend, media, preserve).map_err(|e| match e {
            TrackError::Shrank { was, now } => anyhow::anyhow!(
                "refusing to serve {}: {e}. Restore the image (all {was} bytes, e.g. from a recovery \
                 point) and start again, or, if the disk is meant to be {now} bytes now, start \
                 protection over: move {} aside, give a fresh --state-dir, and let the agent resync \
                 the whole disk",
                image.display(),
                args.state_dir.as_deref().unwrap_or(Path::new("the state directory")).display(),
            ),
            e => e.into(),
        })?;
    if let Some(old) = recovery.grown_from {
        tracing::warn!(
            image = %image.display(),
            old_size = old,
            new_size = backend_size,
            "the disk grew since the last run: its new range is marked dirty, so the next generation ships it"
        );
    }
    if let Some(origin) = &args.materialized_from {
        tracing::info!("tracking every write since {origin}");
        tracker.clear_resync();
    } else if let Some(why) = &recovery.resync_required {
        tracing::warn!("resync required: {why}");
    }
    if recovery.after_crash {
        tracing::warn!(
            hot_regions = recovery.hot_regions,
            generations = recovery.generations,
            "recovered tracking state after an unclean shutdown (hot regions marked dirty whole)"
        );
    }
    Ok(tracker)
}

/// Records which image a state directory tracks, and refuses another image's directory.
fn claim_state_dir(dir: &Path, image: &Path) -> Result<()> {
    let image = std::fs::canonicalize(image)?;
    let marker = dir.join("image");
    match std::fs::read_to_string(&marker) {
        Ok(owner) if Path::new(owner.trim_end()) != image => {
            bail!("state directory {} tracks {}, not {}", dir.display(), owner.trim_end(), image.display())
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&marker, format!("{}\n", image.display()))?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// A file with no name (O_TMPFILE) in `dir`: it disappears with the process.
fn anonymous_file(dir: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).mode(0o600).open(dir)
}

/// What the control socket's `image` request answers: the file or device the backend opened
/// (`None`, logged, if it cannot be named).
fn image_info(image: &Path, backend: &Backend) -> Option<control::ImageInfo> {
    let named = std::fs::canonicalize(image).map_err(|e| e.to_string()).and_then(|path| {
        let fd = backend.fd().ok_or("no file descriptor")?;
        let st = nix::sys::stat::fstat(fd).map_err(|e| e.to_string())?;
        Ok(control::ImageInfo { path, dev: st.st_dev, ino: st.st_ino, size: backend.size() })
    });
    named.map_err(|e| tracing::info!("the control socket will not name the image ({e})")).ok()
}

/// Serves control requests until `shutdown` fires, one thread per connection.
fn serve_control(
    listener: std::os::unix::net::UnixListener,
    tracker: Arc<Tracker>,
    image: Option<control::ImageInfo>,
    shutdown: Arc<shim::Shutdown>,
) {
    let image = Arc::new(image);
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let _ = listener.set_nonblocking(true);
    let me = nix::unistd::geteuid().as_raw();
    while !shutdown.is_set() {
        let mut fds =
            [PollFd::new(listener.as_fd(), PollFlags::POLLIN), PollFd::new(shutdown.fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        while let Ok((stream, _)) = listener.accept() {
            let _ = stream.set_nonblocking(false);
            let uid = match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            {
                Ok(c) => c.uid(),
                Err(e) => {
                    tracing::warn!("control connection without credentials: {e}");
                    continue;
                }
            };
            let (t, image) = (tracker.clone(), image.clone());
            std::thread::spawn(move || {
                if let Err(e) = control::handle(stream, uid, me, &t, image.as_ref().as_ref()) {
                    tracing::warn!("control connection: {e}");
                }
            });
        }
    }
}
