//! The process server's network side: agents connect over mutual TLS, speak `wire` frames,
//! and their generations become recovery points in the [`Store`]. One thread per connection;
//! many agents and disks at once.
//!
//! Per connection: Hello → Welcome (version negotiation) → RegisterDisk → DiskState, then per
//! generation BeginGeneration, HaveQuery/HaveReply, Chunk, Zero, Progress/ProgressAck, Commit →
//! Committed. Every chunk is verified (decompressed, blake3) before it is stored; a bad one
//! rejects the whole generation. A commit is acknowledged only once the point is durable.
//!
//! For a resync the agent asks `HashQuery` → `Hashes` (`docs/wire.md` §6.8): the blake3 of each
//! block of a point, computed here from the [`PointReader`] (zero ranges without reading
//! anything), so only blocks that differ cross the network.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use wire::{ChunkData, Decoder, ErrorClass, Frame, Hash, InitialSync, PointRef};

use crate::{Consistency, GenerationKind, PointSel};
use crate::{PendingPoint, PointInfo, PointReader, Store, StoreError};

/// How long an authenticated connection may stay silent before the server drops it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// The read buffer of a connection before it is authenticated: the largest `Hello` (1039
/// bytes plus its length) fits, and a peer that has not authenticated costs no more.
const HELLO_BUF: usize = 4 << 10;
/// The read buffer of an authenticated connection.
const SESSION_BUF: usize = 256 << 10;
/// At most one warning of each kind about unauthenticated connections per this interval
/// (the others are counted and the count is logged with the next one).
const WARN_EVERY: Duration = Duration::from_secs(10);
/// After its last frame (an `Error`), how long the server keeps reading what the agent had
/// already sent, and how much of it: closing a socket with unread data makes the kernel answer
/// with a reset, which can destroy the `Error` before the agent reads it.
const DRAIN_TIME: Duration = Duration::from_secs(2);
const DRAIN_BYTES: usize = 64 << 20;

/// Which disks each agent certificate may write.
///
/// An agent is known by the blake3 fingerprint of its certificate (DER). `agents: None`:
/// every agent with a certificate the CA signed may write every disk.
#[derive(Clone, Debug, Default)]
pub struct Enrollment {
    pub agents: Option<HashMap<String, EnrolledAgent>>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct EnrolledAgent {
    pub name: String,
    pub fingerprint: String,
    /// Disk names, or `*` for any.
    pub disks: Vec<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct EnrollmentFile {
    version: u32,
    agents: Vec<EnrolledAgent>,
}

impl Enrollment {
    /// Reads an enrollment file (`siterep certs init` writes one).
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let f: EnrollmentFile = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not an enrollment file: {e}", path.display()))?;
        if f.version != 1 {
            return Err(format!("{}: unsupported enrollment version {}", path.display(), f.version));
        }
        Ok(Self { agents: Some(f.agents.into_iter().map(|a| (a.fingerprint.clone(), a)).collect()) })
    }

    /// Writes an enrollment file.
    pub fn save(agents: &[EnrolledAgent], path: &std::path::Path) -> io::Result<()> {
        let f = EnrollmentFile { version: 1, agents: agents.to_vec() };
        std::fs::write(path, serde_json::to_vec_pretty(&f).map_err(io::Error::other)?)
    }

    /// The fingerprint of a certificate (DER).
    pub fn fingerprint(der: &[u8]) -> String {
        blake3::hash(der).to_hex().to_string()
    }

    fn allows(&self, fingerprint: Option<&str>, disk: &str) -> Result<(), String> {
        let Some(agents) = &self.agents else { return Ok(()) };
        let Some(fp) = fingerprint else { return Err("no client certificate".into()) };
        match agents.get(fp) {
            None => Err("this agent's certificate is not enrolled".into()),
            Some(a) if a.disks.iter().any(|d| d == "*" || d == disk) => Ok(()),
            Some(a) => Err(format!("agent {} is not enrolled for disk {disk}", a.name)),
        }
    }
}

/// Counters for `--metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    /// Connections in their handshake now (TLS and `Hello` not yet complete).
    pub handshakes: AtomicU64,
    /// Connections closed at once because `max_handshakes` were already in their handshake.
    pub handshakes_refused_total: AtomicU64,
    /// Handshakes that failed or did not complete within `handshake_timeout`.
    pub handshakes_failed_total: AtomicU64,
    pub points_total: AtomicU64,
    pub chunks_stored_total: AtomicU64,
    pub bytes_received_total: AtomicU64,
    pub rejected_total: AtomicU64,
}

/// How agents reach the server and what they may do.
pub struct Access {
    /// `None`: plaintext (`--insecure`, loopback only).
    pub tls: Option<Arc<ServerConfig>>,
    pub enrollment: Enrollment,
    pub metrics: Arc<Metrics>,
    /// Which disks are in a session now (one session per disk).
    pub sessions: Sessions,
}

/// The disks in a session now, and who holds each: a disk allows one agent session at a time
/// (`docs/wire.md` §6.2).
#[derive(Debug, Default)]
pub struct Sessions(std::sync::Mutex<HashMap<String, String>>);

/// A disk held by a session, released when dropped.
struct DiskClaim<'a> {
    sessions: &'a Sessions,
    disk: String,
}

impl Drop for DiskClaim<'_> {
    fn drop(&mut self) {
        self.sessions.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.disk);
    }
}

/// How long a session waits for another session of the same disk to end before it answers
/// `ERR_BUSY`: an agent that reconnects at once may find its previous session still closing.
const CLAIM_WAIT: Duration = Duration::from_secs(3);

impl Sessions {
    /// Claims `disk` for `holder`, waiting up to [`CLAIM_WAIT`] for a session that holds it to
    /// end; `Err` names the holder.
    fn claim(&self, disk: &str, holder: &str) -> Result<DiskClaim<'_>, String> {
        let deadline = std::time::Instant::now() + CLAIM_WAIT;
        loop {
            {
                let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
                match held.get(disk) {
                    None => {
                        held.insert(disk.to_string(), holder.to_string());
                        return Ok(DiskClaim { sessions: self, disk: disk.to_string() });
                    }
                    Some(other) if std::time::Instant::now() >= deadline => return Err(other.clone()),
                    Some(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What a connection may cost before it is authenticated (its TLS handshake and its `Hello`
/// complete).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections in their handshake at once; a connection beyond them is closed at once.
    pub max_handshakes: usize,
    /// How long the TLS handshake and the `Hello` frame may take together.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_handshakes: 64, handshake_timeout: Duration::from_secs(10) }
    }
}

/// A warning logged at most once per [`WARN_EVERY`]; the ones held back are counted.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttled {
    /// `Some(number held back since the last one)` when a warning may be logged now.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) < WARN_EVERY) {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// The server's gate for unauthenticated connections, shared by the accept loop and the
/// connection threads.
struct Admission {
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Connections in their handshake now.
    pending: AtomicUsize,
    refused: Mutex<Throttled>,
    failed: Mutex<Throttled>,
}

impl Admission {
    /// A handshake slot for a new connection, or `None` when every slot is taken. Only the
    /// accept loop calls this, so the count cannot pass the limit.
    fn admit(self: &Arc<Self>, peer: std::net::SocketAddr) -> Option<Handshake> {
        if self.pending.load(Ordering::SeqCst) >= self.limits.max_handshakes {
            self.metrics.handshakes_refused_total.fetch_add(1, Ordering::Relaxed);
            if let Some(held_back) = self.refused.lock().unwrap_or_else(|e| e.into_inner()).ready() {
                tracing::warn!(
                    %peer,
                    held_back,
                    "{} connections are already in their handshake (--max-handshakes): closing this \
                     one at once",
                    self.limits.max_handshakes
                );
            }
            return None;
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.metrics.handshakes.fetch_add(1, Ordering::Relaxed);
        Some(Handshake {
            deadline: Instant::now() + self.limits.handshake_timeout,
            timeout: self.limits.handshake_timeout,
            slot: Some(self.clone()),
            authenticated: false,
        })
    }

    /// Logs a handshake that failed (rate-limited: a flood of them must not flood the log).
    fn failed(&self, peer: std::net::SocketAddr, e: &io::Error) {
        self.metrics.handshakes_failed_total.fetch_add(1, Ordering::Relaxed);
        if let Some(held_back) = self.failed.lock().unwrap_or_else(|e| e.into_inner()).ready() {
            tracing::warn!(%peer, held_back, "handshake failed: {e}");
        }
    }
}

/// A connection's handshake: its deadline, and its slot among the `max_handshakes`, held
/// until [`Handshake::done`] (or the connection's end).
struct Handshake {
    deadline: Instant,
    timeout: Duration,
    slot: Option<Arc<Admission>>,
    authenticated: bool,
}

impl Handshake {
    /// A handshake outside any [`Admission`] (tests).
    #[cfg(test)]
    fn unlimited() -> Self {
        let timeout = Duration::from_secs(3600);
        Self { deadline: Instant::now() + timeout, timeout, slot: None, authenticated: false }
    }

    /// The time left, or a `TimedOut` error once the deadline has passed.
    fn left(&self, waiting_for: &str) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.expired(waiting_for));
        }
        Ok(left)
    }

    fn expired(&self, waiting_for: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no {waiting_for} within the handshake timeout of {:?} (--handshake-timeout)",
                self.timeout
            ),
        )
    }

