//! The order of frames in a session (`docs/wire.md` §6), as two state machines without I/O:
//! [`ServerSession`] is the server's side of a connection, [`AgentSession`] the agent's.
//!
//! They own every rule of §6 about what may follow what: `Hello` first and the version it
//! agrees on (§6.1), `RegisterDisk` before anything that names the disk (§6.2), extents only
//! inside a generation and a `Commit` of the generation open (§6.3, §6.6), checkpoints only in a
//! generation that has them (§6.5), a generation sent again after it became a point (§6.6),
//! hash queries of the registered disk (§6.8), `Current` only between generations (§6.9), the
//! answers in the order of the requests, each only once every extent before it is in the
//! generation (§6), and how an `Error` ends the session (§5, §6.7).
//! What the rules do not decide stays with the driver that owns the socket: reading and writing
//! bytes, timeouts, TLS, the store, the shim.
//!
//! The server's machine takes frames and the results of the actions it asks for, and returns
//! what to send, what to do, or the refusal that ends the session:
//!
//! ```
//! use wire::session::{Outcome, ServerAction, ServerSession, ServerStep};
//! use wire::Frame;
//!
//! let mut s = ServerSession::new("recovery-site");
//! let hello = Frame::Hello { min_version: wire::MIN_VERSION, max_version: wire::VERSION, agent: "a".into() };
//! let ServerStep::Act(ServerAction::Accept { version, .. }) = s.receive(hello) else { panic!() };
//! // The driver marks the connection authenticated, then:
//! assert!(matches!(s.complete(Outcome::Done), ServerStep::Send(Frame::Welcome { .. })));
//! // A chunk before any generation is out of place: refused, and the session is over.
//! let chunk = Frame::Zero { offset: 0, len: 4096 };
//! let ServerStep::Refuse(r) = s.receive(chunk) else { panic!() };
//! assert_eq!(r.code, wire::ERR_BAD_REQUEST);
//! # let _ = version;
//! ```
//!
//! The agent's machine checks each frame before it is sent ([`AgentSession::send`]) and each
//! frame the server sends against the answer it expects next ([`AgentSession::receive`]),
//! which it returns typed ([`Reply`]); it keeps the latest point the session knows of and
//! decides, from `DiskState`, what the session's first work is.

mod agent;
mod server;

pub use agent::{AgentSession, DiskState, Reply, SessionError};
pub use server::{Outcome, ServerAction, ServerSession, ServerStep};

use crate::frame::fit_string;
use crate::{default_class, ErrorClass, Frame};

/// What an `Error` frame says (§4.14, §5): its class, its code and a message for humans. The
/// session ends with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub class: ErrorClass,
    pub code: u16,
    pub message: String,
}

impl Refusal {
    /// A refusal with the code's default class (§5); a message longer than
    /// [`crate::MAX_STRING`] is cut.
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Self::with_class(default_class(code), code, message)
    }

    /// A refusal with another class than the code's default, e.g. a retryable
    /// `ERR_BAD_REQUEST` (§6.4).
    pub fn with_class(class: ErrorClass, code: u16, message: impl Into<String>) -> Self {
        Self { class, code, message: fit_string(message.into()) }
    }

    /// Whether the work may be tried again in a new session (§5).
    pub fn is_retryable(&self) -> bool {
        self.class.is_retryable()
    }

    /// The `Error` frame that says it.
    pub fn to_frame(&self) -> Frame {
        Frame::Error { class: self.class, code: self.code, message: self.message.clone() }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let class = match self.class {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Fatal => "fatal",
        };
        write!(f, "{class} error {}: {}", self.code, self.message)
    }
}

#[cfg(test)]
mod pair_tests;
