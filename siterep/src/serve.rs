//! `siterep serve`: the tracking NBD shim.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use nbd::{Backend, EngineKind, Export, Listener, Server};
use nix::sys::signal::{SigSet, Signal};
use tracker::DirtyMap;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The disk image (regular file) or block device to serve.
    image: PathBuf,
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
    /// Dirty-tracking granularity in bytes: a power of two from 512 to 1048576.
    #[arg(long, default_value_t = 4096, value_name = "BYTES")]
    granularity: u64,
    /// I/O engine: io_uring, plain pread/pwrite, or auto (io_uring when the kernel allows).
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    engine: EngineArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineArg {
    Auto,
    Uring,
    Sync,
}

pub fn run(args: ServeArgs) -> Result<()> {
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
    for fd in nbd::sys::take_listen_fds().context("socket activation")? {
        listeners.push(Listener::from_activated(fd).context("adopting an activated socket")?);
    }
    if let Some(path) = &args.socket {
        listeners.push(Listener::unix(path).with_context(|| format!("cannot listen on {}", path.display()))?);
    }
    for addr in &args.listen {
        listeners.push(Listener::tcp(addr).with_context(|| format!("cannot listen on {addr}"))?);
    }
    if listeners.is_empty() {
        bail!("nothing to listen on: give --socket PATH, --listen HOST:PORT, or start by socket activation");
    }

    let backend = Backend::open(&args.image, args.read_only, args.direct)?;
    let dirty = if args.no_track {
        tracing::warn!("--no-track: changes are NOT recorded; use this for benchmark baselines only");
        None
    } else {
        Some(Arc::new(DirtyMap::new(backend.size(), args.granularity)?))
    };
    let engine = match args.engine {
        EngineArg::Auto => EngineKind::detect(),
        EngineArg::Uring => EngineKind::Uring,
        EngineArg::Sync => EngineKind::Sync,
    };
    tracing::info!(
        image = %args.image.display(),
        size = backend.size(),
        engine = ?engine,
        direct = args.direct,
        read_only = args.read_only,
        granularity = args.granularity,
        tracking = !args.no_track,
        "serving"
    );
    let export = Arc::new(Export::new(&args.export, backend, args.read_only, dirty));
    let server = Server::new(vec![export], listeners, engine)?;
    let shutdown = server.shutdown_handle();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Ok(sig) = signals.wait() {
            tracing::info!("{sig:?}: finishing in-flight requests");
        }
        shutdown.trigger();
    })?;
    server.run()?;
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}