    /// Whether the connection completed its handshake.
    fn is_done(&self) -> bool {
        self.authenticated
    }

    /// The peer is authenticated: its slot is free for another connection.
    fn done(&mut self) {
        self.release();
        self.authenticated = true;
    }

    fn release(&mut self) {
        if let Some(a) = self.slot.take() {
            a.pending.fetch_sub(1, Ordering::SeqCst);
            a.metrics.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.release();
    }
}

/// Serves agents on `listener` until `stop` is set (checked every 200 ms).
///
/// One thread per connection. Before a connection is authenticated it holds one of
/// `limits.max_handshakes` slots (a connection beyond them is closed at once), reads with a
/// [`HELLO_BUF`] buffer, and must complete its TLS handshake and send `Hello` within
/// `limits.handshake_timeout`; only then does [`IDLE_TIMEOUT`] apply.
pub fn serve(
    listener: TcpListener,
    access: Arc<Access>,
    store: Arc<Store>,
    name: String,
    limits: Limits,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let admission = Arc::new(Admission {
        limits,
        metrics: access.metrics.clone(),
        pending: AtomicUsize::new(0),
        refused: Mutex::default(),
        failed: Mutex::default(),
    });
    let mut threads = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((tcp, peer)) => {
                // Closing at once (dropping the socket) costs the server nothing more.
                let Some(mut gate) = admission.admit(peer) else { continue };
                let (access, store, name, admission) =
                    (access.clone(), store.clone(), name.clone(), admission.clone());
                let spawned = std::thread::Builder::new().name("siterep-conn".into()).spawn(move || {
                    access.metrics.connections.fetch_add(1, Ordering::Relaxed);
                    let r = connection(tcp, peer, &access, &store, &name, &mut gate);
                    access.metrics.connections.fetch_sub(1, Ordering::Relaxed);
                    match r {
                        Err(e) if !gate.is_done() => admission.failed(peer, &e),
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            tracing::debug!(%peer, "agent disconnected")
                        }
                        Err(e) => tracing::info!(%peer, "agent connection ended: {e}"),
                        Ok(()) => {}
                    }
                });
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => tracing::warn!(%peer, "cannot start a thread for a connection: {e}"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        threads.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
    }
    Ok(())
}

/// TCP keepalive: an agent that vanished without closing (a cut link, a crashed host) is
/// noticed within about half a minute, not at the idle timeout, so its session releases its
/// disk (one session per disk) and the agent's next session is not refused as busy for long.
const KEEPALIVE_IDLE_S: u32 = 15;
const KEEPALIVE_INTERVAL_S: u32 = 5;
const KEEPALIVE_PROBES: u32 = 3;

fn keepalive(tcp: &TcpStream) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(tcp, sockopt::KeepAlive, &true)?;
    setsockopt(tcp, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_S)?;
    setsockopt(tcp, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_S)?;
    setsockopt(tcp, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)?;
    Ok(())
}

/// A stream the server can half-close after its last frame.
trait Stream: Read + Write {
    /// Tells the agent that no more frames follow (TLS close_notify, then TCP FIN).
    fn close_write(&mut self);
    fn set_read_timeout(&mut self, t: Duration);
    /// Sets the read and the write timeout.
    fn set_timeouts(&mut self, t: Duration);
    /// Whether a read would return without waiting (data, the end, or an error), waiting up
    /// to `ms` milliseconds for it.
    fn readable(&mut self, ms: u8) -> bool;
}

fn fd_readable(fd: std::os::fd::BorrowedFd<'_>, ms: u8) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(ms)).map_or(true, |n| n > 0)
}

impl Stream for TcpStream {
    fn close_write(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
    fn set_read_timeout(&mut self, t: Duration) {
        let _ = TcpStream::set_read_timeout(self, Some(t));
    }
    fn set_timeouts(&mut self, t: Duration) {
        let _ = TcpStream::set_read_timeout(self, Some(t));
        let _ = TcpStream::set_write_timeout(self, Some(t));
    }
    fn readable(&mut self, ms: u8) -> bool {
        fd_readable(std::os::fd::AsFd::as_fd(self), ms)
    }
}

#[cfg(test)]
impl Stream for std::os::unix::net::UnixStream {
    fn close_write(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
    fn set_read_timeout(&mut self, t: Duration) {
        let _ = std::os::unix::net::UnixStream::set_read_timeout(self, Some(t));
    }
    fn set_timeouts(&mut self, t: Duration) {
        let _ = std::os::unix::net::UnixStream::set_read_timeout(self, Some(t));
        let _ = std::os::unix::net::UnixStream::set_write_timeout(self, Some(t));
    }
    fn readable(&mut self, ms: u8) -> bool {
        fd_readable(std::os::fd::AsFd::as_fd(self), ms)
    }
}

impl Stream for StreamOwned<ServerConnection, TcpStream> {
    fn close_write(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush();
        self.sock.close_write();
    }
    fn set_read_timeout(&mut self, t: Duration) {
        let _ = self.sock.set_read_timeout(Some(t));
    }
    fn set_timeouts(&mut self, t: Duration) {
        self.sock.set_timeouts(t);
    }
    fn readable(&mut self, ms: u8) -> bool {
        // Plaintext rustls already holds, or more records on the socket.
        self.conn.process_new_packets().map_or(true, |io| io.plaintext_bytes_to_read() > 0)
            || fd_readable(std::os::fd::AsFd::as_fd(&self.sock), ms)
    }
}

enum Recv {
    Frame(Frame),
    End,
    Idle,
}

struct Conn<S: Stream> {
    stream: S,
    dec: Decoder,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl<S: Stream> Conn<S> {
    /// A connection whose peer is not authenticated yet: nothing larger than [`HELLO_BUF`] is
    /// allocated for it until [`session`] has its `Hello`.
    fn unauthenticated(stream: S) -> Self {
        Conn { stream, dec: Decoder::new(), buf: vec![0u8; HELLO_BUF], out: Vec::new() }
    }

    /// Answers bytes that do not decode with their `Error` and ends the session (§2).
    fn refuse_bytes(&mut self, e: wire::WireError) -> io::Error {
        let _ = self.send(&e.error_frame());
        self.finish();
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    /// The next frame, or with `idle` [`Recv::Idle`] when none is buffered and the agent has
    /// sent nothing more yet (reading would wait).
    fn next(&mut self, idle: bool) -> io::Result<Recv> {
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) => return Ok(Recv::Frame(f)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("refusing: {e}");
                    return Err(self.refuse_bytes(e));
                }
            }
            if idle && !self.stream.readable(0) {
                return Ok(Recv::Idle);
            }
            let n = self.stream.read(&mut self.buf)?;
            if n == 0 {
                return Ok(Recv::End);
            }
            self.dec.feed(&self.buf[..n]);
        }
    }

