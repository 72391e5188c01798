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

pub struct Link {
    stream: Box<dyn Stream>,
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
        let sa =
            addr.to_socket_addrs().map_err(AgentError::Connect)?.next().ok_or_else(|| {
                AgentError::Connect(io::Error::other(format!("{addr} resolves to nothing")))
            })?;
        let tcp = TcpStream::connect_timeout(&sa, Duration::from_secs(30)).map_err(AgentError::Connect)?;
        tcp.set_nodelay(true).map_err(AgentError::Connect)?;
        tcp.set_read_timeout(Some(IO_TIMEOUT)).map_err(AgentError::Connect)?;
        tcp.set_write_timeout(Some(IO_TIMEOUT)).map_err(AgentError::Connect)?;
        let Some(tls) = tls else { return Self::over(Box::new(tcp), agent) };
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| AgentError::Config(format!("invalid TLS server name {server_name:?}")))?;
        let conn = ClientConnection::new(tls, name).map_err(AgentError::Tls)?;
        let mut tls = StreamOwned::new(conn, tcp);
        // Complete the handshake now so certificate problems surface as such.
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).map_err(AgentError::from_tls_io)?;
        }
        Self::over(Box::new(tls), agent)
    }

    /// Negotiates over an established stream.
    pub fn over(stream: Box<dyn Stream>, agent: &str) -> Result<Self, AgentError> {
        let mut link = Self {
            stream,
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

    /// Queues a frame; it is written at the next `flush` or `recv`.
    pub fn queue(&mut self, f: &Frame) {
        let before = self.out.len();
        f.encode(&mut self.out);
        self.bytes_out += (self.out.len() - before) as u64;
    }

    pub fn flush(&mut self) -> Result<(), AgentError> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).map_err(AgentError::from_tls_io)?;
            self.stream.flush().map_err(AgentError::from_tls_io)?;
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
            let n = self.stream.read(&mut self.buf).map_err(AgentError::from_tls_io)?;
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
