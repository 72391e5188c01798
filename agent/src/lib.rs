//! The replication agent (mobility service): drains the shim's tracked generations to the
//! recovery server as blake3-hashed, zstd-compressed, deduplicated deltas.
//!
//! - [`run`] is the loop: connect, register the disk, copy it whole the first time (resumable,
//!   skipping holes), then every interval cut a generation, ship it, wait for the server's
//!   durable commit, release it. Transient failures retry with backoff; fatal ones stop.
//! - [`ship`] turns extents into chunks, reads them through NBD with several connections,
//!   hashes and compresses them in parallel, asks the server which it already has, and sends the
//!   rest, with bounded memory.
//! - [`resync`] brings the server's latest point level with the disk after tracking was lost
//!   (or fell far behind): hashes of both sides are compared, region by region and then block
//!   by block, and only the blocks that differ are sent; resumable, rate-limited.
//! - [`link`] is the framed TLS connection; [`tls`] builds mutual-TLS configurations.
#![forbid(unsafe_code)]

pub mod link;
pub mod resync;
pub mod run;
pub mod ship;
pub mod tls;

use std::io;
use std::sync::atomic::AtomicU64;

pub use resync::ResyncOptions;
pub use run::{parse_duration, run, AgentConfig, AppConsistency, Summary};

/// Counters and gauges for `--metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub bytes_read_total: AtomicU64,
    pub bytes_sent_total: AtomicU64,
    pub bytes_deduplicated_total: AtomicU64,
    pub bytes_zero_total: AtomicU64,
    pub points_total: AtomicU64,
    pub errors_total: AtomicU64,
    /// Progress the server acknowledged short of a commit: initial-copy checkpoints and
    /// resync regions. A failure after progress starts the retry schedule over.
    pub progress_total: AtomicU64,
    /// Cut time of the newest committed point (ms since the epoch; 0: none yet).
    pub last_cut_unix_ms: AtomicU64,
    /// Bytes waiting: the shim's live set plus unreleased generations, when last seen.
    pub backlog_bytes: AtomicU64,
}

/// Why the agent stopped or a cycle failed. [`AgentError::is_fatal`] tells retry from stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("cannot connect to the server")]
    Connect(#[source] io::Error),
    #[error("TLS failed")]
    Tls(#[source] rustls::Error),
    #[error("connection to the server failed")]
    Io(#[source] io::Error),
    /// A read or write on the connection timed out.
    #[error("no answer from the server at {addr} within {after:?}")]
    NoAnswer { addr: String, after: std::time::Duration },
    /// A plaintext (`--insecure`) agent reached a server that speaks TLS.
    #[error(
        "the server at {addr} speaks TLS, but this agent runs with --insecure (plaintext): give \
         --tls-cert, --tls-key and --tls-ca instead"
    )]
    ServerSpeaksTls { addr: String },
    /// A TLS agent reached a server that speaks plaintext.
    #[error(
        "the server at {addr} answered in plaintext, not TLS: it runs with --insecure (run it with \
         TLS, or give the agent --insecure too, on loopback only)"
    )]
    ServerSpeaksPlaintext { addr: String },
    #[error("the server sent a malformed frame")]
    Wire(#[source] wire::WireError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("version mismatch: {0}")]
    Version(String),
    #[error("the server refused (code {code}): {message}")]
    Server { fatal: bool, code: u16, message: String },
    #[error("the shim's control socket failed")]
    Control(#[from] tracker::control::ControlError),
    #[error("reading the disk through NBD failed")]
    Nbd(#[from] nbd_proto::client::ClientError),
    #[error("{0}")]
    Config(String),
    /// Two machines replicate under one source identity (`docs/wire.md` §6.6).
    #[error("{0}")]
    Diverged(String),
    /// `max_retries` failed attempts in a row; `last` is the last one's error.
    #[error("gave up after {attempts} failed attempts")]
    GaveUp {
        attempts: usize,
        #[source]
        last: Box<AgentError>,
    },
}

impl AgentError {
    /// Errors retrying cannot fix: authentication, authorization, version, configuration.
    pub fn is_fatal(&self) -> bool {
        match self {
            AgentError::Tls(e) => tls_is_fatal(e),
            AgentError::Version(_)
            | AgentError::Config(_)
            | AgentError::Diverged(_)
            | AgentError::GaveUp { .. }
            | AgentError::ServerSpeaksTls { .. }
            | AgentError::ServerSpeaksPlaintext { .. } => true,
            AgentError::Server { fatal, .. } => *fatal,
            _ => false,
        }
    }

    /// Unwraps rustls errors that arrive as I/O errors.
    pub fn from_tls_io(e: io::Error) -> Self {
        let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).cloned();
        match tls {
            Some(t) => AgentError::Tls(t),
            None => AgentError::Io(e),
        }
    }
}

fn tls_is_fatal(e: &rustls::Error) -> bool {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => true,
        rustls::Error::AlertReceived(a) => matches!(
            a,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::CertificateRequired
                | A::HandshakeFailure
                | A::DecryptError
                | A::ProtocolVersion
        ),
        _ => false,
    }
}
