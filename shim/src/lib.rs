//! The shim: serves a disk image over NBD or ublk and marks every write in a dirty map.
//!
//! The NBD protocol itself (handshake, request validation, reply encoding) and the client the
//! agent uses are the crate `nbd_proto`; this crate does the I/O around it.
//!
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
//!
//! Unsafe code is denied here and allowed only in the modules that talk to the kernel directly:
//! [`sys`], [`engine::uring`], [`engine::poll`] and the ublk rings.
#![deny(unsafe_code)]

pub mod backend;
pub mod buf;
pub mod engine;
pub mod export;
pub mod kernel;
pub mod server;
#[allow(unsafe_code)]
pub mod sys;
pub mod ublk;
pub mod watch;

#[cfg(test)]
mod tests;

pub use backend::{Backend, ImageKind, OpenError, VirtualImage};
pub use engine::EngineKind;
pub use export::{Catalog, Export, ExportKind, StaticCatalog, TrackedCatalog};
pub use server::{Listener, Server, Shutdown};
