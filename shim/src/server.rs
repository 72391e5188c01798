//! Accepting connections: Unix and TCP listeners (bound here or passed by systemd), the
//! handshake on each connection's own thread, then an engine for the transmission phase.
//! Shutdown (SIGTERM) stops accepting, lets each engine answer what it has received, and
//! returns once every connection thread has finished.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};

use crate::engine::poll::IdlePoll;
use crate::engine::{self, Ending, EngineKind};
use crate::export::{Catalog, Conn, Export};
use nbd_proto::handshake::{Handshake, Outcome};
use nbd_proto::transmission::Session;

/// How long a client may take to send each piece of the handshake, or to take our replies.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for connections to answer what they received before it cuts off
/// the ones that are still busy (typically clients that stopped reading replies).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Open connection sockets (duplicates), so shutdown can cut off clients that stop reading.
#[derive(Default)]
struct OpenSockets {
    next: std::sync::atomic::AtomicU64,
    map: std::sync::Mutex<std::collections::HashMap<u64, OwnedFd>>,
}

/// Removes its socket from the registry when the connection ends.
struct Registered<'a> {
    set: &'a OpenSockets,
    id: u64,
}

impl OpenSockets {
    fn register(&self, sock: &File) -> Registered<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(dup) = sock.as_fd().try_clone_to_owned() {
            lock(&self.map).insert(id, dup);
        }
        Registered { set: self, id }
    }

    /// Shuts down every registered socket: blocked reads and writes fail at once.
    fn cut_all(&self) {
        for fd in lock(&self.map).values() {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                nix::sys::socket::Shutdown::Both,
            );
        }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&self.set.map).remove(&self.id);
    }
}

/// A server-wide shutdown signal: a flag plus an eventfd that wakes every waiting thread.
#[derive(Debug)]
pub struct Shutdown {
    flag: AtomicBool,
    efd: EventFd,
}

