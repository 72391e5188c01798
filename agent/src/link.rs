//! A framed connection to the recovery server: TLS over TCP and `wire` frames, driving `wire`'s
//! agent-side session machine ([`AgentSession`]): every frame goes out through it (a frame out
//! of place is refused before it is sent) and every frame that comes in is checked by it against
//! the answer due, so the order of the session (`docs/wire.md` §6) lives there, not here.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use wire::session::{AgentSession, DiskState, Reply};
use wire::{Consistency, Decoder, Frame, Hash, PointRef};

use crate::error::AgentError;

/// Anything a link can run over (TLS in production; plain sockets in tests).
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// How long the agent waits for the server before it calls the connection dead.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the agent waits for the server to accept its TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether an I/O error is a timeout: a socket timeout surfaces as `WouldBlock` (EAGAIN).
fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Whether `b` starts like a TLS record (content type 20–23, version 3.x). A frame never
/// does: its length, below `MAX_FRAME`, starts with a zero byte.
fn wire_tls_record(b: &[u8]) -> bool {
    matches!(b, [0x14..=0x17, 0x03, ..] | [0x14..=0x17])
}

pub struct Link {
    stream: Box<dyn Stream>,
    /// The server's address, for messages.
    addr: String,
    /// The read and write timeout of the socket.
    timeout: Duration,
    dec: Decoder,
    out: Vec<u8>,
    buf: Vec<u8>,
    /// The order of the session.
    session: AgentSession,
    pub server: String,
    pub version: u16,
    /// Frame bytes queued for the server so far (TLS records not counted).
    pub bytes_out: u64,
    /// Bytes received from the server so far.
    pub bytes_in: u64,
}

impl Link {
    /// Connects to `addr` over TLS (verifying the server as `server_name`), or in plaintext
    /// when `tls` is `None` (`--insecure`), and negotiates.
    pub fn connect(
        addr: &str,
        server_name: &str,
        tls: Option<Arc<ClientConfig>>,
        agent: &str,
    ) -> Result<Self, AgentError> {
        Self::connect_within(addr, server_name, tls, agent, IO_TIMEOUT)
    }

