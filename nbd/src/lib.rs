//! The NBD protocol and the server that drives it.
//!
//! - [`proto`] is the protocol, sans-IO: the fixed-newstyle handshake as a state machine, request
//!   parsing and validation into typed commands, reply encoding.
//! - [`backend`] is the image (a regular file or a block device) and its synchronous operations;
//!   [`watch`] fails requests touching a range the image lost under the shim (shrunk, replaced).
//! - [`engine`] runs a connection's transmission phase: [`engine::uring`] on io_uring (the
//!   default), [`engine::sync`] on plain pread/pwrite where io_uring is unavailable.
//! - [`server`] accepts connections on Unix and TCP sockets (or systemd-activated ones), does the
//!   handshake, and hands each connection to an engine thread.
//! - [`kernel`] attaches the kernel's NBD driver (`/dev/nbdN`) to the server; [`ublk`] serves the
//!   export as a ublk device (`/dev/ublkbN`) — the two front-ends for physical servers.
//!
//! Every acknowledged WRITE, TRIM and WRITE_ZEROES is marked in the export's
//! [`tracker::DirtyMap`] before its reply is queued.

pub mod backend;
pub mod buf;
pub mod client;
pub mod engine;
pub mod export;
pub mod kernel;
pub mod proto;
pub mod server;
pub mod sys;
pub mod ublk;
pub mod watch;

pub use backend::{Backend, ImageKind, OpenError, VirtualImage};
pub use engine::EngineKind;
pub use export::{Catalog, Export, ExportKind, StaticCatalog, TrackedCatalog};
pub use server::{Listener, Server, Shutdown};
