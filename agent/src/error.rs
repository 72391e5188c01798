//! Why the agent stopped, or a cycle failed, and whether trying again can help.

use std::io;

use wire::session::SessionError;

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

impl From<SessionError> for AgentError {
    /// The session's own errors as the agent reports them: the server's refusal by its class
    /// (§5), a version outside the agent's range as fatal, anything out of order as a protocol
    /// error (retried in a new session).
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Refused(r) => {
                AgentError::Server { fatal: !r.is_retryable(), code: r.code, message: r.message }
            }
            SessionError::Version { version, .. } => {
                AgentError::Version(format!("server chose version {version}"))
            }
            e => AgentError::Protocol(e.to_string()),
        }
    }
}
