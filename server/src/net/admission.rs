//! What a connection may cost before it is authenticated: the handshake slots and deadline
//! (`--max-handshakes`, `--handshake-timeout`), and rate-limited warnings about the
//! connections refused or failed.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::metrics::Metrics;

/// At most one warning of each kind about unauthenticated connections per this interval
/// (the others are counted and the count is logged with the next one).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What a connection may cost before it is authenticated (its TLS handshake and its `Hello`
/// complete).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections in their handshake at once; a connection beyond them is closed at once.
    pub max_handshakes: usize,
    /// How long the TLS handshake and the `Hello` frame may take together.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_handshakes: 64, handshake_timeout: Duration::from_secs(10) }
    }
}

/// A warning logged at most once per [`WARN_EVERY`]; the ones held back are counted.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttled {
    /// `Some(number held back since the last one)` when a warning may be logged now.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) < WARN_EVERY) {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// The server's gate for unauthenticated connections, shared by the accept loop and the
/// connection threads.
pub(super) struct Admission {
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Connections in their handshake now.
    pending: AtomicUsize,
    refused: Mutex<Throttled>,
    failed: Mutex<Throttled>,
}

impl Admission {
    pub(super) fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            limits,
            metrics,
            pending: AtomicUsize::new(0),
            refused: Mutex::default(),
            failed: Mutex::default(),
        }
    }

    /// A handshake slot for a new connection, or `None` when every slot is taken. Only the
    /// accept loop calls this, so the count cannot pass the limit.
    pub(super) fn admit(self: &Arc<Self>, peer: std::net::SocketAddr) -> Option<Handshake> {
        if self.pending.load(Ordering::SeqCst) >= self.limits.max_handshakes {
            self.metrics.handshakes_refused_total.fetch_add(1, Ordering::Relaxed);
            if let Some(held_back) = self.refused.lock().unwrap_or_else(|e| e.into_inner()).ready() {
                tracing::warn!(
                    %peer,
                    held_back,
                    "{} connections are already in their handshake (--max-handshakes): closing this \
                     one at once",
                    self.limits.max_handshakes
                );
            }
            return None;
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.metrics.handshakes.fetch_add(1, Ordering::Relaxed);
        Some(Handshake {
            deadline: Instant::now() + self.limits.handshake_timeout,
            timeout: self.limits.handshake_timeout,
            slot: Some(self.clone()),
            authenticated: false,
        })
    }

    /// Logs a handshake that failed (rate-limited: a flood of them must not flood the log).
    pub(super) fn failed(&self, peer: std::net::SocketAddr, e: &io::Error) {
        self.metrics.handshakes_failed_total.fetch_add(1, Ordering::Relaxed);
        if let Some(held_back) = self.failed.lock().unwrap_or_else(|e| e.into_inner()).ready() {
            tracing::warn!(%peer, held_back, "handshake failed: {e}");
        }
    }
}

/// A connection's handshake: its deadline, and its slot among the `max_handshakes`, held
/// until [`Handshake::done`] (or the connection's end).
pub(super) struct Handshake {
    deadline: Instant,
    timeout: Duration,
    slot: Option<Arc<Admission>>,
    authenticated: bool,
}

impl Handshake {
    /// A handshake outside any [`Admission`] (tests).
    #[cfg(test)]
    pub(super) fn unlimited() -> Self {
        let timeout = Duration::from_secs(3600);
        Self { deadline: Instant::now() + timeout, timeout, slot: None, authenticated: false }
    }

    /// The time left, or a `TimedOut` error once the deadline has passed.
    pub(super) fn left(&self, waiting_for: &str) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.expired(waiting_for));
        }
        Ok(left)
    }

    pub(super) fn expired(&self, waiting_for: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no {waiting_for} within the handshake timeout of {:?} (--handshake-timeout)",
                self.timeout
            ),
        )
    }

    /// Whether the connection completed its handshake.
    pub(super) fn is_done(&self) -> bool {
        self.authenticated
    }

    /// The peer is authenticated: its slot is free for another connection.
    pub(super) fn done(&mut self) {
        self.release();
        self.authenticated = true;
    }

    fn release(&mut self) {
        if let Some(a) = self.slot.take() {
            a.pending.fetch_sub(1, Ordering::SeqCst);
            a.metrics.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.release();
    }
}