    /// [`Link::connect`] with `timeout` for connecting and for every read and write.
    pub(crate) fn connect_within(
        addr: &str,
        server_name: &str,
        tls: Option<Arc<ClientConfig>>,
        agent: &str,
        timeout: Duration,
    ) -> Result<Self, AgentError> {
        let sa =
            addr.to_socket_addrs().map_err(AgentError::Connect)?.next().ok_or_else(|| {
                AgentError::Connect(io::Error::other(format!("{addr} resolves to nothing")))
            })?;
        let no_answer = || AgentError::NoAnswer { addr: addr.to_string(), after: timeout };
        let tcp = TcpStream::connect_timeout(&sa, timeout.min(CONNECT_TIMEOUT)).map_err(|e| {
            if timed_out(&e) {
                AgentError::NoAnswer { addr: addr.to_string(), after: timeout.min(CONNECT_TIMEOUT) }
            } else {
                AgentError::Connect(e)
            }
        })?;
        tcp.set_nodelay(true).map_err(AgentError::Connect)?;
        tcp.set_read_timeout(Some(timeout)).map_err(AgentError::Connect)?;
        tcp.set_write_timeout(Some(timeout)).map_err(AgentError::Connect)?;
        let Some(tls) = tls else { return Self::negotiate(Box::new(tcp), agent, addr, timeout) };
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| AgentError::Config(format!("invalid TLS server name {server_name:?}")))?;
        let conn = ClientConnection::new(tls, name).map_err(AgentError::Tls)?;
        let mut tls = StreamOwned::new(conn, tcp);
        let tls_err = |e: io::Error| if timed_out(&e) { no_answer() } else { AgentError::from_tls_io(e) };
        // Send the ClientHello, then look at how the server answers before rustls reads it: a
        // server run with --insecure answers with a plaintext frame, not a TLS record.
        while tls.conn.wants_write() {
            tls.conn.write_tls(&mut tls.sock).map_err(tls_err)?;
        }
        let mut head = [0u8; 2];
        match tls.sock.peek(&mut head).map_err(tls_err)? {
            0 => {}
            n if !wire_tls_record(&head[..n]) => {
                return Err(AgentError::ServerSpeaksPlaintext { addr: addr.to_string() })
            }
            _ => {}
        }
        // Complete the handshake now so certificate problems surface as such.
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).map_err(tls_err)?;
        }
        Self::negotiate(Box::new(tls), agent, addr, timeout)
    }

    /// Negotiates over an established stream.
    pub fn over(stream: Box<dyn Stream>, agent: &str) -> Result<Self, AgentError> {
        Self::negotiate(stream, agent, "(stream)", IO_TIMEOUT)
    }

    fn negotiate(
        stream: Box<dyn Stream>,
        agent: &str,
        addr: &str,
        timeout: Duration,
    ) -> Result<Self, AgentError> {
        let mut link = Self {
            stream,
            addr: addr.to_string(),
            timeout,
            dec: Decoder::new(),
            out: Vec::with_capacity(1 << 20),
            buf: vec![0u8; 256 << 10],
            session: AgentSession::new(),
            server: String::new(),
            version: 0,
            bytes_out: 0,
            bytes_in: 0,
        };
        link.send(&Frame::Hello {
            min_version: wire::MIN_VERSION,
            max_version: wire::VERSION,
            agent: agent.into(),
        })?;
        match link.recv()? {
            Reply::Welcome { version, server } => {
                link.version = version;
                link.server = server;
                Ok(link)
            }
            other => Err(misread("Welcome", &other)),
        }
    }

    /// The disk's latest point as far as this session knows: `DiskState`'s, then the newest
    /// generation committed since.
    pub fn latest(&self) -> Option<PointRef> {
        self.session.latest()
    }

    /// An I/O failure on the stream: a timeout is the server not answering.
    fn failed(&self, e: io::Error) -> AgentError {
        if timed_out(&e) {
            return AgentError::NoAnswer { addr: self.addr.clone(), after: self.timeout };
        }
        AgentError::from_tls_io(e)
    }

    /// Queues a frame, once the session's order allows it; it is written at the next `flush`
    /// or `recv`.
    pub fn queue(&mut self, f: &Frame) -> Result<(), AgentError> {
        self.session.send(f)?;
        let before = self.out.len();
        f.encode(&mut self.out);
        self.bytes_out += (self.out.len() - before) as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), AgentError> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).map_err(|e| self.failed(e))?;
            self.stream.flush().map_err(|e| self.failed(e))?;
            self.out.clear();
        }
        Ok(())
    }

    pub fn send(&mut self, f: &Frame) -> Result<(), AgentError> {
        self.queue(f)?;
        self.flush()
    }

    /// The next answer from the server, the one due (the session machine checks it); an `Error`
    /// frame becomes `AgentError::Server`.
    pub fn recv(&mut self) -> Result<Reply, AgentError> {
        self.flush()?;
        loop {
            if let Some(f) = self.dec.next_frame().map_err(AgentError::Wire)? {
                return Ok(self.session.receive(f)?);
            }
            let n = self.stream.read(&mut self.buf).map_err(|e| self.failed(e))?;
            if self.bytes_in == 0 && wire_tls_record(&self.buf[..n]) {
                // Where a frame's length should be, a TLS record: the server speaks TLS to a
                // plaintext (--insecure) agent.
                return Err(AgentError::ServerSpeaksTls { addr: self.addr.clone() });
            }
            if n == 0 {
                return Err(AgentError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
            self.bytes_in += n as u64;
            self.dec.feed(&self.buf[..n]);
        }
    }
}

impl Link {
    /// Registers the disk: `RegisterDisk`, answered by what the server holds of it.
    pub fn register(&mut self, register: &Frame) -> Result<DiskState, AgentError> {
        self.send(register)?;
        match self.recv()? {
            Reply::DiskState(st) => Ok(st),
            other => Err(misread("DiskState", &other)),
        }
    }

    /// Which of `hashes` the server has (`HaveQuery`).
    pub fn have(&mut self, hashes: Vec<Hash>) -> Result<Vec<bool>, AgentError> {
        self.send(&Frame::HaveQuery { hashes })?;
        match self.recv()? {
            Reply::HaveReply { have } => Ok(have),
            other => Err(misread("HaveReply", &other)),
        }
    }

    /// The answer to the oldest `HashQuery` queued: its hashes.
    pub fn hashes(&mut self) -> Result<Vec<Hash>, AgentError> {
        match self.recv()? {
            Reply::Hashes { hashes, .. } => Ok(hashes),
            other => Err(misread("Hashes", &other)),
        }
    }

    /// Makes everything below `next_offset` durable on the server (`Progress`).
    pub fn progress(&mut self, next_offset: u64) -> Result<(), AgentError> {
        self.send(&Frame::Progress { next_offset })?;
        match self.recv()? {
            Reply::ProgressAck { .. } => Ok(()),
            other => Err(misread("ProgressAck", &other)),
        }
    }

    /// Commits the open generation; returns its durable point.
    pub fn commit(
        &mut self,
        generation: u64,
        cut_unix_ms: u64,
        consistency: Consistency,
        digest: Option<Hash>,
    ) -> Result<u64, AgentError> {
        self.send(&Frame::Commit { generation, cut_unix_ms, consistency, digest })?;
        match self.recv()? {
            Reply::Committed { point, .. } => Ok(point),
            other => Err(misread("Committed", &other)),
        }
    }

    /// Records that the latest point still equals the disk as of `as_of_unix_ms` (`Current`).
    pub fn current(&mut self, point: u64, as_of_unix_ms: u64) -> Result<(), AgentError> {
        self.send(&Frame::Current { point, as_of_unix_ms })?;
        match self.recv()? {
            Reply::CurrentAck { .. } => Ok(()),
            other => Err(misread("CurrentAck", &other)),
        }
    }
}

/// A reply read where another was awaited: the agent read its answers in another order than it
/// asked (the session machine checked the server's order).
fn misread(awaited: &str, got: &Reply) -> AgentError {
    AgentError::Protocol(format!("awaited {awaited}, read {}", got.name()))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use wire::ErrorClass;

    use super::*;

    fn tls_client() -> Arc<ClientConfig> {
        let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Arc::new(config)
    }

    /// A server at `addr` that runs `answer` on its first connection.
    fn one_shot(answer: impl FnOnce(TcpStream) + Send + 'static) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || answer(l.accept().unwrap().0));
        addr
    }

    fn connect(addr: &str, tls: Option<Arc<ClientConfig>>) -> AgentError {
        match Link::connect_within(addr, "localhost", tls, "test", Duration::from_millis(300)) {
            Ok(_) => panic!("connected to {addr}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_server_that_never_answers_is_a_timeout() {
        // A listener that never accepts: the kernel completes the TCP handshake, then nothing.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        // And one that accepts and never answers.
        let (tx, rx) = std::sync::mpsc::channel();
        let mute = one_shot(move |s| rx.recv().map(|()| drop(s)).unwrap_or(()));
        for (addr, tls) in [(&addr, None), (&addr, Some(tls_client())), (&mute, None)] {
            let e = connect(addr, tls);
            assert!(matches!(e, AgentError::NoAnswer { .. }), "{e:?}");
            assert!(!e.is_fatal());
            assert_eq!(e.to_string(), format!("no answer from the server at {addr} within 300ms"));
        }
        tx.send(()).unwrap();
    }

    #[test]
    fn a_plaintext_agent_at_a_tls_server_is_told_so() {
        // A TLS server answers a frame with a TLS alert record (decode_error).
        let addr = one_shot(|mut s| {
            let mut b = [0u8; 64];
            let _ = s.read(&mut b);
            s.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]).unwrap();
        });
        let e = connect(&addr, None);
        assert!(matches!(e, AgentError::ServerSpeaksTls { .. }), "{e:?}");
        assert!(e.is_fatal());
        assert!(e.to_string().contains("speaks TLS, but this agent runs with --insecure"), "{e}");
    }

    #[test]
    fn a_tls_agent_at_a_plaintext_server_is_told_so() {
        // A plaintext server answers the ClientHello with an Error frame.
        let addr = one_shot(|mut s| {
            let mut b = [0u8; 4096];
            let _ = s.read(&mut b);
            let mut out = Vec::new();
            let message = "frame length exceeds MAX_FRAME".into();
            Frame::Error { class: ErrorClass::Fatal, code: wire::ERR_BAD_REQUEST, message }.encode(&mut out);
            s.write_all(&out).unwrap();
        });
        let e = connect(&addr, Some(tls_client()));
        assert!(matches!(e, AgentError::ServerSpeaksPlaintext { .. }), "{e:?}");
        assert!(e.is_fatal());
        assert!(e.to_string().contains("answered in plaintext, not TLS"), "{e}");
    }
}