    /// The first frame (it should be `Hello`), within the handshake's deadline; `None` if the
    /// peer closes first. Reads at most `buf.len()` bytes at a time, and the decoder refuses a
    /// frame longer than the largest `Hello` as soon as its type is in, so what is buffered
    /// stays bounded.
    fn hello(&mut self, gate: &Handshake) -> io::Result<Option<Frame>> {
        let mut first = true;
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) => return Ok(Some(f)),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!("refusing: {e}");
                    return Err(self.refuse_bytes(e));
                }
            }
            self.stream.set_timeouts(gate.left("Hello")?);
            let n = match self.stream.read(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(gate.expired("Hello"))
                }
                Err(e) => return Err(e),
            };
            if first && tls_record(&self.buf[..n]) {
                // A TLS agent at a plaintext server: it reads this frame as a plaintext answer.
                let message = "this server speaks plaintext (it runs with --insecure), not TLS".to_string();
                let _ = self.send(&Frame::Error {
                    class: ErrorClass::Fatal,
                    code: wire::ERR_BAD_REQUEST,
                    message,
                });
                self.finish();
                let e = "the agent speaks TLS, but this server runs with --insecure (plaintext)";
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            first = false;
            self.dec.feed(&self.buf[..n]);
        }
    }

    fn send(&mut self, f: &Frame) -> io::Result<()> {
        self.out.clear();
        f.encode(&mut self.out);
        self.stream.write_all(&self.out)?;
        self.stream.flush()
    }

    /// Sends the session's last frame, an `Error`, and ends the session.
    fn error(&mut self, class: ErrorClass, code: u16, message: String) -> io::Result<()> {
        tracing::warn!(code, "refusing: {message}");
        let sent = self.send(&Frame::Error { class, code, message });
        self.finish();
        sent
    }

    /// Half-closes, then reads and drops what the agent had in flight (bounded by
    /// [`DRAIN_TIME`] and [`DRAIN_BYTES`]), so the agent reads our last frame before the close.
    fn finish(&mut self) {
        self.stream.close_write();
        self.stream.set_read_timeout(Duration::from_millis(200));
        let deadline = std::time::Instant::now() + DRAIN_TIME;
        let mut drained = 0;
        while drained < DRAIN_BYTES && std::time::Instant::now() < deadline {
            match self.stream.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => drained += n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

/// The wire code and class for a store failure.
fn classify(e: &StoreError) -> (ErrorClass, u16) {
    match e {
        StoreError::CorruptChunk { .. } => (ErrorClass::Retryable, wire::ERR_CORRUPT_CHUNK),
        StoreError::DiskMismatch { .. } | StoreError::BaseNotLatest { .. } => {
            (ErrorClass::Fatal, wire::ERR_DISK_MISMATCH)
        }
        StoreError::UnknownDisk(_) => (ErrorClass::Fatal, wire::ERR_NO_SUCH_DISK),
        StoreError::OtherSource { .. } => (ErrorClass::Fatal, wire::ERR_OTHER_SOURCE),
        // The base point names a damaged object: a resync sends its data again (§6.8).
        StoreError::DamagedBase { .. } => (ErrorClass::Retryable, wire::ERR_RESYNC_REQUIRED),
        // One source sends its generations in order, on its latest point, and releases each
        // only once committed: a generation that has another point's content, or that is not
        // above the latest point's without a point of its own, came from another source under
        // the same identity.
        StoreError::Diverged { .. } | StoreError::StaleGeneration { .. } | StoreError::InvalidBase { .. } => {
            (ErrorClass::Fatal, wire::ERR_DIVERGED)
        }
        StoreError::InvalidName { .. } | StoreError::InvalidGeometry { .. } => {
            (ErrorClass::Fatal, wire::ERR_BAD_REQUEST)
        }
        StoreError::MissingChunk(_) => (ErrorClass::Retryable, wire::ERR_BAD_REQUEST),
        e if e.caller_fault() => (ErrorClass::Fatal, wire::ERR_BAD_REQUEST),
        _ => (ErrorClass::Retryable, wire::ERR_STORAGE),
    }
}

/// Why a request failed: the store refused it, or the agent broke the session's rules.
enum Fail {
    Store(StoreError),
    Protocol(String),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

fn point_ref(p: &PointInfo) -> PointRef {
    PointRef { point: p.id, generation: p.generation, cut_unix_ms: p.cut_unix_ms }
}

/// What the connection is receiving for.
enum Receiving {
    Nothing,
    /// A generation being assembled.
    Pending(Box<PendingPoint>),
    /// A generation that already has a point: its frames are read and dropped, its commit
    /// answered with that point (re-sending is idempotent).
    Done(PointInfo),
}

/// Who is at the other end of a connection, as its certificate says.
#[derive(Debug, Default)]
struct Peer {
    addr: Option<std::net::SocketAddr>,
    /// blake3 of its certificate (DER), as the enrollment names it; `None` without TLS.
    fingerprint: Option<String>,
    /// The certificate's subject common name.
    cn: Option<String>,
    /// The certificate's DNS subject alternative names.
    san: Vec<String>,
    /// The agent's name in the enrollment, when the certificate is enrolled.
    enrolled: Option<String>,
}

impl Peer {
    fn of(addr: std::net::SocketAddr, cert: Option<&CertificateDer<'_>>, enrollment: &Enrollment) -> Self {
        let mut p = Peer { addr: Some(addr), ..Peer::default() };
        let Some(cert) = cert else { return p };
        let fp = Enrollment::fingerprint(cert);
        // rustls verified this certificate with the same parser: it parses.
        if let Ok(c) = webpki::EndEntityCert::try_from(cert) {
            p.cn = common_name(c.subject());
            p.san = c.valid_dns_names().map(str::to_string).collect();
        }
        p.enrolled = enrollment.agents.as_ref().and_then(|a| a.get(&fp)).map(|a| a.name.clone());
        p.fingerprint = Some(fp);
        p
    }
}

/// The first DER element of `der`: its tag, its contents, and what follows it.
fn der_next(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |a, &b| a << 8 | usize::from(b)), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The common name (OID 2.5.4.3) in a certificate subject (the contents of its `Name`).
fn common_name(subject: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut rdns = subject;
    while let Some((0x31, mut set, rest)) = der_next(rdns) {
        rdns = rest;
        while let Some((0x30, attribute, more)) = der_next(set) {
            set = more;
            if let Some((0x06, CN, value)) = der_next(attribute) {
                let (_, text, _) = der_next(value)?;
                return Some(String::from_utf8_lossy(text).into_owned());
            }
        }
    }
    None
}

/// Whether `b` starts like a TLS record (handshake, alert, change-cipher-spec or data, version
/// 3.x). A frame never does: its length (below `MAX_FRAME`) starts with a zero byte.
fn tls_record(b: &[u8]) -> bool {
    matches!(b, [0x14..=0x17, 0x03, ..])
}

fn connection(
    tcp: TcpStream,
    addr: std::net::SocketAddr,
    access: &Access,
    store: &Store,
    name: &str,
    gate: &mut Handshake,
) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    keepalive(&tcp)?;
    match &access.tls {
        Some(tls) => {
            let stream = tls_handshake(tcp, tls, gate)?;
            let peer =
                Peer::of(addr, stream.conn.peer_certificates().and_then(|c| c.first()), &access.enrollment);
            session(Conn::unauthenticated(stream), access, peer, store, name, gate)
        }
        None => {
            let peer = Peer { addr: Some(addr), ..Peer::default() };
            session(Conn::unauthenticated(tcp), access, peer, store, name, gate)
        }
    }
}

/// The server's side of the TLS handshake, within the handshake's deadline.
fn tls_handshake(
    tcp: TcpStream,
    tls: &Arc<ServerConfig>,
    gate: &Handshake,
) -> io::Result<StreamOwned<ServerConnection, TcpStream>> {
    let conn = ServerConnection::new(tls.clone()).map_err(io::Error::other)?;
    let mut stream = StreamOwned::new(conn, tcp);
    // Whether the agent's first bytes were not a TLS record (an agent run with --insecure):
    // rustls answers them with an alert, which that agent reports.
    let mut plaintext = None;
    while stream.conn.is_handshaking() {
        stream.sock.set_timeouts(gate.left("TLS handshake")?);
        if plaintext.is_none() {
            let mut head = [0u8; 2];
            match stream.sock.peek(&mut head) {
                Ok(2) => plaintext = Some(!tls_record(&head)),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(gate.expired("TLS handshake"))
                }
                Err(e) => return Err(e),
            }
        }
        match stream.conn.complete_io(&mut stream.sock) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(gate.expired("TLS handshake"))
            }
            Err(_) if plaintext == Some(true) => {
                let e = "the agent sent plaintext, not TLS (is it running with --insecure?)";
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(stream)
}

fn session<S: Stream>(
    mut c: Conn<S>,
    access: &Access,
    peer: Peer,
    store: &Store,
    name: &str,
    gate: &mut Handshake,
) -> io::Result<()> {
    let Some(Frame::Hello { min_version, max_version, agent }) = c.hello(gate)? else {
        return c.error(ErrorClass::Fatal, wire::ERR_BAD_REQUEST, "expected Hello".into());
    };
    let Some(version) = wire::negotiate(min_version, max_version, wire::MIN_VERSION, wire::VERSION) else {
        let msg = format!(
            "agent speaks versions {min_version}..={max_version}, this server {}..={}",
            wire::MIN_VERSION,
            wire::VERSION
        );
        return c.error(ErrorClass::Fatal, wire::ERR_VERSION, msg);
    };
    gate.done();
    c.stream.set_timeouts(IDLE_TIMEOUT);
    c.buf = vec![0u8; SESSION_BUF];
    c.send(&Frame::Welcome { version, server: name.to_string() })?;
    let addr = peer.addr.map(|a| a.to_string()).unwrap_or_default();
    match &peer.fingerprint {
        Some(fp) => tracing::info!(
            peer = %addr,
            cert_cn = ?peer.cn.as_deref().unwrap_or(""),
            cert_san = ?peer.san,
            fingerprint = %fp,
            enrolled_as = ?peer.enrolled.as_deref().unwrap_or("(not enrolled)"),
            claims = ?agent,
            version,
            "agent connected"
        ),
        None => {
            tracing::info!(peer = %addr, claims = ?agent, version, "agent connected without TLS (not authenticated)")
        }
    }
    // Who holds a disk's session, as the busy refusal names it: the certificate's identity.
    let holder = match (&peer.fingerprint, &peer.enrolled, &peer.cn) {
        (Some(fp), Some(name), _) => {
            format!("enrolled agent {name} at {addr}, certificate {}", &fp[..fp.len().min(16)])
        }
        (Some(fp), None, cn) => format!(
            "certificate {} (CN {:?}) at {addr}",
            &fp[..fp.len().min(16)],
            cn.as_deref().unwrap_or("")
        ),
        (None, _, _) => format!("unauthenticated agent at {addr}"),
    };
    std::thread::scope(|scope| frames(&mut c, scope, access, peer.fingerprint, &holder, store))
}

/// The session after `Welcome`: frames until the agent closes or either side fails.
fn frames<'scope, 'env, S: Stream>(
    c: &mut Conn<S>,
    scope: &'scope std::thread::Scope<'scope, 'env>,
    access: &'env Access,
    fingerprint: Option<String>,
    holder: &str,
    store: &'env Store,
) -> io::Result<()> {
    let metrics = &access.metrics;
    let mut disk: Option<String> = None;
    let mut _claim: Option<DiskClaim<'_>> = None;
    let mut receiving = Receiving::Nothing;
    let mut hashes = PointHashes::default();
    let mut ingest = Ingest::new(scope, store);
    loop {
        let frame = match c.next(!ingest.queue.is_empty())? {
            Recv::Frame(f) => f,
            Recv::End => break,
            Recv::Idle => {
                // Nothing more from the agent yet: until it sends more, extents go in as their
                // uploads finish, so a refusal is never held back while the agent waits.
                match &mut receiving {
                    Receiving::Pending(p) => {
                        while !ingest.queue.is_empty() && !c.stream.readable(IDLE_POLL_MS) {
                            if let Err(e) = ingest.settle(p, usize::MAX) {
                                return refuse(c, metrics, Fail::from(e));
                            }
                        }
                    }
                    _ => ingest.queue.clear(),
                }
                continue;
            }
        };
        // Generations and hash queries name their disk: it must be the one registered here.
        if let Frame::BeginGeneration { disk: d, .. } | Frame::HashQuery { disk: d, .. } = &frame {
            if disk.as_deref() != Some(d.as_str()) {
                return c.error(
                    ErrorClass::Fatal,
                    wire::ERR_BAD_REQUEST,
                    format!("disk {d} was not registered"),
                );
            }
        }
        // Everything else is answered once every extent before it is in the pending point.
        if let Receiving::Pending(p) = &mut receiving {
            if !matches!(frame, Frame::Chunk { .. } | Frame::Zero { .. }) {
                if let Err(e) = ingest.settle(p, 0) {
                    return refuse(c, metrics, Fail::from(e));
                }
            }
        }
        let result: Result<Option<Frame>, Fail> = match frame {
            Frame::RegisterDisk { disk: d, .. }
                if access.enrollment.allows(fingerprint.as_deref(), &d).is_err() =>
            {
                let why = access.enrollment.allows(fingerprint.as_deref(), &d).unwrap_err();
                metrics.rejected_total.fetch_add(1, Ordering::Relaxed);
                return c.error(ErrorClass::Fatal, wire::ERR_AUTH, why);
            }
            Frame::RegisterDisk { disk: d, size, block_size, source, reenroll } => {
                let registered = store
                    .register_disk(&d, size, block_size)
                    .and_then(|_| store.bind_source(&d, &source, reenroll));
                if let Err(e @ StoreError::OtherSource { .. }) = &registered {
                    tracing::error!(disk = %d, peer = %holder, "refused a second source: {e}");
                }
                match registered {
                    Err(e) => Err(Fail::from(e)),
                    Ok(()) => {
                        receiving = Receiving::Nothing;
                        _claim = None;
                        match access.sessions.claim(&d, holder) {
                            Err(other) => {
                                metrics.rejected_total.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(disk = %d, peer = %holder, holder = %other, "disk busy: refused a second session");
                                let msg = format!(
                                    "disk {d} is in another session (from {other}): one agent session per disk; \
                                     retrying later"
                                );
                                return c.error(ErrorClass::Retryable, wire::ERR_BUSY, msg);
                            }
                            Ok(cl) => _claim = Some(cl),
                        }
                        disk = Some(d.clone());
                        disk_state(store, &d).map(Some).map_err(Fail::from)
                    }
                }
            }
            Frame::Current { point, as_of_unix_ms } => match &disk {
                Some(d) => store
                    .record_current(d, point, as_of_unix_ms)
                    .map(|()| Some(Frame::CurrentAck { point, as_of_unix_ms }))
                    .map_err(Fail::from),
                None => Err(Fail::Protocol("Current before RegisterDisk".into())),
            },
            Frame::BeginGeneration { disk: d, generation, kind, base_point } => {
                match begin(store, &d, generation, kind, base_point) {
                    Ok(r) => {
                        receiving = r;
                        Ok(None)
                    }
                    Err(Refusal::Store(e)) => Err(Fail::from(e)),
                    Err(Refusal::Resync(why)) => {
                        return c.error(ErrorClass::Retryable, wire::ERR_RESYNC_REQUIRED, why);
                    }
                }
            }
            Frame::HaveQuery { hashes } => {
                Ok(Some(Frame::HaveReply { have: hashes.iter().map(|h| store.has_chunk(h)).collect() }))
            }
            Frame::HashQuery { disk: d, point, offset, len, block } => {
                hashes.answer(store, &d, point, offset, len, block).map(Some).map_err(Fail::from)
            }
            Frame::Chunk { offset, len, hash, data } => match &mut receiving {
                Receiving::Pending(p) => {
                    let upload = match data {
                        ChunkData::Compressed(bytes) => {
                            metrics.bytes_received_total.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                            metrics.chunks_stored_total.fetch_add(1, Ordering::Relaxed);
                            Some(bytes)
                        }
                        ChunkData::Known => None,
                    };
                    ingest.chunk(p, offset, len, hash, upload).map(|()| None).map_err(Fail::from)
                }
                Receiving::Done(_) => Ok(None),
                Receiving::Nothing => Err(Fail::Protocol("Chunk outside a generation".into())),
            },
            Frame::Zero { offset, len } => match &mut receiving {
                Receiving::Pending(p) => {
                    ingest.push(p, Extent::Zero { offset, len }).map(|()| None).map_err(Fail::from)
                }
                Receiving::Done(_) => Ok(None),
                Receiving::Nothing => Err(Fail::Protocol("Zero outside a generation".into())),
            },
            Frame::Progress { next_offset } => match &mut receiving {
                Receiving::Pending(p) => p
                    .checkpoint(next_offset)
                    .map(|()| Some(Frame::ProgressAck { next_offset }))
                    .map_err(Fail::from),
                Receiving::Done(_) => Ok(Some(Frame::ProgressAck { next_offset })),
                Receiving::Nothing => Err(Fail::Protocol("Progress outside a generation".into())),
            },
            Frame::Commit { generation, cut_unix_ms, consistency, digest } => {
                match std::mem::replace(&mut receiving, Receiving::Nothing) {
                    Receiving::Pending(p) => {
                        let c = match consistency {
                            wire::Consistency::Crash => Consistency::Crash,
                            wire::Consistency::App => Consistency::App,
                            wire::Consistency::Inconsistent => Consistency::Inconsistent,
                        };
                        p.commit_with_digest(cut_unix_ms, c, digest).map_err(Fail::from).map(|info| {
                            tracing::info!(disk = ?disk, point = info.id, generation, "recovery point committed");
                            metrics.points_total.fetch_add(1, Ordering::Relaxed);
                            Some(Frame::Committed { point: info.id, generation })
                        })
                    }
                    Receiving::Done(info) => match info.check_digest(digest.as_ref()) {
                        Ok(()) => Ok(Some(Frame::Committed { point: info.id, generation: info.generation })),
                        Err(e) => Err(Fail::from(e)),
                    },
                    Receiving::Nothing => Err(Fail::Protocol("Commit outside a generation".into())),
                }
            }
            Frame::Error { class, code, message } => {
                match class {
                    ErrorClass::Fatal => {
                        tracing::error!(peer = %holder, disk = ?disk, code, "the agent ended the session: {message}")
                    }
                    ErrorClass::Retryable => {
                        tracing::warn!(peer = %holder, disk = ?disk, code, "the agent ended the session: {message}")
                    }
                }
                return Ok(());
            }
            other => {
                let msg = format!("unexpected frame {other:?}");
                c.error(ErrorClass::Fatal, wire::ERR_BAD_REQUEST, msg.chars().take(200).collect())?;
                return Ok(());
            }
        };
        match result {
            Ok(Some(reply)) => c.send(&reply)?,
            Ok(None) => {}
            Err(fail) => return refuse(c, metrics, fail),
        }
    }
    Ok(())
}

/// Rejects the generation whole (nothing of it becomes a point) and ends the session; the
/// agent reconnects and sends the generation again.
fn refuse<S: Stream>(c: &mut Conn<S>, metrics: &Metrics, fail: Fail) -> io::Result<()> {
    metrics.rejected_total.fetch_add(1, Ordering::Relaxed);
    let (class, code, msg) = match fail {
        Fail::Store(e) => {
            let (class, code) = classify(&e);
            (class, code, e.to_string())
        }
        Fail::Protocol(m) => (ErrorClass::Fatal, wire::ERR_BAD_REQUEST, m),
    };
    match class {
        ErrorClass::Fatal => tracing::error!(code, "refused the session: {msg}"),
        ErrorClass::Retryable => tracing::warn!(code, "refused the generation: {msg}"),
    }
    c.error(class, code, msg)
}

/// Chunks verified (decompressed, blake3) and staged at once, beyond which the connection
/// waits for the oldest before reading on.
const INGEST_WINDOW: usize = 8;
/// Chunks shorter than this (uncompressed) are verified and staged by the connection itself.
const INLINE_BELOW: u32 = 128 << 10;
/// How often uploads that finished are looked at while the agent sends nothing.
const IDLE_POLL_MS: u8 = 1;

/// An extent of the generation being received, in the order it came.
enum Extent {
    Chunk {
        offset: u64,
        len: u32,
        hash: Hash,
        staged: Option<crossbeam_channel::Receiver<Result<(), StoreError>>>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

struct Upload {
    hash: Hash,
    len: u32,
    bytes: Vec<u8>,
    done: crossbeam_channel::Sender<Result<(), StoreError>>,
}

/// Verifies and stages uploaded chunks on worker threads (two per CPU, started by the first
/// upload) while the connection reads on, and adds every extent to the pending point in the
/// order the agent sent them (a later extent over the same bytes wins).
struct Ingest<'scope, 'env> {
    scope: &'scope std::thread::Scope<'scope, 'env>,
    store: &'env Store,
    uploads: Option<crossbeam_channel::Sender<Upload>>,
    queue: std::collections::VecDeque<Extent>,
}

impl<'scope, 'env> Ingest<'scope, 'env> {
    fn new(scope: &'scope std::thread::Scope<'scope, 'env>, store: &'env Store) -> Self {
        Self { scope, store, uploads: None, queue: Default::default() }
    }

    fn chunk(
        &mut self,
        p: &mut PendingPoint,
        offset: u64,
        len: u32,
        hash: Hash,
        upload: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let staged = match upload {
            None => None,
            // A small chunk costs less to verify here than to hand to another thread (a wakeup
            // across CPUs): the wire's order is kept all the same, and a refusal is at once.
            Some(bytes) if len < INLINE_BELOW => {
                self.store.put_chunk(&hash, len, &bytes)?;
                None
            }
            Some(bytes) => {
                let (done, staged) = crossbeam_channel::bounded(1);
                // Workers stop only with the session, or by panicking.
                self.workers().send(Upload { hash, len, bytes, done }).map_err(|_| StoreError::Poisoned)?;
                Some(staged)
            }
        };
        self.push(p, Extent::Chunk { offset, len, hash, staged })
    }

    fn workers(&mut self) -> &crossbeam_channel::Sender<Upload> {
        let (scope, store) = (self.scope, self.store);
        self.uploads.get_or_insert_with(|| {
            let (tx, rx) = crossbeam_channel::bounded::<Upload>(INGEST_WINDOW);
            // Two per CPU: a worker also waits, creating and writing its chunk's file (one
            // per CPU measured 0.7 of the replayed ingest rate of two, BENCHMARKS.md).
            let n = (2 * std::thread::available_parallelism().map_or(2, |n| n.get())).min(INGEST_WINDOW);
            for _ in 0..n {
                let rx = rx.clone();
                scope.spawn(move || {
                    for u in rx {
                        let _ = u.done.send(store.put_chunk(&u.hash, u.len, &u.bytes));
                    }
                });
            }
            tx
        })
    }

    /// Queues an extent, then adds what is ready to the pending point, waiting for the oldest
    /// upload while more than `INGEST_WINDOW` extents wait.
    fn push(&mut self, p: &mut PendingPoint, e: Extent) -> Result<(), StoreError> {
        self.queue.push_back(e);
        self.settle(p, INGEST_WINDOW)
    }

    /// Adds queued extents to the pending point in order: every ready one, and more (waiting
    /// for their uploads) until at most `keep` are left queued. The first failure rejects the
    /// generation.
    fn settle(&mut self, p: &mut PendingPoint, keep: usize) -> Result<(), StoreError> {
        while let Some(front) = self.queue.front() {
            if let Extent::Chunk { staged: Some(rx), .. } = front {
                let result = if self.queue.len() > keep {
                    rx.recv().unwrap_or(Err(StoreError::Poisoned))
                } else {
                    match rx.try_recv() {
                        Ok(r) => r,
                        Err(crossbeam_channel::TryRecvError::Empty) => return Ok(()),
                        Err(crossbeam_channel::TryRecvError::Disconnected) => Err(StoreError::Poisoned),
                    }
                };
                result?;
            }
            match self.queue.pop_front().expect("a front") {
                Extent::Chunk { offset, len, hash, .. } => p.add_chunk(offset, len, hash)?,
                Extent::Zero { offset, len } => p.add_zero(offset, len)?,
            }
        }
        Ok(())
    }
}

/// What the server holds of a registered disk (`docs/wire.md` §4.4).
fn disk_state(store: &Store, disk: &str) -> Result<Frame, StoreError> {
    let info = store.disk(disk)?;
    Ok(Frame::DiskState {
        disk: disk.to_string(),
        latest: info.latest.as_ref().map(point_ref),
        initial: info.initial.map(|i| InitialSync { generation: i.generation, next_offset: i.next_offset }),
        resync: store.resync_required(disk)?,
    })
}

/// Why `begin` refused a generation.
enum Refusal {
    Store(StoreError),
    /// An incremental while the disk needs a resync (`ERR_RESYNC_REQUIRED`).
    Resync(String),
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::Store(e)
    }
}

fn begin(
    store: &Store,
    disk: &str,
    generation: u64,
    kind: wire::GenerationKind,
    base: Option<u64>,
) -> Result<Receiving, Refusal> {
    if let Some(p) = store.point_for_generation(disk, generation)? {
        return Ok(Receiving::Done(p));
    }
    if kind == wire::GenerationKind::Incremental {
        if let Some(why) = store.resync_required(disk)? {
            return Err(Refusal::Resync(why));
        }
    }
    let kind = match kind {
        wire::GenerationKind::Incremental => GenerationKind::Incremental,
        wire::GenerationKind::InitialFull => GenerationKind::InitialFull,
        wire::GenerationKind::Resync => GenerationKind::Resync,
    };
    // An incremental applies on top of the latest point only: on any other base the changes
    // committed since would silently vanish (docs/wire.md §6.3).
    if kind == GenerationKind::Incremental {
        let latest = store.disk(disk)?.latest.map(|p| p.id);
        if base.is_none() || base != latest {
            return Err(StoreError::BaseNotLatest { disk: disk.to_string(), base, latest }.into());
        }
    }
    if kind == GenerationKind::InitialFull {
        match store.resume_initial(disk) {
            Ok(Some(p)) if p.generation() == generation => return Ok(Receiving::Pending(Box::new(p))),
            Ok(_) => {}
            // The checkpoint of a copy abandoned before the latest point: this generation
            // replaces it with its first checkpoint.
            Err(StoreError::StaleGeneration { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Receiving::Pending(Box::new(store.begin(disk, generation, kind, base)?)))
}

/// Bytes of a point read and hashed at once (with blocks up to this size).
const HASH_READ: u64 = 4 << 20;
/// The hash answered for a block whose stored data cannot be read back (a corrupt or missing
/// chunk): it matches no data, so the agent sends the block again and the new point repairs it.
pub const UNREADABLE_HASH: Hash = [0xff; 32];

/// The blake3 of `len` zero bytes, per length (a zero range is hashed without reading).
#[derive(Default)]
struct ZeroHashes(Vec<(u64, Hash)>);

impl ZeroHashes {
    fn get(&mut self, len: u64) -> Hash {
        if let Some((_, h)) = self.0.iter().find(|(l, _)| *l == len) {
            return *h;
        }
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut hasher = blake3::Hasher::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64);
            hasher.update(&ZEROS[..n as usize]);
            left -= n;
        }
        let h = *hasher.finalize().as_bytes();
        // A query has at most two lengths (its block, and a short last one): a few suffice.
        if self.0.len() >= 8 {
            self.0.remove(0);
        }
        self.0.push((len, h));
        h
    }
}

/// Answers a session's `HashQuery` frames (§4.15): the point compared stays open, and so kept
/// by retention, until the session asks about another one or ends.
#[derive(Default)]
struct PointHashes {
    reader: Option<PointReader>,
    zero: ZeroHashes,
}

impl PointHashes {
    fn answer(
        &mut self,
        store: &Store,
        disk: &str,
        point: u64,
        offset: u64,
        len: u64,
        block: u32,
    ) -> Result<Frame, StoreError> {
        if self.reader.as_ref().map_or(true, |r| r.info().id != point) {
            self.reader = None;
            self.reader = Some(store.open_point(disk, PointSel::Id(point))?);
        }
        let reader = self.reader.as_ref().expect("opened above");
        let hashes = point_hashes(reader, offset, len, block, &mut self.zero)?;
        Ok(Frame::Hashes { offset, block, hashes })
    }
}

/// The blake3 of every `block`-sized piece of the point in `[offset, offset + len)`, the last
/// one cut at the end of the range (§4.15), by [`PointReader::block_hashes`]: pieces in zero
/// ranges from the cached zero hash, the rest hashed from their chunks in spans of up to
/// [`HASH_READ`] bytes, a large range by [`HASH_THREADS`] threads. A piece whose chunk is
/// missing or unreadable in the store answers [`UNREADABLE_HASH`].
fn point_hashes(
    reader: &PointReader,
    offset: u64,
    len: u64,
    block: u32,
    zero: &mut ZeroHashes,
) -> Result<Vec<Hash>, StoreError> {
    let block = u64::from(block);
    let n = wire::hash_count(len, block as u32) as usize;
    // The only lengths a piece has: the block, and maybe a short last one.
    let last = len - (n as u64 - 1) * block;
    let r = Pieces { reader, offset, end: offset + len, block, zero: (zero.get(block), zero.get(last)) };
    let threads = HASH_THREADS.min((len / HASH_READ) as usize).max(1);
    if threads == 1 {
        return r.hash(0, n);
    }
    let parts: Vec<Result<Vec<Hash>, StoreError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (from, to) = (n * t / threads, n * (t + 1) / threads);
                let r = &r;
                scope.spawn(move || r.hash(from, to))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("hashing thread panicked")).collect()
    });
    let mut out = Vec::with_capacity(n);
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

/// Threads one large `HashQuery` is hashed with.
const HASH_THREADS: usize = 2;

/// The pieces of one `HashQuery` range and what hashing them needs.
struct Pieces<'a> {
    reader: &'a PointReader,
    offset: u64,
    end: u64,
    block: u64,
    /// The zero hash of a whole block and of the last piece.
    zero: (Hash, Hash),
}

impl Pieces<'_> {
    fn piece(&self, i: usize) -> (u64, u64) {
        let s = self.offset + i as u64 * self.block;
        (s, (s + self.block).min(self.end))
    }

    /// The hashes of pieces `from..to` of `[s, e)`.
    fn hashes(&self, s: u64, e: u64) -> Result<Vec<Hash>, StoreError> {
        let (block, zero) = (self.block, self.zero);
        self.reader.block_hashes(s, e - s, block, |l| if l == block { zero.0 } else { zero.1 })
    }

    /// The hashes of pieces `from..to`.
    fn hash(&self, from: usize, to: usize) -> Result<Vec<Hash>, StoreError> {
        let span = (HASH_READ / self.block).max(1) as usize;
        let mut out = Vec::with_capacity(to - from);
        let mut i = from;
        while i < to {
            let j = (i + span).min(to);
            let (s, e) = (self.piece(i).0, self.piece(j - 1).1);
            match self.hashes(s, e) {
                Ok(h) => out.extend(h),
                Err(StoreError::CorruptChunk { stored: true, .. }) => {
                    // Find the pieces that cannot be read; the others still count.
                    for k in i..j {
                        let (ps, pe) = self.piece(k);
                        match self.hashes(ps, pe) {
                            Ok(h) => out.extend(h),
                            Err(e @ StoreError::CorruptChunk { stored: true, .. }) => {
                                let info = self.reader.info();
                                tracing::warn!(
                                    disk = %info.disk, point = info.id, offset = ps,
                                    "cannot read the point back ({e}): the agent will send this block again"
                                );
                                out.push(UNREADABLE_HASH);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) => return Err(e),
            }
            i = j;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::StoreOptions;

    const DISK: &str = "d0";
    /// Not a multiple of any hash block: the last piece of a query to the end is short.
    const SIZE: u64 = (1 << 20) + 5 * 512;

    /// Deterministic bytes (xorshift64*).
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    fn put(store: &Store, data: &[u8]) -> Hash {
        let hash = *blake3::hash(data).as_bytes();
        store.put_chunk(&hash, data.len() as u32, &zstd::bulk::compress(data, 1).unwrap()).unwrap();
        hash
    }

    /// A store (64 KiB map regions) holding one point of `DISK`: data extents, a zeroed one
    /// and never-written gaps. Returns the point's image too.
    fn store_with_point() -> (tempfile::TempDir, Store, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open_with(&dir.path().join("store"), &StoreOptions { region_size: 64 << 10 }).unwrap();
        store.register_disk(DISK, SIZE, 512).unwrap();
        let mut image = vec![0u8; SIZE as usize];
        let mut p = store.begin(DISK, 1, GenerationKind::InitialFull, None).unwrap();
        for (i, &(off, len)) in [
            (0u64, 8192u64),
            (12288, 512),
            (60 << 10, 10 << 10), // across a map region's end
            (200 << 10, 300 << 10),
            (SIZE - 1536, 1536), // the disk's last bytes
        ]
        .iter()
        .enumerate()
        {
            let data = bytes(i as u64 + 1, len as usize);
            p.add_chunk(off, len as u32, put(&store, &data)).unwrap();
            image[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        p.add_zero(300 << 10, 8192).unwrap();
        image[300 << 10..(300 << 10) + 8192].fill(0);
        p.commit(1, Consistency::Crash).unwrap();
        (dir, store, image)
    }

    fn expected(image: &[u8], offset: u64, len: u64, block: u32) -> Vec<Hash> {
        image[offset as usize..(offset + len) as usize]
            .chunks(block as usize)
            .map(|p| *blake3::hash(p).as_bytes())
            .collect()
    }

    #[test]
    fn hashes_equal_blake3_of_what_the_point_reads() {
        let (_dir, store, image) = store_with_point();
        let reader = store.open_point(DISK, PointSel::Id(1)).unwrap();
        let mut zero = ZeroHashes::default();
        for block in [4096u32, 8192, 64 << 10, 1 << 20, 64 << 20] {
            let b = u64::from(block);
            let mut ranges = vec![(0, SIZE), (0, 1), (SIZE / b * b, SIZE % b), (0, (3 * b + 100).min(SIZE))];
            if b < SIZE {
                ranges.extend([(b, SIZE - b), (b, b.min(SIZE - b))]);
            }
            for (offset, len) in ranges {
                if len == 0 {
                    continue;
                }
                let got = point_hashes(&reader, offset, len, block, &mut zero).unwrap();
                // The reference: blake3 of PointReader::read_at, piece by piece.
                let mut buf = vec![0u8; len as usize];
                reader.read_at(&mut buf, offset).unwrap();
                let from_read: Vec<Hash> =
                    buf.chunks(block as usize).map(|p| *blake3::hash(p).as_bytes()).collect();
                assert_eq!(got, from_read, "block {block}, range {offset}+{len}");
                assert_eq!(got, expected(&image, offset, len, block), "block {block}, range {offset}+{len}");
                assert_eq!(got.len() as u64, wire::hash_count(len, block));
            }
        }
        // Zero ranges hash as zeroes of their length, without data.
        let z = point_hashes(&reader, 512 << 10, 64 << 10, 4096, &mut zero).unwrap();
        assert!(z.iter().all(|h| h == blake3::hash(&[0; 4096]).as_bytes()));
        // Outside the disk: refused.
        assert!(matches!(
            point_hashes(&reader, SIZE - 4096, 8192, 4096, &mut zero),
            Err(StoreError::OutOfRange { .. })
        ));
    }

    #[test]
    fn a_large_range_is_hashed_by_several_threads_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let size = 24u64 << 20;
        store.register_disk(DISK, size, 4096).unwrap();
        let mut image = vec![0u8; size as usize];
        let mut p = store.begin(DISK, 1, GenerationKind::InitialFull, None).unwrap();
        for (i, off) in (0..size).step_by(3 << 20).enumerate() {
            let data = bytes(i as u64 + 10, 1 << 20);
            p.add_chunk(off, 1 << 20, put(&store, &data)).unwrap();
            image[off as usize..off as usize + (1 << 20)].copy_from_slice(&data);
        }
        p.commit(1, Consistency::Crash).unwrap();
        let reader = store.open_point(DISK, PointSel::Id(1)).unwrap();
        for (offset, len, block) in
            [(0, size, 64 << 10), (4 << 20, size - (4 << 20) - 4096, 4096), (0, size, 1 << 20)]
        {
            assert!(len >= HASH_THREADS as u64 * HASH_READ);
            let got = point_hashes(&reader, offset, len, block, &mut ZeroHashes::default()).unwrap();
            assert_eq!(
                got,
                expected(&image, offset, len, block),
                "range {offset}+{len} in blocks of {block}"
            );
        }
    }

    /// The file of a stored chunk, wherever the store keeps it.
    fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()? {
            let p = e.ok()?.path();
            if p.is_dir() {
                if let Some(f) = find_file(&p, name) {
                    return Some(f);
                }
            } else if p.file_name().is_some_and(|n| n == name) {
                return Some(p);
            }
        }
        None
    }

    #[test]
    fn an_unreadable_chunk_answers_a_hash_that_matches_nothing() {
        let (_dir, store, image) = store_with_point();
        // Corrupt the chunk at 200 KiB (300 KiB long). Bytes that changed are hashed as they
        // are: the pieces holding them answer a hash that is not theirs. A missing chunk: all
        // its pieces answer UNREADABLE_HASH. Every other piece answers its real hash.
        let hash = *blake3::hash(&bytes(4, 300 << 10)).as_bytes();
        let name: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let path = find_file(store.root(), &name).expect("the chunk's file");
        let mut data = std::fs::read(&path).unwrap();
        let n = data.len();
        data[n - 10] ^= 0xff;
        std::fs::write(&path, data).unwrap();
        let want = expected(&image, 0, SIZE, 64 << 10);
        for missing in [false, true] {
            if missing {
                // The damaged chunk was quarantined (moved away) by the first round's read.
                assert!(!path.exists());
            }
            let reader = store.open_point(DISK, PointSel::Id(1)).unwrap();
            let got = point_hashes(&reader, 0, SIZE, 64 << 10, &mut ZeroHashes::default()).unwrap();
            assert_eq!(got.len(), want.len());
            let mut differ = 0;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let (s, e) = ((i as u64) << 16, ((i as u64 + 1) << 16).min(SIZE));
                let in_chunk = s < 500 << 10 && e > 200 << 10 && !(s >= 300 << 10 && e <= (300 << 10) + 8192);
                if in_chunk && missing {
                    assert_eq!(*g, UNREADABLE_HASH, "piece {i}");
                } else if !in_chunk {
                    assert_eq!(g, w, "piece {i}");
                }
                differ += usize::from(g != w);
            }
            assert!(differ > 0, "the corrupt chunk went unnoticed (missing: {missing})");
        }
    }

    /// A client's end of a session run on a thread.
    struct Client {
        stream: UnixStream,
        dec: Decoder,
        thread: Option<std::thread::JoinHandle<io::Result<()>>>,
    }

    impl Client {
        fn start(store: &Arc<Store>) -> Client {
            Client::start_with(
                store,
                &Arc::new(Access {
                    tls: None,
                    enrollment: Enrollment::default(),
                    metrics: Arc::default(),
                    sessions: Sessions::default(),
                }),
            )
        }

        /// A session of a server whose other sessions share `access`.
        fn start_with(store: &Arc<Store>, access: &Arc<Access>) -> Client {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let (store, access) = (store.clone(), access.clone());
            let thread = std::thread::spawn(move || {
                let conn =
                    Conn { stream: theirs, dec: Decoder::new(), buf: vec![0; 64 << 10], out: Vec::new() };
                session(conn, &access, Peer::default(), &store, "test", &mut Handshake::unlimited())
            });
            let mut c = Client { stream: ours, dec: Decoder::new(), thread: Some(thread) };
            c.send(&Frame::Hello {
                min_version: wire::VERSION,
                max_version: wire::VERSION,
                agent: "test".into(),
            });
            assert!(matches!(c.recv(), Some(Frame::Welcome { version: wire::VERSION, .. })));
            c
        }

        fn send(&mut self, f: &Frame) {
            let mut out = Vec::new();
            f.encode(&mut out);
            self.stream.write_all(&out).unwrap();
        }

        fn recv(&mut self) -> Option<Frame> {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                if let Some(f) = self.dec.next_frame().unwrap() {
                    return Some(f);
                }
                let n = self.stream.read(&mut buf).unwrap();
                if n == 0 {
                    return None;
                }
                self.dec.feed(&buf[..n]);
            }
        }

        fn register(&mut self) -> Frame {
            self.register_as([1; 16], false)
        }

        fn register_as(&mut self, source: wire::SourceId, reenroll: bool) -> Frame {
            self.send(&Frame::RegisterDisk {
                disk: DISK.into(),
                size: SIZE,
                block_size: 512,
                source,
                reenroll,
            });
            self.recv().unwrap()
        }

        fn commit(&mut self, generation: u64, digest: Option<Hash>) -> Option<Frame> {
            self.send(&Frame::Commit {
                generation,
                cut_unix_ms: 10 + generation,
                consistency: wire::Consistency::Crash,
                digest,
            });
            self.recv()
        }

        /// Expects an `Error` with `code`, then the end of the session.
        fn expect_error(mut self, code: u16) {
            match self.recv() {
                Some(Frame::Error { code: c, .. }) => assert_eq!(c, code),
                other => panic!("expected an error {code}, got {other:?}"),
            }
            assert_eq!(self.recv(), None);
            self.thread.take().unwrap().join().unwrap().unwrap();
        }
    }

    fn query(point: u64, offset: u64, len: u64, block: u32) -> Frame {
        Frame::HashQuery { disk: DISK.into(), point, offset, len, block }
    }

    fn begin(generation: u64, kind: wire::GenerationKind, base_point: u64) -> Frame {
        Frame::BeginGeneration { disk: DISK.into(), generation, kind, base_point: Some(base_point) }
    }

    /// A `Chunk` of `data` at `offset`, compressed, its hash the true one.
    fn chunk(offset: u64, data: &[u8]) -> Frame {
        Frame::Chunk {
            offset,
            len: data.len() as u32,
            hash: *blake3::hash(data).as_bytes(),
            data: ChunkData::Compressed(zstd::bulk::compress(data, 1).unwrap()),
        }
    }

    #[test]
    fn a_session_answers_hash_queries_in_order_and_refuses_bad_ones() {
        let (_dir, store, image) = store_with_point();
        let store = Arc::new(store);
        let mut c = Client::start(&store);
        // Before RegisterDisk the disk is unknown to the session.
        c.send(&query(1, 0, 4096, 4096));
        c.expect_error(wire::ERR_BAD_REQUEST);

        let mut c = Client::start(&store);
        assert!(matches!(c.register(), Frame::DiskState { latest: Some(PointRef { point: 1, .. }), .. }));
        // Pipelined: the answers come in the order asked.
        let asks = [(0, SIZE, 64 << 10), (64 << 10, 64 << 10, 4096), (1 << 20, SIZE - (1 << 20), 4096)];
        for &(o, l, b) in &asks {
            c.send(&query(1, o, l, b));
        }
        for &(o, l, b) in &asks {
            assert_eq!(
                c.recv(),
                Some(Frame::Hashes { offset: o, block: b, hashes: expected(&image, o, l, b) })
            );
        }
        // A point the disk does not have.
        c.send(&query(9, 0, 4096, 4096));
        c.expect_error(wire::ERR_BAD_REQUEST);
        // A range past the disk's end.
        let mut c = Client::start(&store);
        c.register();
        c.send(&query(1, 1 << 20, 8192, 4096));
        c.expect_error(wire::ERR_BAD_REQUEST);
    }

    /// A resync as the agent runs it: an InitialFull generation on the latest point, hash
    /// queries between the chunks, a checkpoint, a reconnect that resumes, and the commit.
    #[test]
    fn a_resync_generation_on_a_base_resumes_and_commits() {
        let (_dir, store, mut image) = store_with_point();
        let store = Arc::new(store);
        let mut c = Client::start(&store);
        c.register();
        c.send(&begin(5, wire::GenerationKind::InitialFull, 1));
        c.send(&query(1, 0, 64 << 10, 4096));
        assert!(matches!(c.recv(), Some(Frame::Hashes { .. })));
        let data = bytes(99, 4096);
        c.send(&chunk(4096, &data));
        image[4096..8192].copy_from_slice(&data);
        c.send(&Frame::Progress { next_offset: 512 << 10 });
        assert_eq!(c.recv(), Some(Frame::ProgressAck { next_offset: 512 << 10 }));
        drop(c); // the connection breaks
        let mut c = Client::start(&store);
        match c.register() {
            Frame::DiskState { latest, initial, .. } => {
                assert_eq!(latest.map(|l| l.point), Some(1));
                assert_eq!(initial, Some(InitialSync { generation: 5, next_offset: 512 << 10 }));
            }
            f => panic!("{f:?}"),
        }
        c.send(&begin(5, wire::GenerationKind::InitialFull, 1));
        // Above the checkpoint the base still answers.
        c.send(&query(1, 512 << 10, SIZE - (512 << 10), 64 << 10));
        assert_eq!(
            c.recv(),
            Some(Frame::Hashes {
                offset: 512 << 10,
                block: 64 << 10,
                hashes: expected(&image, 512 << 10, SIZE - (512 << 10), 64 << 10)
            })
        );
        c.send(&Frame::Zero { offset: SIZE - 1024, len: 1024 });
        image[SIZE as usize - 1024..].fill(0);
        c.send(&Frame::Commit {
            generation: 5,
            cut_unix_ms: 7,
            consistency: wire::Consistency::Inconsistent,
            digest: None,
        });
        assert_eq!(c.recv(), Some(Frame::Committed { point: 2, generation: 5 }));
        let reader = store.open_point(DISK, PointSel::Latest).unwrap();
        assert_eq!(reader.info().consistency, Consistency::Inconsistent);
        let mut got = vec![0u8; SIZE as usize];
        reader.read_at(&mut got, 0).unwrap();
        assert!(got == image, "the resynced point reads as the base with the changes applied");
    }

    /// Large chunks are verified on several threads, small ones by the connection, but extents
    /// reach the point in the order sent: overlapping chunks of both kinds, Known chunks and
    /// zeroes, pipelined with no pause, end as the last one over each byte wrote them; a
    /// corrupt chunk verified by a worker, with nothing sent after it, is still refused.
    #[test]
    fn parallel_verification_applies_extents_in_the_order_sent() {
        let (_dir, store, mut image) = store_with_point();
        let store = Arc::new(store);
        let mut c = Client::start(&store);
        c.register();
        c.send(&begin(2, wire::GenerationKind::Incremental, 1));
        let known = bytes(7, 8192);
        let known_hash = put(&store, &known);
        let big = u64::from(INLINE_BELOW) + (32 << 10);
        for i in 0..26u64 {
            // Each extent overlaps the ones before it (32 KiB apart, most of them longer).
            let off = (i * 32) << 10;
            if i % 7 == 3 {
                c.send(&Frame::Zero { offset: off, len: 48 << 10 });
                image[off as usize..off as usize + (48 << 10)].fill(0);
            } else if i % 11 == 5 {
                c.send(&Frame::Chunk { offset: off, len: 8192, hash: known_hash, data: ChunkData::Known });
                image[off as usize..off as usize + 8192].copy_from_slice(&known);
            } else {
                let len = if i % 5 == 2 { 40 << 10 } else { big };
                let data = bytes(1000 + i, len as usize);
                c.send(&chunk(off, &data));
                image[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        c.send(&Frame::Commit {
            generation: 2,
            cut_unix_ms: 9,
            consistency: wire::Consistency::Crash,
            digest: None,
        });
        assert_eq!(c.recv(), Some(Frame::Committed { point: 2, generation: 2 }));
        let mut got = vec![0u8; SIZE as usize];
        store.open_point(DISK, PointSel::Latest).unwrap().read_at(&mut got, 0).unwrap();
        assert!(got == image, "the point reads as the extents applied in the order sent");

        let mut c = Client::start(&store);
        c.register();
        c.send(&begin(3, wire::GenerationKind::Incremental, 2));
        for i in 0..5u64 {
            let mut frame = chunk(i * big, &bytes(5000 + i, big as usize));
            if let (3, Frame::Chunk { hash, .. }) = (i, &mut frame) {
                hash[0] ^= 1;
            }
            c.send(&frame);
        }
        c.expect_error(wire::ERR_CORRUPT_CHUNK);
        assert_eq!(store.open_point(DISK, PointSel::Latest).unwrap().info().id, 2);
    }

    /// One source per disk: the first source binds the disk; another is refused as fatal
    /// whatever it sends; a re-enrollment rebinds it and makes the next generation a resync.
    #[test]
    fn a_second_source_is_refused_and_a_re_enrollment_requires_a_resync() {
        let (_dir, store, _) = store_with_point();
        let store = Arc::new(store);
        let mut a = Client::start(&store);
        assert!(matches!(a.register_as([1; 16], false), Frame::DiskState { resync: None, .. }));
        drop(a);
        let mut b = Client::start(&store);
        match b.register_as([2; 16], false) {
            Frame::Error { class: ErrorClass::Fatal, code: wire::ERR_OTHER_SOURCE, message } => {
                assert!(
                    message.contains(&"02".repeat(16)) && message.contains(&"01".repeat(16)),
                    "{message}"
                );
                assert!(message.contains("--reenroll"), "{message}");
            }
            f => panic!("{f:?}"),
        }
        assert_eq!(store.source(DISK).unwrap(), Some("01".repeat(16)));
        let mut b = Client::start(&store);
        match b.register_as([2; 16], true) {
            Frame::DiskState { resync: Some(why), .. } => assert!(why.contains("re-enrolled"), "{why}"),
            f => panic!("{f:?}"),
        }
        // An incremental on the latest point is refused until a resync made a point.
        b.send(&begin(2, wire::GenerationKind::Incremental, 1));
        b.expect_error(wire::ERR_RESYNC_REQUIRED);
        let mut b = Client::start(&store);
        assert!(matches!(b.register_as([2; 16], false), Frame::DiskState { resync: Some(_), .. }));
        b.send(&begin(3, wire::GenerationKind::InitialFull, 1));
        assert_eq!(b.commit(3, None), Some(Frame::Committed { point: 2, generation: 3 }));
        assert!(matches!(b.register_as([2; 16], false), Frame::DiskState { resync: None, .. }));
        // The old source is now the other one.
        let mut a = Client::start(&store);
        assert!(matches!(a.register_as([1; 16], false), Frame::Error { code: wire::ERR_OTHER_SOURCE, .. }));
    }

    /// A disk allows one session at a time: a second gets a retryable ERR_BUSY, and gets in
    /// once the first ended.
    #[test]
    fn a_disk_in_a_session_is_busy_for_another() {
        let (_dir, store, _) = store_with_point();
        let store = Arc::new(store);
        let access = Arc::new(Access {
            tls: None,
            enrollment: Enrollment::default(),
            metrics: Arc::default(),
            sessions: Sessions::default(),
        });
        let mut a = Client::start_with(&store, &access);
        assert!(matches!(a.register(), Frame::DiskState { .. }));
        let mut b = Client::start_with(&store, &access);
        match b.register() {
            Frame::Error { class: ErrorClass::Retryable, code: wire::ERR_BUSY, message } => {
                assert!(message.contains("another session"), "{message}")
            }
            f => panic!("{f:?}"),
        }
        drop(a);
        let mut b = Client::start_with(&store, &access);
        assert!(matches!(b.register(), Frame::DiskState { .. }));
    }

    /// A generation sent again with its point's digest is the harmless duplicate; with another
    /// digest, or older than the latest point without one of its own, it is divergence: fatal,
    /// and never answered with the other content's point.
    #[test]
    fn a_generation_sent_again_with_other_content_is_divergence() {
        let (_dir, store, _) = store_with_point();
        let store = Arc::new(store);
        let mut c = Client::start(&store);
        c.register();
        c.send(&begin(2, wire::GenerationKind::Incremental, 1));
        c.send(&chunk(0, &[7; 512]));
        assert_eq!(c.commit(2, Some([0xaa; 32])), Some(Frame::Committed { point: 2, generation: 2 }));
        // The same content again: the same point.
        c.send(&begin(2, wire::GenerationKind::Incremental, 2));
        assert_eq!(c.commit(2, Some([0xaa; 32])), Some(Frame::Committed { point: 2, generation: 2 }));
        // Other content under the same generation: refused, fatal.
        c.send(&begin(2, wire::GenerationKind::Incremental, 2));
        match c.commit(2, Some([0xbb; 32])) {
            Some(Frame::Error { class: ErrorClass::Fatal, code: wire::ERR_DIVERGED, message }) => {
                assert!(message.contains("two machines"), "{message}")
            }
            f => panic!("{f:?}"),
        }
        assert_eq!(c.recv(), None);
        // A generation below the latest point's without a point of its own, on that point.
        let mut c = Client::start(&store);
        c.register();
        c.send(&begin(5, wire::GenerationKind::Incremental, 2));
        assert_eq!(c.commit(5, Some([0xcc; 32])), Some(Frame::Committed { point: 3, generation: 5 }));
        c.send(&begin(4, wire::GenerationKind::Incremental, 3));
        c.expect_error(wire::ERR_DIVERGED);
        assert_eq!(store.points(DISK).unwrap().len(), 3);
    }

    /// `Current` records that the latest point still equals the disk; for another point it is
    /// refused.
    #[test]
    fn current_records_an_unchanged_disk() {
        let (_dir, store, _) = store_with_point();
        let store = Arc::new(store);
        let mut c = Client::start(&store);
        c.register();
        c.send(&Frame::Current { point: 1, as_of_unix_ms: 5_000 });
        assert_eq!(c.recv(), Some(Frame::CurrentAck { point: 1, as_of_unix_ms: 5_000 }));
        assert_eq!(store.current_unix_ms(DISK).unwrap(), Some(5_000));
        assert_eq!(store.points(DISK).unwrap().len(), 1, "no point is made");
        c.send(&Frame::Current { point: 7, as_of_unix_ms: 6_000 });
        c.expect_error(wire::ERR_BAD_REQUEST);
    }

    /// Accepted connections probe a silent peer, so a vanished agent frees its disk's session.
    #[test]
    fn accepted_connections_keep_alive() {
        use nix::sys::socket::{getsockopt, sockopt};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (tcp, _) = listener.accept().unwrap();
        keepalive(&tcp).unwrap();
        assert!(getsockopt(&tcp, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&tcp, sockopt::TcpKeepIdle).unwrap(), KEEPALIVE_IDLE_S);
        assert_eq!(getsockopt(&tcp, sockopt::TcpKeepInterval).unwrap(), KEEPALIVE_INTERVAL_S);
        assert_eq!(getsockopt(&tcp, sockopt::TcpKeepCount).unwrap(), KEEPALIVE_PROBES);
    }
}
