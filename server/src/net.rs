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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ServerConfig, ServerConnection, StreamOwned};
use wire::{ChunkData, Decoder, ErrorClass, Frame, Hash, InitialSync, PointRef};

use crate::info::{Consistency, GenerationKind, PointSel};
use crate::{PendingPoint, PointInfo, PointReader, Store, StoreError};

/// How long a connection may stay silent before the server drops it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
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
}

/// Serves agents on `listener` until `stop` is set (checked every 200 ms).
pub fn serve(
    listener: TcpListener,
    access: Arc<Access>,
    store: Arc<Store>,
    name: String,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut threads = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((tcp, peer)) => {
                let (access, store, name) = (access.clone(), store.clone(), name.clone());
                threads.push(std::thread::spawn(move || {
                    access.metrics.connections.fetch_add(1, Ordering::Relaxed);
                    let r = connection(tcp, &access, &store, &name);
                    access.metrics.connections.fetch_sub(1, Ordering::Relaxed);
                    match r {
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            tracing::debug!(%peer, "agent disconnected")
                        }
                        Err(e) => tracing::info!(%peer, "agent connection ended: {e}"),
                        Ok(()) => {}
                    }
                }));
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

/// A stream the server can half-close after its last frame.
trait Stream: Read + Write {
    /// Tells the agent that no more frames follow (TLS close_notify, then TCP FIN).
    fn close_write(&mut self);
    fn set_read_timeout(&mut self, t: Duration);
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
    /// The next frame; `None` at the end of the stream. A frame that does not decode is
    /// answered with its `Error` (the session ends).
    fn recv(&mut self) -> io::Result<Option<Frame>> {
        match self.next(false)? {
            Recv::Frame(f) => Ok(Some(f)),
            Recv::End | Recv::Idle => Ok(None),
        }
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
                    let _ = self.send(&e.error_frame());
                    self.finish();
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
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
        StoreError::InvalidName { .. } | StoreError::InvalidGeometry { .. } => {
            (ErrorClass::Fatal, wire::ERR_BAD_REQUEST)
        }
        StoreError::MissingChunk(_) | StoreError::StaleGeneration { .. } | StoreError::InvalidBase { .. } => {
            (ErrorClass::Retryable, wire::ERR_BAD_REQUEST)
        }
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

fn connection(tcp: TcpStream, access: &Access, store: &Store, name: &str) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(IDLE_TIMEOUT))?;
    tcp.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let buf = vec![0u8; 256 << 10];
    match &access.tls {
        Some(tls) => {
            let conn = ServerConnection::new(tls.clone()).map_err(io::Error::other)?;
            let mut stream = StreamOwned::new(conn, tcp);
            while stream.conn.is_handshaking() {
                stream.conn.complete_io(&mut stream.sock)?;
            }
            let fp =
                stream.conn.peer_certificates().and_then(|c| c.first()).map(|c| Enrollment::fingerprint(c));
            session(Conn { stream, dec: Decoder::new(), buf, out: Vec::new() }, access, fp, store, name)
        }
        None => session(
            Conn { stream: tcp, dec: Decoder::new(), buf, out: Vec::new() },
            access,
            None,
            store,
            name,
        ),
    }
}

fn session<S: Stream>(
    mut c: Conn<S>,
    access: &Access,
    fingerprint: Option<String>,
    store: &Store,
    name: &str,
) -> io::Result<()> {
    let Some(Frame::Hello { min_version, max_version, agent }) = c.recv()? else {
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
    c.send(&Frame::Welcome { version, server: name.to_string() })?;
    tracing::info!(%agent, version, "agent connected");
    std::thread::scope(|scope| frames(&mut c, scope, access, fingerprint, store))
}

/// The session after `Welcome`: frames until the agent closes or either side fails.
fn frames<'scope, 'env, S: Stream>(
    c: &mut Conn<S>,
    scope: &'scope std::thread::Scope<'scope, 'env>,
    access: &Access,
    fingerprint: Option<String>,
    store: &'env Store,
) -> io::Result<()> {
    let metrics = &access.metrics;
    let mut disk: Option<String> = None;
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
            Frame::RegisterDisk { disk: d, size, block_size } => {
                store.register_disk(&d, size, block_size).map_err(Fail::from).map(|info| {
                    disk = Some(d.clone());
                    receiving = Receiving::Nothing;
                    Some(Frame::DiskState {
                        disk: d,
                        latest: info.latest.as_ref().map(point_ref),
                        initial: info
                            .initial
                            .map(|i| InitialSync { generation: i.generation, next_offset: i.next_offset }),
                    })
                })
            }
            Frame::BeginGeneration { disk: d, generation, kind, base_point } => {
                begin(store, &d, generation, kind, base_point).map_err(Fail::from).map(|r| {
                    receiving = r;
                    None
                })
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
            Frame::Commit { generation, cut_unix_ms, consistency } => {
                match std::mem::replace(&mut receiving, Receiving::Nothing) {
                    Receiving::Pending(p) => {
                        let c = match consistency {
                            wire::Consistency::Crash => Consistency::Crash,
                            wire::Consistency::App => Consistency::App,
                            wire::Consistency::Inconsistent => Consistency::Inconsistent,
                        };
                        p.commit(cut_unix_ms, c).map_err(Fail::from).map(|info| {
                            tracing::info!(disk = ?disk, point = info.id, generation, "recovery point committed");
                            metrics.points_total.fetch_add(1, Ordering::Relaxed);
                            Some(Frame::Committed { point: info.id, generation })
                        })
                    }
                    Receiving::Done(info) => {
                        Ok(Some(Frame::Committed { point: info.id, generation: info.generation }))
                    }
                    Receiving::Nothing => Err(Fail::Protocol("Commit outside a generation".into())),
                }
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

fn begin(
    store: &Store,
    disk: &str,
    generation: u64,
    kind: wire::GenerationKind,
    base: Option<u64>,
) -> Result<Receiving, StoreError> {
    if let Some(p) = store.point_for_generation(disk, generation)? {
        return Ok(Receiving::Done(p));
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
            return Err(StoreError::BaseNotLatest { disk: disk.to_string(), base, latest });
        }
    }
    if kind == GenerationKind::InitialFull {
        match store.resume_initial(disk) {
            Ok(Some(p)) if p.generation() == generation => return Ok(Receiving::Pending(Box::new(p))),
            Ok(_) => {}
            // The checkpoint of a copy abandoned before the latest point: this generation
            // replaces it with its first checkpoint.
            Err(StoreError::StaleGeneration { .. }) => {}
            Err(e) => return Err(e),
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
            let (ours, theirs) = UnixStream::pair().unwrap();
            let store = store.clone();
            let thread = std::thread::spawn(move || {
                let access = Access { tls: None, enrollment: Enrollment::default(), metrics: Arc::default() };
                let conn =
                    Conn { stream: theirs, dec: Decoder::new(), buf: vec![0; 64 << 10], out: Vec::new() };
                session(conn, &access, None, &store, "test")
            });
            let mut c = Client { stream: ours, dec: Decoder::new(), thread: Some(thread) };
            c.send(&Frame::Hello { min_version: 1, max_version: 1, agent: "test".into() });
            assert!(matches!(c.recv(), Some(Frame::Welcome { version: 1, .. })));
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
            self.send(&Frame::RegisterDisk { disk: DISK.into(), size: SIZE, block_size: 512 });
            self.recv().unwrap()
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
        c.send(&Frame::Commit { generation: 2, cut_unix_ms: 9, consistency: wire::Consistency::Crash });
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
}
