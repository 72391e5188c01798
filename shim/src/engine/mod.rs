//! Engines run the transmission phase of one connection.
//!
//! [`uring`] drives the socket and the image through one io_uring per connection: requests are
//! pipelined and answered in completion order. [`sync`] is the fallback where io_uring is
//! unavailable: plain pread/pwrite, one request at a time. Both validate every request with
//! [`nbd_proto::transmission::Session::validate`] before touching the image and mark the
//! dirty map before a modifying command's reply is queued.

#[allow(unsafe_code)]
pub mod poll;
mod punt;
pub mod sync;
#[allow(unsafe_code)]
pub mod uring;

/// Which engine serves connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Uring,
    Sync,
}

impl EngineKind {
    /// io_uring if this kernel lets us create a ring, else the pread/pwrite engine (logged).
    pub fn detect() -> Self {
        match io_uring::IoUring::new(4) {
            Ok(_) => EngineKind::Uring,
            Err(e) => {
                tracing::warn!("io_uring is unavailable ({e}); serving with the pread/pwrite engine");
                EngineKind::Sync
            }
        }
    }
}

/// `err` and its causes on one line, for logs.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How a connection's transmission phase ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// The client sent NBD_CMD_DISC or closed the socket between requests.
    ClientDone,
    /// The server is shutting down; in-flight requests were answered.
    Shutdown,
}

/// Why a connection was dropped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    #[error("socket error")]
    Socket(#[source] std::io::Error),
    #[error("protocol violation")]
    Protocol(#[from] nbd_proto::transmission::BadMagic),
    #[error("client disconnected in the middle of a request")]
    Truncated,
    #[error("io_uring error")]
    Ring(#[source] std::io::Error),
}
