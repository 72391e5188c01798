//! The network side's counters.

use std::sync::atomic::AtomicU64;

/// Counters for `--metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    /// Connections in their handshake now (TLS and `Hello` not yet complete).
    pub handshakes: AtomicU64,
    /// Connections closed at once because `max_handshakes` were already in their handshake.
    pub handshakes_refused_total: AtomicU64,
    /// Handshakes that failed or did not complete within `handshake_timeout`.
    pub handshakes_failed_total: AtomicU64,
    pub points_total: AtomicU64,
    pub chunks_stored_total: AtomicU64,
    pub bytes_received_total: AtomicU64,
    pub rejected_total: AtomicU64,
}