impl Shutdown {
    pub fn new() -> io::Result<Self> {
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Self { flag: AtomicBool::new(false), efd })
    }

    /// Starts the shutdown; every thread polling `fd()` wakes up.
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.efd.write(1);
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Readable once the shutdown has started (never reset).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a Unix socket at `path`, replacing a stale socket file.
    pub fn unix(path: &Path) -> io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        Ok(Listener::Unix(UnixListener::bind(path)?))
    }

    pub fn tcp(addr: &str) -> io::Result<Self> {
        Ok(Listener::Tcp(TcpListener::bind(addr)?))
    }

    /// Adopts a socket passed by systemd, by its address family.
    pub fn from_activated(fd: OwnedFd) -> io::Result<Self> {
        let addr: SockaddrStorage = getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
        Ok(match addr.family() {
            Some(AddressFamily::Unix) => Listener::Unix(UnixListener::from(fd)),
            Some(AddressFamily::Inet | AddressFamily::Inet6) => Listener::Tcp(TcpListener::from(fd)),
            other => {
                return Err(io::Error::other(format!("activated socket has unsupported family {other:?}")))
            }
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix(l) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    /// Accepts one connection as a blocking socket, or `None` when none is waiting.
    fn accept(&self) -> io::Result<Option<(OwnedFd, String)>> {
        let r = match self {
            Listener::Unix(l) => l
                .accept()
                .map(|(s, _)| s.set_nonblocking(false).map(|_| (OwnedFd::from(s), "unix".to_string()))),
            Listener::Tcp(l) => l.accept().map(|(s, peer)| {
                s.set_nonblocking(false)
                    .and_then(|_| s.set_nodelay(true))
                    .map(|_| (OwnedFd::from(s), peer.to_string()))
            }),
        };
        match r {
            Ok(r) => r.map(Some),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// The NBD server: its exports, listeners and engine.
pub struct Server {
    catalog: Arc<dyn Catalog>,
    sockets: Arc<OpenSockets>,
    /// Threads of connections that did not come through a listener.
    extra: std::sync::Mutex<Vec<JoinHandle<()>>>,
    listeners: Vec<Listener>,
    engine: Engine,
    shutdown: Arc<Shutdown>,
}

/// How connections are served.
#[derive(Clone, Copy)]
struct Engine {
    kind: EngineKind,
    /// How long a connection polls its socket for the next request before it sleeps.
    idle_poll: Duration,
}

impl Server {
    /// A server offering the exports of `catalog` (the first is the default) on `listeners`.
    pub fn new(catalog: Arc<dyn Catalog>, listeners: Vec<Listener>, engine: EngineKind) -> io::Result<Self> {
        Ok(Self {
            catalog,
            sockets: Default::default(),
            extra: Default::default(),
            listeners,
            engine: Engine { kind: engine, idle_poll: Duration::ZERO },
            shutdown: Arc::new(Shutdown::new()?),
        })
    }

    /// Connections poll their socket for up to `budget` for the client's next request before
    /// they sleep (see [`crate::engine::poll`]); zero, the default, never polls.
    pub fn set_idle_poll(&mut self, budget: Duration) {
        self.engine.idle_poll = budget;
    }

    /// The handle that stops `run`.
    pub fn shutdown_handle(&self) -> Arc<Shutdown> {
        self.shutdown.clone()
    }

    /// Serves a socket that is already in the transmission phase (a kernel NBD device's
    /// connection) on its own thread; `run` waits for it at shutdown.
    pub fn spawn_transmission(&self, sock: OwnedFd, conn: Conn, peer: String) -> io::Result<()> {
        let shutdown = self.shutdown.clone();
        let engine = self.engine;
        let sockets = self.sockets.clone();
        let t = std::thread::Builder::new().name("nbd-kernel".into()).spawn(move || {
            let file = File::from(sock);
            let _registered = sockets.register(&file);
            run_engine(0, &peer, &conn, file, engine, &shutdown);
        })?;
        lock(&self.extra).push(t);
        Ok(())
    }

    /// Accepts and serves connections until shutdown, then waits for every connection.
    pub fn run(&self) -> io::Result<()> {
        for l in &self.listeners {
            l.set_nonblocking()?;
        }
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut next_id = 0u64;
        while !self.shutdown.is_set() {
            let mut fds: Vec<PollFd> =
                self.listeners.iter().map(|l| PollFd::new(l.fd(), PollFlags::POLLIN)).collect();
            fds.push(PollFd::new(self.shutdown.fd(), PollFlags::POLLIN));
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready: Vec<bool> = fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect();
            for (l, ready) in self.listeners.iter().zip(ready) {
                if !ready {
                    continue;
                }
                while let Some((sock, peer)) = match l.accept() {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: log and keep serving the connections we have.
                        tracing::warn!("accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                        None
                    }
                } {
                    next_id += 1;
                    let id = next_id;
                    let catalog = self.catalog.clone();
                    let sockets = self.sockets.clone();
                    let shutdown = self.shutdown.clone();
                    let engine = self.engine;
                    let t = std::thread::Builder::new().name(format!("nbd-conn-{id}")).spawn(move || {
                        serve_connection(id, peer, sock, &*catalog, engine, &shutdown, &sockets)
                    })?;
                    threads.push(t);
                }
            }
            threads.retain(|t| !t.is_finished());
        }
        threads.append(&mut lock(&self.extra));
        tracing::info!("shutting down: waiting for {} connection(s) to finish", threads.len());
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let busy = threads.iter().filter(|t| !t.is_finished()).count();
        if busy > 0 {
            tracing::warn!(
                "cutting off {busy} connection(s) still busy after {SHUTDOWN_GRACE:?} (clients not reading)"
            );
            self.sockets.cut_all();
        }
        for t in threads {
            let _ = t.join();
        }
        Ok(())
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads exactly `buf.len()` bytes, giving up on shutdown or after the handshake timeout.
fn read_handshake(sock: &mut File, buf: &mut [u8], shutdown: &Shutdown) -> io::Result<()> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"));
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds =
            [PollFd::new(sock.as_fd(), PollFlags::POLLIN), PollFd::new(shutdown.fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        if shutdown.is_set() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "server shutting down"));
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            match sock.read(&mut buf[got..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

fn serve_connection(
    id: u64,
    peer: String,
    sock: OwnedFd,
    catalog: &dyn Catalog,
    engine: Engine,
    shutdown: &Shutdown,
    sockets: &OpenSockets,
) {
    let mut file = File::from(sock);
    let _registered = sockets.register(&file);
    // A client that stops taking our handshake replies must not hold this thread forever.
    let timeout = nix::sys::time::TimeVal::new(HANDSHAKE_TIMEOUT.as_secs() as _, 0);
    let _ = nix::sys::socket::setsockopt(&file, nix::sys::socket::sockopt::SendTimeout, &timeout);
    let exports: Vec<Arc<Export>> = catalog.exports();
    let mut hs = Handshake::new(exports.iter().map(|e| e.info.clone()).collect());
    let mut buf = Vec::new();
    let negotiated = loop {
        let out = hs.take_output();
        if let Err(e) = file.write_all(&out) {
            tracing::debug!(id, %peer, "handshake write failed: {e}");
            return;
        }
        buf.resize(hs.wants(), 0);
        if let Err(e) = read_handshake(&mut file, &mut buf, shutdown) {
            tracing::debug!(id, %peer, "handshake ended: {e}");
            return;
        }
        match hs.input(&buf) {
            Outcome::Continue => {}
            Outcome::Transmit(n) => {
                if let Err(e) = file.write_all(&hs.take_output()) {
                    tracing::debug!(id, %peer, "handshake write failed: {e}");
                    return;
                }
                break n;
            }
            Outcome::Close(why) => {
                let _ = file.write_all(&hs.take_output());
                tracing::debug!(id, %peer, "handshake closed: {why:?}");
                return;
            }
        }
    };
    let no_timeout = nix::sys::time::TimeVal::new(0, 0);
    let _ = nix::sys::socket::setsockopt(&file, nix::sys::socket::sockopt::SendTimeout, &no_timeout);
    let export = exports[negotiated.export].clone();
    let session = Session::new(&export.info, negotiated.structured, !negotiated.contexts.is_empty());
    let conn = Conn { export, session, contexts: negotiated.contexts };
    tracing::debug!(id, %peer, export = %conn.export.info.name, structured = session.structured, "connected");
    run_engine(id, &peer, &conn, file, engine, shutdown);
}

fn run_engine(id: u64, peer: &str, conn: &Conn, file: File, engine: Engine, shutdown: &Shutdown) {
    // io_uring needs a descriptor to submit to; virtual images (recovery points) have none.
    let kind = if conn.export.backend.fd().is_none() { EngineKind::Sync } else { engine.kind };
    let poll = IdlePoll::new(engine.idle_poll);
    let result = match kind {
        EngineKind::Uring => engine::uring::serve(conn, &file, shutdown, poll),
        EngineKind::Sync => engine::sync::serve(conn, file, shutdown, poll),
    };
    match result {
        Ok(Ending::ClientDone) => tracing::debug!(id, %peer, "disconnected"),
        Ok(Ending::Shutdown) => tracing::debug!(id, %peer, "closed for shutdown"),
        Err(e) => tracing::info!(id, %peer, "connection dropped: {}", engine::chain(&e)),
    }
}
