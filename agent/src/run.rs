//! The agent's loop: initial copy, then continuous cut → ship → commit → release, with
//! app-consistent points around hooks, retries with backoff, and an `--once` mode.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nbd_proto::client::Client;
use rustls::ClientConfig;
use tracker::control::{self, Request};
use tracker::{CutInfo, ReplicatedPoint, Status};
use wire::{Consistency, Frame, GenerationKind, PointRef};

use crate::link::{frame_name, Link};
use crate::resync::{resync_reason, ResyncOptions};
use crate::ship::{plan_chunks, ship_chunks, GenerationDigest, Known, Stats, MAX_CHUNK};
use crate::AgentError;

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
    pub metrics: Arc<crate::Metrics>,
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

/// Retry delays before the first attempts, then `RETRY_STEADY` for every later one.
const RETRY_DELAYS: [Duration; 5] = [
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(240),
    Duration::from_secs(480),
    Duration::from_secs(600),
];
const RETRY_STEADY: Duration = Duration::from_secs(1800);
/// Initial copy: progress is made durable on the server at least this often.
const PROGRESS_EVERY: u64 = 256 << 20;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
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

/// When to try again after a failure: [`RETRY_DELAYS`] in turn, then [`RETRY_STEADY`]. The
/// schedule starts over after progress: a commit (the session resets `failures`), or a
/// checkpoint or resync region the server acknowledged (`Metrics::progress_total` moved).
#[derive(Debug, Default)]
pub(crate) struct Retry {
    /// Failed attempts in a row, since the last progress.
    pub(crate) failures: usize,
    /// `progress_total` when last looked at.
    progress: u64,
}

impl Retry {
    /// After a failed attempt, with the agent's `progress` count now: the delay before the
    /// next attempt, or `Err(attempts in a row)` when `max` failures in a row were allowed and
    /// this one is beyond them.
    pub(crate) fn after_failure(
        &mut self,
        progress: u64,
        max: Option<usize>,
        scale: f64,
    ) -> Result<Duration, usize> {
        if progress != self.progress {
            self.progress = progress;
            self.failures = 0;
        }
        if max.is_some_and(|max| self.failures >= max) {
            return Err(self.failures + 1);
        }
        let delay = RETRY_DELAYS.get(self.failures).copied().unwrap_or(RETRY_STEADY).mul_f64(scale);
        self.failures += 1;
        Ok(delay)
    }
}

/// Runs until a fatal error (or, with `once`, one successful cycle).
pub fn run(cfg: &AgentConfig) -> Result<Option<Summary>, AgentError> {
    let mut agent = Agent {
        cfg,
        known: Known::default(),
        consistency: Vec::new(),
        last_app: Instant::now(),
        last_cut: None,
        force_resync: cfg.resync.force,
        reenroll: cfg.reenroll,
    };
    let mut retry = Retry { failures: 0, progress: cfg.metrics.progress_total.load(Ordering::Relaxed) };
    loop {
        match agent.session(&mut retry.failures) {
            Ok(summary) => return Ok(summary),
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                cfg.metrics.errors_total.fetch_add(1, Ordering::Relaxed);
                let progress = cfg.metrics.progress_total.load(Ordering::Relaxed);
                let delay = match retry.after_failure(progress, cfg.max_retries, cfg.retry_scale) {
                    Ok(delay) => delay,
                    Err(attempts) => return Err(AgentError::GaveUp { attempts, last: Box::new(e) }),
                };
                tracing::warn!("replication failed ({}); retrying in {delay:?}", chain(&e));
                // The server may lack chunks we believed it had: ones sent in a session that
                // ended before its commit, or ones it refused in a reply this failure cut off.
                // Asking again costs a query per batch; claiming a chunk it lacks fails the
                // next session too.
                agent.known.clear();
                std::thread::sleep(delay);
            }
        }
    }
}

/// An error and its causes on one line, each said once.
///
/// Some errors print their cause in their own message and also return it as their
/// `source()` (the store's `StoreError::Io`, "open PATH: No such file or directory (os error
/// 2)", and `StoreError::Format`): a cause whose text the line already ends with is not
/// repeated.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

