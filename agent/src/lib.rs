//! The replication agent (mobility service): drains tracked generations to the recovery site.
//!
//! Nothing is built here yet; the replication issue (#5) fills it. The crate exists so the
//! workspace shows the architecture described in `DESIGN.md`.
#![forbid(unsafe_code)]
