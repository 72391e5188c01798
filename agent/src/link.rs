//! A framed connection to the recovery server: TLS over TCP, `wire` frames, and the
//! Hello/Welcome version negotiation.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use wire::{Decoder, ErrorClass, Frame};

use crate::AgentError;

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
            Frame::Welcome { version, server } => {
                if !(wire::MIN_VERSION..=wire::VERSION).contains(&version) {
                    return Err(AgentError::Version(format!("server chose version {version}")));
                }
                link.version = version;
                link.server = server;
                Ok(link)
            }
            other => Err(AgentError::Protocol(format!("expected Welcome, got {}", frame_name(&other)))),
        }
    }

    /// An I/O failure on the stream: a timeout is the server not answering.
    fn failed(&self, e: io::Error) -> AgentError {
        if timed_out(&e) {
            return AgentError::NoAnswer { addr: self.addr.clone(), after: self.timeout };
        }
        AgentError::from_tls_io(e)
    }

    /// Queues a frame; it is written at the next `flush` or `recv`.
    pub fn queue(&mut self, f: &Frame) {
        let before = self.out.len();
        f.encode(&mut self.out);
        self.bytes_out += (self.out.len() - before) as u64;
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
        self.queue(f);
        self.flush()
    }

    /// The next frame from the server; an `Error` frame becomes `AgentError::Server`.
    pub fn recv(&mut self) -> Result<Frame, AgentError> {
        self.flush()?;
        loop {
            if let Some(f) = self.dec.next_frame().map_err(AgentError::Wire)? {
                if let Frame::Error { class, code, message } = f {
                    return Err(AgentError::Server { fatal: class == ErrorClass::Fatal, code, message });
                }
                return Ok(f);
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

/// A frame's name, for messages.
pub fn frame_name(f: &Frame) -> &'static str {
    f.name()
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

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