pub(crate) struct Agent<'a> {
    pub(crate) cfg: &'a AgentConfig,
    pub(crate) known: Known,
    /// Consistency of generations this agent cut (app-consistent ones), until committed.
    pub(crate) consistency: Vec<(u64, Consistency)>,
    last_app: Instant,
    /// When this agent last cut: cuts follow each other every interval, however long the
    /// shipping in between took (so the RPO stays under interval + one shipment).
    last_cut: Option<Instant>,
    /// `--resync` given and not yet done.
    force_resync: bool,
    /// `--reenroll` given and the server not yet told.
    reenroll: bool,
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

impl Agent<'_> {
    pub(crate) fn control<T: serde::de::DeserializeOwned>(&self, req: &Request) -> Result<T, AgentError> {
        Ok(control::call_as(&self.cfg.control, req)?)
    }

    pub(crate) fn status(&self) -> Result<Status, AgentError> {
        let st: Status = self.control(&Request::Status)?;
        self.cfg.metrics.backlog_bytes.store(st.backlog_bytes, Ordering::Relaxed);
        Ok(st)
    }

    /// One connection's worth of work.
    fn session(&mut self, failures: &mut usize) -> Result<Option<Summary>, AgentError> {
        let cfg = self.cfg;
        let mut link = Link::connect(&cfg.server, &cfg.server_name, cfg.tls.clone(), &cfg.agent_name)?;
        let status = self.status()?;
        let source = source_id(&status)?;
        link.send(&Frame::RegisterDisk {
            disk: cfg.disk.clone(),
            size: status.size,
            block_size: status.granularity as u32,
            source,
            reenroll: self.reenroll,
        })?;
        let (mut latest, initial, server_resync) = match link.recv()? {
            Frame::DiskState { latest, initial, resync, .. } => (latest, initial, resync),
            other => {
                return Err(AgentError::Protocol(format!("expected DiskState, got {}", frame_name(&other))))
            }
        };
        tracing::info!(server = %link.server, disk = %cfg.disk, source = %status.source_id, latest = ?latest, "connected");
        if self.reenroll {
            tracing::warn!(disk = %cfg.disk, source = %status.source_id, "re-enrolled: the disk is bound to this source now");
            self.reenroll = false;
        }
        if let Some(why) = &server_resync {
            tracing::warn!(disk = %cfg.disk, "the server requires a resync: {why}");
        }
        let mut server_resync = server_resync;
        if latest.is_none() {
            if self.force_resync {
                tracing::info!("the server has no recovery point to compare with: copying the disk whole");
                self.force_resync = false;
            }
            let summary = self.initial_copy(&mut link, initial.map(|i| (i.generation, i.next_offset)))?;
            *failures = 0;
            latest = Some(PointRef {
                point: summary.point,
                generation: summary.generation,
                cut_unix_ms: now_ms(),
            });
            if cfg.once {
                return Ok(Some(summary));
            }
        }
        let mut latest = latest.expect("set above");
        // An interrupted resync is only on the server at the session's start.
        let mut initial = initial;
        loop {
            let st = self.status()?;
            let interrupted = initial.take();
            // A shim whose tracking state is intact numbers its generations on from the ones
            // it committed; if the latest point's generation is not below its next one, another
            // machine with this identity (a clone with a copy of the shim's state) made it.
            if st.resync_required.is_none()
                && server_resync.is_none()
                && st.next_generation <= latest.generation
            {
                let why = format!(
                    "disk {}: the server's latest point {} is generation {}, which this shim (source {}, next \
                     generation {}) never cut: another machine replicates under this identity (a clone with a \
                     copy of the shim's state?). Stop the clone's agent and protect it under another disk name \
                     with a fresh --state-dir",
                    cfg.disk, latest.point, latest.generation, st.source_id, st.next_generation
                );
                let _ = link.send(&Frame::error(wire::ERR_DIVERGED, why.clone()));
                return Err(AgentError::Diverged(why));
            }
            let why = match server_resync.take() {
                Some(why) => Some(format!("the server requires it: {why}")),
                None => resync_reason(&st, &latest, interrupted, self.force_resync),
            };
            if let Some(why) = why {
                let summary = self.resync(&mut link, latest, interrupted, &why)?;
                self.force_resync = false;
                *failures = 0;
                latest =
                    PointRef { point: summary.point, generation: summary.generation, cut_unix_ms: now_ms() };
                if cfg.once {
                    return Ok(Some(summary));
                }
                continue;
            }
            // Generations left by an earlier run (or a failed attempt) go first, oldest first.
            let pending: Vec<u64> = st.generations.iter().map(|g| g.id).collect();
            let summary = if let Some(&id) = pending.first() {
                if id <= latest.generation {
                    // Committed before an earlier run could release it, or by another source
                    // under this identity: sent again, the server compares its digest with
                    // the point's and answers with that point only if they are equal.
                    tracing::info!(
                        generation = id,
                        "the server has a point of this generation: checking it is ours"
                    );
                }
                self.ship_generation(&mut link, id, &mut latest)?
            } else {
                self.wait_for_cycle()?;
                if let Some(summary) = self.unchanged(&mut link, &latest)? {
                    *failures = 0;
                    if cfg.once {
                        return Ok(Some(summary));
                    }
                    continue;
                }
                // Cut, then loop: the oldest unreleased generation always ships first, so a
                // generation cut by someone else (quiesce, a manual cut) is never skipped.
                self.cut()?;
                continue;
            };
            *failures = 0;
            if cfg.once {
                return Ok(Some(summary));
            }
        }
    }

    /// Sleeps until an interval has passed since the last cut, the backlog exceeds the
    /// threshold, or an app-consistent point is due.
    fn wait_for_cycle(&self) -> Result<(), AgentError> {
        if self.cfg.once {
            return Ok(());
        }
        let start = self.last_cut.unwrap_or_else(Instant::now);
        loop {
            if start.elapsed() >= self.cfg.interval {
                return Ok(());
            }
            if let Some(app) = &self.cfg.app {
                if self.last_app.elapsed() >= app.every {
                    return Ok(());
                }
            }
            let st = self.status()?;
            if st.live_dirty_bytes >= self.cfg.backlog_threshold {
                tracing::info!(backlog = st.live_dirty_bytes, "backlog over the threshold: cutting early");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200).min(self.cfg.interval));
        }
    }

    /// When nothing was written since the latest point and no app-consistent point is due,
    /// records on the server that the latest point still equals the disk, instead of cutting
    /// an empty generation (`docs/wire.md` §6.9). `None`: something changed, cut.
    fn unchanged(&mut self, link: &mut Link, latest: &PointRef) -> Result<Option<Summary>, AgentError> {
        if self.cfg.app.as_ref().is_some_and(|a| self.last_app.elapsed() >= a.every) {
            return Ok(None);
        }
        // Taken before the status: a write acknowledged before this time was marked in the
        // live set before it (invariant 1), so an empty set and no generation prove the latest
        // point equals the disk as of it.
        let as_of = now_ms();
        let st = self.status()?;
        if st.live_dirty_bytes != 0 || !st.generations.is_empty() || st.quiesced {
            return Ok(None);
        }
        let start = Instant::now();
        self.last_cut = Some(start);
        link.send(&Frame::Current { point: latest.point, as_of_unix_ms: as_of })?;
        match link.recv()? {
            Frame::CurrentAck { point, as_of_unix_ms } if point == latest.point && as_of_unix_ms == as_of => {
            }
            other => {
                return Err(AgentError::Protocol(format!("expected CurrentAck, got {}", frame_name(&other))))
            }
        }
        self.cfg.metrics.last_cut_unix_ms.store(as_of, Ordering::Relaxed);
        let p = ReplicatedPoint {
            point: latest.point,
            generation: latest.generation,
            cut_unix_ms: as_of,
            committed_unix_ms: now_ms(),
        };
        self.control::<serde_json::Value>(&Request::Replicated { point: p })?;
        tracing::debug!(point = latest.point, as_of, "nothing written: the latest point is current");
        let mut s = summary(
            "unchanged",
            latest.generation,
            latest.point,
            Consistency::Crash,
            &Stats::default(),
            start,
            &self.cfg.metrics,
        );
        s.consistency = "unchanged";
        Ok(Some(s))
    }

    /// Cuts a generation, around the freeze hooks when an app-consistent point is due.
    fn cut(&mut self) -> Result<CutInfo, AgentError> {
        self.last_cut = Some(Instant::now());
        let due = self.cfg.app.as_ref().filter(|a| self.last_app.elapsed() >= a.every).cloned();
        let Some(app) = due else { return self.control(&Request::Cut) };
        self.last_app = Instant::now();
        let frozen = match &app.pre_hook {
            Some(cmd) => run_hook("pre-hook", cmd, app.hook_timeout),
            None => Ok(()),
        };
        let cut = self.control::<CutInfo>(&Request::Cut);
        // The post-hook always runs: a frozen filesystem is never left behind.
        let thawed = match &app.post_hook {
            Some(cmd) => run_hook("post-hook", cmd, app.hook_timeout).or_else(|e| {
                tracing::warn!("{e}; running the post-hook again");
                run_hook("post-hook", cmd, app.hook_timeout)
            }),
            None => Ok(()),
        };
        let cut = cut?;
        match (frozen, thawed) {
            (Ok(()), Ok(())) => self.consistency.push((cut.generation, Consistency::App)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("{e}: generation {} is a crash-consistent point", cut.generation)
            }
        }
        Ok(cut)
    }

    fn ship_generation(
        &mut self,
        link: &mut Link,
        id: u64,
        latest: &mut PointRef,
    ) -> Result<Summary, AgentError> {
        let cfg = self.cfg;
        let start = Instant::now();
        let status = self.status()?;
        let gen = status
            .generations
            .iter()
            .find(|g| g.id == id)
            .cloned()
            .ok_or_else(|| AgentError::Protocol(format!("generation {id} vanished from the shim")))?;
        let consistency = if gen.inconsistent.is_some() {
            Consistency::Inconsistent
        } else {
            self.consistency.iter().find(|(g, _)| *g == id).map(|(_, c)| *c).unwrap_or(Consistency::Crash)
        };
        let export = format!("gen-{id}");
        let context = format!("siterep:changes:{export}");
        let mut client = Client::connect_unix(&cfg.socket, &export, &[&context])?;
        let map = client.map(&context)?;
        let _ = client.disconnect();
        let mut stats = Stats::default();
        let mut digest = GenerationDigest::default();
        link.send(&Frame::BeginGeneration {
            disk: cfg.disk.clone(),
            generation: id,
            kind: GenerationKind::Incremental,
            base_point: Some(latest.point),
        })?;
        let mut data = Vec::new();
        for &(off, len, flags) in &map {
            match flags & 3 {
                0 => {}
                3 => {
                    stats.bytes_zero += len;
                    digest.zero(off, len);
                    link.queue(&Frame::Zero { offset: off, len });
                }
                _ => data.push((off, len)),
            }
        }
        let chunks = plan_chunks(&data, status.size);
        ship_chunks(
            link,
            &cfg.socket,
            &export,
            &chunks,
            cfg.readers,
            cfg.zstd_level,
            &self.known,
            &mut stats,
            Some(&mut digest),
            &mut |_| {},
        )?;
        let shipped = start.elapsed();
        let point = self.commit(link, id, gen.cut_unix_ms, consistency, Some(digest.finish()))?;
        let committed = start.elapsed();
        self.control::<serde_json::Value>(&Request::Release { generation: id })?;
        self.consistency.retain(|(g, _)| *g != id);
        if id > latest.generation {
            *latest = PointRef { point, generation: id, cut_unix_ms: gen.cut_unix_ms };
        }
        self.report(point, id, gen.cut_unix_ms)?;
        let s = summary("incremental", id, point, consistency, &stats, start, &cfg.metrics);
        tracing::info!(
            generation = id,
            point,
            read = s.bytes_read,
            sent = s.bytes_sent,
            dedup = s.bytes_deduplicated,
            zero = s.bytes_zero,
            ship_ms = shipped.as_millis() as u64,
            commit_ms = (committed - shipped).as_millis() as u64,
            release_ms = (start.elapsed() - committed).as_millis() as u64,
            "committed"
        );
        Ok(s)
    }

    pub(crate) fn commit(
        &self,
        link: &mut Link,
        generation: u64,
        cut_unix_ms: u64,
        consistency: Consistency,
        digest: Option<wire::Hash>,
    ) -> Result<u64, AgentError> {
        link.send(&Frame::Commit { generation, cut_unix_ms, consistency, digest })?;
        match link.recv()? {
            Frame::Committed { point, generation: g } if g == generation => Ok(point),
            other => Err(AgentError::Protocol(format!("expected Committed, got {}", frame_name(&other)))),
        }
    }

    pub(crate) fn report(&self, point: u64, generation: u64, cut_unix_ms: u64) -> Result<(), AgentError> {
        let m = &self.cfg.metrics;
        m.points_total.fetch_add(1, Ordering::Relaxed);
        m.last_cut_unix_ms.store(cut_unix_ms, Ordering::Relaxed);
        let p = ReplicatedPoint { point, generation, cut_unix_ms, committed_unix_ms: now_ms() };
        self.control::<serde_json::Value>(&Request::Replicated { point: p })?;
        Ok(())
    }

    /// Copies the whole disk (its allocated ranges) while tracking goes on; resumes at
    /// `resume = (generation, next_offset)` when the server holds an interrupted copy.
    fn initial_copy(&mut self, link: &mut Link, resume: Option<(u64, u64)>) -> Result<Summary, AgentError> {
        let cfg = self.cfg;
        let start_time = Instant::now();
        let (generation, cut_ms, from) = match resume {
            Some((g, next)) => {
                tracing::info!(generation = g, next_offset = next, "resuming the initial copy");
                (g, now_ms(), next)
            }
            None => {
                // Everything written from here on is tracked in the live set and reaches the
                // replica with the first incremental generation; the cut's own set is covered
                // by the full copy.
                let cut: CutInfo = self.control(&Request::Cut)?;
                self.control::<serde_json::Value>(&Request::Release { generation: cut.generation })?;
                (cut.generation, cut.cut_unix_ms, 0)
            }
        };
        link.send(&Frame::BeginGeneration {
            disk: cfg.disk.clone(),
            generation,
            kind: GenerationKind::InitialFull,
            base_point: None,
        })?;
        let mut client = Client::connect_unix(&cfg.socket, &cfg.export, &["base:allocation"])?;
        let size = client.size();
        let alloc = client.map("base:allocation")?;
        let _ = client.disconnect();
        // Holes read as zeroes on the replica: only allocated ranges are copied.
        let data: Vec<(u64, u64)> = alloc
            .iter()
            .filter(|(_, _, f)| f & 1 == 0)
            .filter_map(|&(o, l, _)| {
                let s = o.max(from);
                (s < o + l).then(|| (s, o + l - s))
            })
            .collect();
        let total: u64 = data.iter().map(|d| d.1).sum();
        let bar = progress_bar(cfg.progress, total, "initial copy", "");
        let mut stats = Stats::default();
        // Ship in slices so progress is made durable as the copy advances.
        let mut slice_start = from;
        while slice_start < size {
            let slice_end = (slice_start + PROGRESS_EVERY).min(size);
            let part: Vec<(u64, u64)> = data
                .iter()
                .filter_map(|&(o, l)| {
                    let s = o.max(slice_start);
                    let e = (o + l).min(slice_end);
                    (s < e).then(|| (s, e - s))
                })
                .collect();
            // Whole MAX_CHUNK pieces, without merging across gaps: holes stay holes.
            let chunks: Vec<(u64, u64)> =
                part.iter().flat_map(|&(o, l)| plan_chunks(&[(o, l)], size)).collect();
            debug_assert!(chunks.iter().all(|c| c.1 <= MAX_CHUNK));
            ship_chunks(
                link,
                &cfg.socket,
                &cfg.export,
                &chunks,
                cfg.readers,
                cfg.zstd_level,
                &self.known,
                &mut stats,
                None,
                &mut |n| bar.inc(n),
            )?;
            link.send(&Frame::Progress { next_offset: slice_end })?;
            match link.recv()? {
                Frame::ProgressAck { next_offset } if next_offset == slice_end => {
                    cfg.metrics.progress_total.fetch_add(1, Ordering::Relaxed);
                }
                other => {
                    return Err(AgentError::Protocol(format!(
                        "expected ProgressAck, got {}",
                        frame_name(&other)
                    )))
                }
            }
            slice_start = slice_end;
        }
        bar.finish_and_clear();
        let point = self.commit(link, generation, cut_ms, Consistency::Inconsistent, None)?;
        // The replica now holds the whole disk (fuzzy); the live set covers what changed since.
        self.control::<serde_json::Value>(&Request::ClearResync)?;
        self.report(point, generation, cut_ms)?;
        let s = summary(
            "initial",
            generation,
            point,
            Consistency::Inconsistent,
            &stats,
            start_time,
            &cfg.metrics,
        );
        tracing::info!(point, read = s.bytes_read, sent = s.bytes_sent, "initial copy committed");
        Ok(s)
    }
}

