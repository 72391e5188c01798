//! The process server's network side: agents connect over mutual TLS, speak `wire` frames,
//! and their generations become recovery points in the [`Store`]. One thread per connection;
//! many agents and disks at once.
//!
//! Per connection: Hello → Welcome (version negotiation) → RegisterDisk → DiskState, then per
//! generation BeginGeneration, HaveQuery/HaveReply, Chunk, Zero, Progress/ProgressAck, Commit →
//! Committed. Every chunk is verified (decompressed, blake3) before it is stored; a bad one
//! rejects the whole generation. A commit is acknowledged only once the point is durable.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ServerConfig, ServerConnection, StreamOwned};
use wire::{ChunkData, Decoder, ErrorClass, Frame, InitialSync, PointRef};

use crate::info::{Consistency, GenerationKind};
use crate::{PendingPoint, PointInfo, Store, StoreError};

/// How long a connection may stay silent before the server drops it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

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

struct Conn<S: Read + Write> {
    stream: S,
    dec: Decoder,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl<S: Read + Write> Conn<S> {
    fn recv(&mut self) -> io::Result<Option<Frame>> {
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) => return Ok(Some(f)),
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            let n = self.stream.read(&mut self.buf)?;
            if n == 0 {
                return Ok(None);
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

    fn error(&mut self, class: ErrorClass, code: u16, message: String) -> io::Result<()> {
        tracing::warn!(code, "refusing: {message}");
        self.send(&Frame::Error { class, code, message })
    }
}

/// The wire code and class for a store failure.
fn classify(e: &StoreError) -> (ErrorClass, u16) {
    match e {
        StoreError::CorruptChunk { .. } => (ErrorClass::Retryable, wire::ERR_CORRUPT_CHUNK),
        StoreError::DiskMismatch { .. } => (ErrorClass::Fatal, wire::ERR_DISK_MISMATCH),
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

fn session<S: Read + Write>(
    mut c: Conn<S>,
    access: &Access,
    fingerprint: Option<String>,
    store: &Store,
    name: &str,
) -> io::Result<()> {
    let metrics = &access.metrics;
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
    let mut disk: Option<String> = None;
    let mut receiving = Receiving::Nothing;
    while let Some(frame) = c.recv()? {
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
                if disk.as_deref() != Some(d.as_str()) {
                    c.error(
                        ErrorClass::Fatal,
                        wire::ERR_BAD_REQUEST,
                        format!("disk {d} was not registered"),
                    )?;
                    return Ok(());
                }
                begin(store, &d, generation, kind, base_point).map_err(Fail::from).map(|r| {
                    receiving = r;
                    None
                })
            }
            Frame::HaveQuery { hashes } => {
                Ok(Some(Frame::HaveReply { have: hashes.iter().map(|h| store.has_chunk(h)).collect() }))
            }
            Frame::Chunk { offset, len, hash, data } => match &mut receiving {
                Receiving::Pending(p) => {
                    let stored = match &data {
                        ChunkData::Compressed(bytes) => {
                            metrics.bytes_received_total.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                            metrics.chunks_stored_total.fetch_add(1, Ordering::Relaxed);
                            store.put_chunk(&hash, len, bytes)
                        }
                        ChunkData::Known => Ok(()),
                    };
                    stored.and_then(|()| p.add_chunk(offset, len, hash)).map(|()| None).map_err(Fail::from)
                }
                Receiving::Done(_) => Ok(None),
                Receiving::Nothing => Err(Fail::Protocol("Chunk outside a generation".into())),
            },
            Frame::Zero { offset, len } => match &mut receiving {
                Receiving::Pending(p) => p.add_zero(offset, len).map(|()| None).map_err(Fail::from),
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
            Err(fail) => {
                metrics.rejected_total.fetch_add(1, Ordering::Relaxed);
                // The generation is rejected whole: nothing of it becomes a point. An error
                // ends the session; the agent reconnects and sends the generation again.
                let (class, code, msg) = match fail {
                    Fail::Store(e) => {
                        let (class, code) = classify(&e);
                        (class, code, e.to_string())
                    }
                    Fail::Protocol(m) => (ErrorClass::Fatal, wire::ERR_BAD_REQUEST, m),
                };
                return c.error(class, code, msg);
            }
        }
    }
    Ok(())
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
    if kind == GenerationKind::InitialFull {
        if let Some(p) = store.resume_initial(disk)? {
            if p.generation() == generation {
                return Ok(Receiving::Pending(Box::new(p)));
            }
        }
    }
    Ok(Receiving::Pending(Box::new(store.begin(disk, generation, kind, base)?)))
}
