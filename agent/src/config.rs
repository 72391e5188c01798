//! What the agent is told (its configuration), what it counts (its metrics) and what it reports
//! of each cycle (its summary).

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;

/// Counters and gauges for `--metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub bytes_read_total: AtomicU64,
    pub bytes_sent_total: AtomicU64,
    pub bytes_deduplicated_total: AtomicU64,
    pub bytes_zero_total: AtomicU64,
    pub points_total: AtomicU64,
    pub errors_total: AtomicU64,
    /// Progress the server acknowledged short of a commit: initial-copy checkpoints and
    /// resync regions. A failure after progress starts the retry schedule over.
    pub progress_total: AtomicU64,
    /// Cut time of the newest committed point (ms since the epoch; 0: none yet).
    pub last_cut_unix_ms: AtomicU64,
    /// Bytes waiting: the shim's live set plus unreleased generations, when last seen.
    pub backlog_bytes: AtomicU64,
}

/// Freeze hooks for application-consistent points.
#[derive(Clone, Debug)]
pub struct AppConsistency {
    pub every: Duration,
    pub pre_hook: Option<String>,
    pub post_hook: Option<String>,
    pub hook_timeout: Duration,
}

/// Everything the agent needs.
#[derive(Clone)]
pub struct AgentConfig {
    /// The shim's NBD socket (its `gen-N` exports are read here).
    pub socket: PathBuf,
    /// The shim's control socket.
    pub control: PathBuf,
    /// The live export's name on the shim.
    pub export: String,
    pub server: String,
    pub server_name: String,
    /// `None`: plaintext (`--insecure`, loopback only).
    pub tls: Option<Arc<ClientConfig>>,
    pub metrics: Arc<Metrics>,
    pub disk: String,
    pub agent_name: String,
    pub interval: Duration,
    /// Cut early when the live set grows past this many bytes.
    pub backlog_threshold: u64,
    pub zstd_level: i32,
    /// Parallel NBD readers (and compressors).
    pub readers: usize,
    pub app: Option<AppConsistency>,
    /// Multiplies the retry delays (1.0 in production; small in tests).
    pub retry_scale: f64,
    /// Give up after this many failed attempts in a row (`None`: never).
    pub max_retries: Option<usize>,
    /// Run one cycle and return its summary.
    pub once: bool,
    /// Draw a progress bar during the initial copy and a resync.
    pub progress: bool,
    /// When to resync and how fast (`--resync`, `--resync-rate`, `--resync-backoff`).
    pub resync: ResyncOptions,
    /// Rebind the disk on the server to this shim's source identity, then resync
    /// (`--reenroll`: a reinstalled source with a new shim state).
    pub reenroll: bool,
}

/// What one cycle did (printed as JSON by `--once`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub kind: &'static str,
    pub generation: u64,
    pub point: u64,
    pub consistency: &'static str,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub bytes_deduplicated: u64,
    pub bytes_zero: u64,
    pub chunks: u64,
    /// Raw bytes read per byte sent (of what was not deduplicated).
    pub compression_ratio: f64,
    pub duration_ms: u64,
    /// Disk bytes found equal on the server and not sent (a resync; 0 otherwise).
    pub bytes_matched: u64,
    /// Disk bytes shipped, as data or zero extents (a resync: those found to differ).
    pub bytes_transferred: u64,
    /// Frame bytes this cycle sent to the server (a resync only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire_bytes_sent: Option<u64>,
    /// Bytes this cycle received from the server (a resync only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire_bytes_received: Option<u64>,
}

/// How a resync is started and paced.
#[derive(Clone, Debug)]
pub struct ResyncOptions {
    /// Resync at the start even if nothing calls for it (`--resync`).
    pub force: bool,
    /// Most bytes per second read from the source (`--resync-rate`); `None`: unlimited.
    pub rate: Option<u64>,
    /// Backoff rule (`--resync-backoff`): every second the agent reads the shim's
    /// `live_dirty_bytes`; when it grew faster than this many bytes per second (the
    /// application dirtied that much new data), reads pause for a second. After 10 s of pausing
    /// in a row they run for 2 s regardless, so a busy application slows a resync (to a sixth at
    /// worst) but never stops it. `0` disables the backoff.
    pub backoff_rate: u64,
}

impl Default for ResyncOptions {
    fn default() -> Self {
        Self { force: false, rate: None, backoff_rate: 32 << 20 }
    }
}

/// Parses `500ms`, `30s`, `5m`, `2h`, `1d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(format!("invalid duration {s:?}: unknown unit {unit:?}")),
    };
    if !secs.is_finite() || !(0.0..=1e10).contains(&secs) {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
