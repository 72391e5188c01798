//! The replication agent (mobility service): drains the shim's tracked generations to the
//! recovery server as blake3-hashed, zstd-compressed, deduplicated deltas.
//!
//! - [`run`](mod@run) is the loop: connect, register the disk, copy it whole the first time (resumable,
//!   skipping holes), resync when tracking was lost, then every interval cut a generation, ship
//!   it, wait for the server's durable commit, release it. Transient failures retry with
//!   backoff; fatal ones stop.
//! - [`session`] is one connection's context (the link, the shim's control socket, the commit)
//!   and the paths a session takes, each in its own module: [`session::initial`] (the first
//!   full copy), [`session::incremental`] (cut, ship, commit, release; or record that nothing
//!   changed) and [`session::resync`] (compare hashes with the server's latest point, region by
//!   region and then block by block, and send only the blocks that differ).
//! - [`ship`] turns extents into chunks, reads them through NBD with several connections,
//!   hashes and compresses them in parallel, asks the server which it already has, and sends the
//!   rest, with bounded memory.
//! - [`link`] is the framed TLS connection, a thin driver of `wire`'s agent-side session
//!   machine (`wire::session::AgentSession`), which holds the order of frames; [`tls`] builds
//!   mutual-TLS configurations.
//! - [`config`] is what the agent is told and what it counts; [`error`] why it stops.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod link;
pub mod run;
pub mod session;
pub mod ship;
pub mod tls;

pub use config::{parse_duration, AgentConfig, AppConsistency, Metrics, ResyncOptions, Summary};
pub use error::AgentError;
pub use run::run;