pub(crate) fn summary(
    kind: &'static str,
    generation: u64,
    point: u64,
    c: Consistency,
    s: &Stats,
    start: Instant,
    m: &crate::Metrics,
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

/// Runs a hook with `sh -c`, killing it after `timeout`.
fn run_hook(what: &str, cmd: &str, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("{what} {cmd:?} could not start: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("{what} {cmd:?} failed ({st})")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} {cmd:?} timed out after {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{what} {cmd:?}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_follow_the_schedule_and_start_over_after_progress() {
        let m = |s| Duration::from_secs(s);
        let mut r = Retry::default();
        let delays: Vec<_> = (0..7).map(|_| r.after_failure(0, None, 1.0).unwrap()).collect();
        assert_eq!(delays, [m(60), m(120), m(240), m(480), m(600), m(1800), m(1800)]);
        // A checkpoint or resync region acknowledged: the schedule starts over.
        assert_eq!(r.after_failure(1, None, 1.0), Ok(m(60)));
        assert_eq!(r.after_failure(1, None, 1.0), Ok(m(120)));
        assert_eq!(r.after_failure(3, None, 1.0), Ok(m(60)));
        // A commit: the session resets `failures`.
        r.failures = 0;
        assert_eq!(r.after_failure(3, None, 0.5), Ok(m(30)));
        // `max` failures in a row are retried; the next one gives up, unless progress came
        // in between.
        let mut r = Retry::default();
        assert_eq!(r.after_failure(0, Some(2), 1.0), Ok(m(60)));
        assert_eq!(r.after_failure(0, Some(2), 1.0), Ok(m(120)));
        assert_eq!(r.after_failure(0, Some(2), 1.0), Err(3));
        let mut r = Retry::default();
        r.after_failure(0, Some(2), 1.0).unwrap();
        r.after_failure(0, Some(2), 1.0).unwrap();
        assert_eq!(r.after_failure(5, Some(2), 1.0), Ok(m(60)));
    }

    #[test]
    fn a_cause_in_the_message_is_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("open /x: {source}")]
        struct Inline {
            source: std::io::Error,
        }
        #[derive(Debug, thiserror::Error)]
        #[error("opening store /x")]
        struct Outer(#[source] Inline);
        let os = || std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = Outer(Inline { source: os() });
        assert_eq!(chain(&e), format!("opening store /x: open /x: {}", os()));
        // A cause not in the message is said.
        let e = AgentError::Connect(std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(
            chain(&e),
            format!(
                "cannot connect to the server: {}",
                std::io::Error::from_raw_os_error(libc::ECONNREFUSED)
            )
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn hooks_report_failure_and_timeout() {
        assert!(run_hook("pre-hook", "true", Duration::from_secs(5)).is_ok());
        assert!(run_hook("pre-hook", "exit 3", Duration::from_secs(5)).unwrap_err().contains("failed"));
        assert!(run_hook("pre-hook", "sleep 5", Duration::from_millis(100))
            .unwrap_err()
            .contains("timed out"));
    }
}
