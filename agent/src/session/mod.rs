//! One connection's session with the server, from the agent's side: its context (`Session`:
//! the link, the shim's control socket, what the agent carries from one session to the next)
//! and what every path of a session does alike (register the disk, commit, report a point to
//! the shim).
//!
//! The paths a session takes are the submodules, peers that use this context and not each
//! other: [`initial`] (the first full copy), [`incremental`] (a generation cut by the shim, or
//! the record that nothing changed) and [`resync`] (bringing the latest point level with the
//! disk by hashes). Which path runs when is decided by [`crate::run`](mod@crate::run).

pub mod incremental;
pub mod initial;
pub mod resync;

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tracker::control::{self, Request};
use tracker::{ReplicatedPoint, Status};
use wire::session::DiskState;
use wire::{Consistency, Frame};

use crate::config::{AgentConfig, Metrics, Summary};
use crate::error::AgentError;
use crate::link::Link;
use crate::ship::{Known, Stats};

/// What the agent carries from one session to the next.
pub(crate) struct Memory {
    /// Hashes the server is known to hold.
    pub known: Known,
    /// Consistency of generations this agent cut (app-consistent ones), until committed.
    pub consistency: Vec<(u64, Consistency)>,
    /// When the last app-consistent point was cut.
    pub last_app: Instant,
    /// When this agent last cut: cuts follow each other every interval, however long the
    /// shipping in between took (so the RPO stays under interval + one shipment).
    pub last_cut: Option<Instant>,
}

impl Memory {
    pub fn new() -> Self {
        Self { known: Known::default(), consistency: Vec::new(), last_app: Instant::now(), last_cut: None }
    }
}

/// One connection's session: the link to the server (and through it the order of the session),
/// the shim's control socket (through the configuration), and the agent's memory.
pub(crate) struct Session<'a> {
    pub cfg: &'a AgentConfig,
    pub link: Link,
    pub memory: &'a mut Memory,
}

impl<'a> Session<'a> {
    /// Connects to the server and agrees on a version.
    pub fn connect(cfg: &'a AgentConfig, memory: &'a mut Memory) -> Result<Self, AgentError> {
        let link = Link::connect(&cfg.server, &cfg.server_name, cfg.tls.clone(), &cfg.agent_name)?;
        Ok(Self { cfg, link, memory })
    }

    /// A request to the shim's control socket.
    pub fn control<T: serde::de::DeserializeOwned>(&self, req: &Request) -> Result<T, AgentError> {
        Ok(control::call_as(&self.cfg.control, req)?)
    }

    /// The shim's status (and the backlog it shows, for the metrics).
    pub fn status(&self) -> Result<Status, AgentError> {
        let st: Status = self.control(&Request::Status)?;
        self.cfg.metrics.backlog_bytes.store(st.backlog_bytes, Ordering::Relaxed);
        Ok(st)
    }

    /// Registers the disk as the shim's `status` shows it, from its source (`reenroll`: rebind
    /// the disk to it, `docs/wire.md` §6.2); returns what the server holds of it.
    pub fn register(&mut self, status: &Status, reenroll: bool) -> Result<DiskState, AgentError> {
        let block_size = u32::try_from(status.granularity).map_err(|_| {
            AgentError::Config(format!(
                "the shim's tracking granularity {} does not fit the wire",
                status.granularity
            ))
        })?;
        self.link.register(&Frame::RegisterDisk {
            disk: self.cfg.disk.clone(),
            size: status.size,
            block_size,
            source: source_id(status)?,
            reenroll,
        })
    }

    /// Tells the shim (and the metrics) that `generation`, cut at `cut_unix_ms`, is the durable
    /// point `point` now.
    pub fn report(&self, point: u64, generation: u64, cut_unix_ms: u64) -> Result<(), AgentError> {
        let m = &self.cfg.metrics;
        m.points_total.fetch_add(1, Ordering::Relaxed);
        m.last_cut_unix_ms.store(cut_unix_ms, Ordering::Relaxed);
        let p = ReplicatedPoint { point, generation, cut_unix_ms, committed_unix_ms: now_ms() };
        self.control::<serde_json::Value>(&Request::Replicated { point: p })?;
        Ok(())
    }
}

/// The source identity in a shim's status.
fn source_id(st: &Status) -> Result<wire::SourceId, AgentError> {
    tracker::parse_source_id(&st.source_id).ok_or_else(|| {
        AgentError::Config(format!(
            "the shim reports no valid source identity ({:?}): run a siterep serve of this version",
            st.source_id
        ))
    })
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What a cycle did, added to the metrics.
pub(crate) fn summary(
    kind: &'static str,
    generation: u64,
    point: u64,
    c: Consistency,
    s: &Stats,
    start: Instant,
    m: &Metrics,
) -> Summary {
    m.bytes_read_total.fetch_add(s.bytes_read, Ordering::Relaxed);
    m.bytes_sent_total.fetch_add(s.bytes_sent, Ordering::Relaxed);
    m.bytes_deduplicated_total.fetch_add(s.bytes_deduplicated, Ordering::Relaxed);
    m.bytes_zero_total.fetch_add(s.bytes_zero, Ordering::Relaxed);
    let unique = s.bytes_read.saturating_sub(s.bytes_deduplicated);
    Summary {
        kind,
        generation,
        point,
        consistency: match c {
            Consistency::Crash => "crash",
            Consistency::App => "app",
            Consistency::Inconsistent => "inconsistent",
        },
        bytes_read: s.bytes_read,
        bytes_sent: s.bytes_sent,
        bytes_deduplicated: s.bytes_deduplicated,
        bytes_zero: s.bytes_zero,
        chunks: s.chunks,
        compression_ratio: if s.bytes_sent == 0 { 0.0 } else { unique as f64 / s.bytes_sent as f64 },
        duration_ms: start.elapsed().as_millis() as u64,
        bytes_matched: 0,
        bytes_transferred: s.bytes_read + s.bytes_zero,
        wire_bytes_sent: None,
        wire_bytes_received: None,
    }
}

/// A byte progress bar (rate, ETA) labelled `what`, or a hidden one.
pub(crate) fn progress_bar(show: bool, total: u64, what: &str, suffix: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} ETA {{eta}}{suffix}"
        ))
        .expect("valid template"),
    );
    bar
}
