//! The agent's loop: connect, register the disk, decide what each session does (the initial
//! copy, a resync, incremental generations, or the record that nothing changed), and retry with
//! backoff when a session fails; an `--once` mode runs one cycle.

use std::sync::atomic::Ordering;
use std::time::Duration;

use wire::session::DiskState;

use crate::config::{AgentConfig, Summary};
use crate::error::AgentError;
use crate::session::incremental::{cut, ship_generation, unchanged, wait_for_cycle};
use crate::session::initial::initial_copy;
use crate::session::resync::{resync, resync_reason};
use crate::session::{Memory, Session};

/// Retry delays before the first attempts, then `RETRY_STEADY` for every later one.
const RETRY_DELAYS: [Duration; 5] = [
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(240),
    Duration::from_secs(480),
    Duration::from_secs(600),
];
const RETRY_STEADY: Duration = Duration::from_secs(1800);
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
    let mut agent =
        Agent { cfg, memory: Memory::new(), force_resync: cfg.resync.force, reenroll: cfg.reenroll };
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
                agent.memory.known.clear();
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

/// The agent across sessions.
struct Agent<'a> {
    cfg: &'a AgentConfig,
    memory: Memory,
    /// `--resync` given and not yet done.
    force_resync: bool,
    /// `--reenroll` given and the server not yet told.
    reenroll: bool,
}

impl Agent<'_> {
    /// One connection's worth of work: which path runs when.
    fn session(&mut self, failures: &mut usize) -> Result<Option<Summary>, AgentError> {
        let cfg = self.cfg;
        let mut s = Session::connect(cfg, &mut self.memory)?;
        let status = s.status()?;
        let state = s.register(&status, self.reenroll)?;
        tracing::info!(server = %s.link.server, disk = %cfg.disk, source = %status.source_id, latest = ?state.latest, "connected");
        if self.reenroll {
            tracing::warn!(disk = %cfg.disk, source = %status.source_id, "re-enrolled: the disk is bound to this source now");
            self.reenroll = false;
        }
        if let Some(why) = &state.resync {
            tracing::warn!(disk = %cfg.disk, "the server requires a resync: {why}");
        }
        let DiskState { latest, initial, resync: mut server_resync } = state.clone();
        if latest.is_none() {
            if self.force_resync {
                tracing::info!("the server has no recovery point to compare with: copying the disk whole");
                self.force_resync = false;
            }
            let summary = initial_copy(&mut s, state.initial_copy())?;
            *failures = 0;
            if cfg.once {
                return Ok(Some(summary));
            }
        }
        // An interrupted resync is only on the server at the session's start.
        let mut initial = initial;
        loop {
            let latest = s.link.latest().expect("a point: the server's, or the initial copy's");
            let st = s.status()?;
            let interrupted = DiskState::interrupted_resync(initial.take(), &latest);
            // A shim whose tracking state is intact numbers its generations on from the ones it
            // committed: if it did not cut the latest point, another machine made it.
            let tracking_intact = st.resync_required.is_none() && server_resync.is_none();
            let why = || {
                format!(
                    "disk {}: the server's latest point {} is generation {}, which this shim (source {}, next \
                     generation {}) never cut: another machine replicates under this identity (a clone with a \
                     copy of the shim's state?). Stop the clone's agent and protect it under another disk name \
                     with a fresh --state-dir",
                    cfg.disk, latest.point, latest.generation, st.source_id, st.next_generation
                )
            };
            if let Err(refusal) = DiskState::check_lineage(&latest, st.next_generation, tracking_intact, why)
            {
                let _ = s.link.send(&refusal.to_frame());
                return Err(AgentError::Diverged(why()));
            }
            let why = match server_resync.take() {
                Some(why) => Some(format!("the server requires it: {why}")),
                None => resync_reason(&st, &latest, interrupted, self.force_resync),
            };
            if let Some(why) = why {
                let summary = resync(&mut s, latest, interrupted, &why)?;
                self.force_resync = false;
                *failures = 0;
                if cfg.once {
                    return Ok(Some(summary));
                }
                continue;
            }
            // Generations left by an earlier run (or a failed attempt) go first, oldest first.
            let summary = if let Some(id) = st.generations.first().map(|g| g.id) {
                if id <= latest.generation {
                    // Committed before an earlier run could release it, or by another source
                    // under this identity: sent again, the server compares its digest with the
                    // point's and answers with that point only if they are equal.
                    tracing::info!(
                        generation = id,
                        "the server has a point of this generation: checking it is ours"
                    );
                }
                ship_generation(&mut s, id, &latest)?
            } else {
                wait_for_cycle(&s)?;
                if let Some(summary) = unchanged(&mut s, &latest)? {
                    *failures = 0;
                    if cfg.once {
                        return Ok(Some(summary));
                    }
                    continue;
                }
                // Cut, then loop: the oldest unreleased generation always ships first, so a
                // generation cut by someone else (quiesce, a manual cut) is never skipped.
                cut(&mut s)?;
                continue;
            };
            *failures = 0;
            if cfg.once {
                return Ok(Some(summary));
            }
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
}
